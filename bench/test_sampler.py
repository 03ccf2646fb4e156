"""pytest-benchmark suite for the sampler paths, sharing `vsampler.tools.workloads` with `vsampler bench`.

    pytest bench/ --benchmark-only --benchmark-group-by=param:workload

One group per workload puts vsampler's implementations and the peers side by side.
"""

import jax
import pytest

from vsampler import available_impls
from vsampler.tools import sampler_benchmark as bm
from vsampler.tools import workloads

WORKLOADS = list(workloads.grid(batches=(1, 8, 64), vocabs=(128256,), dtypes=("float32",)))
RUNNERS = {f"vsampler-{impl}": bm.impl_runner(impl) for impl in available_impls()}
RUNNERS["floor-sum-exp"] = bm.floor_runner
RUNNERS["peer-categorical"] = bm.categorical_runner
if (hf := bm.hf_flax_runner()) is not None:
    RUNNERS["peer-hf-flax"] = hf


@pytest.fixture(scope="module", params=WORKLOADS, ids=lambda w: w.label.replace(" ", "-"))
def workload(request):
    return request.param, workloads.make_inputs(request.param)


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_sample(benchmark, workload, runner):
    w, inp = workload
    run = RUNNERS[runner]
    jax.block_until_ready(run(inp))  # compile outside the timing
    benchmark.group = w.label
    benchmark.pedantic(lambda: jax.block_until_ready(run(inp)), rounds=5, warmup_rounds=1)
