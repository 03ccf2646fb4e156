"""pytest-benchmark suite for the serving features on workload (a) ("full"), plain sampling beside each:

    pytest bench/test_serving_features.py --benchmark-only --benchmark-group-by=param:workload

Each group holds one fast path plain and with log-probs (raw, processed) and with an allowed-token mask;
the cost of a feature is its time over the plain row's in the same group (`vsampler bench` prints these
ratios, timed interleaved).
"""

import jax
import pytest

from vsampler.tools import sampler_benchmark as bm
from vsampler.tools import workloads

WORKLOADS = [workloads.Workload("full", batch, 128256, "float32") for batch in (1, 8, 64)]
FEATURES = ["plain", *bm.FEATURES]


@pytest.fixture(scope="module", params=WORKLOADS, ids=lambda w: w.label.replace(" ", "-"))
def workload(request):
    return request.param, workloads.make_inputs(request.param)


@pytest.mark.parametrize("feature", FEATURES)
def test_feature(benchmark, workload, feature):
    w, inp = workload
    run = bm.impl_runner("xla") if feature == "plain" else bm.feature_runner("xla", feature, w.batch, w.vocab)
    jax.block_until_ready(run(inp))  # compile outside the timing
    benchmark.group = w.label
    benchmark.pedantic(lambda: jax.block_until_ready(run(inp)), rounds=10, warmup_rounds=1)
