"""pytest-benchmark suite for the decode loop: the tiny decoder through `vInference`, sampling with
vsampler vs an argmax step (the baseline), per batch size.

    pytest bench/test_loop.py --benchmark-only --benchmark-group-by=param:batch

Each group puts the sampled and the argmax loop side by side; the difference is what sampling costs
inside a real step. `vsampler.tools.loop_benchmark` holds the workload, which the CLI shares.
"""

import jax
import pytest

from vsampler.tools.loop_benchmark import build_loop, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(32000)


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("sampler", ["vsampler-full", "argmax-baseline"])
def test_decode_loop(benchmark, model, batch, sampler):
    engine, prompts = build_loop(model, batch, config="full", baseline=sampler == "argmax-baseline")
    engine.generate_all(prompts, key=jax.random.key(0))  # compile and warm up outside the timing
    benchmark.group = f"loop batch={batch}"
    state = benchmark.pedantic(lambda: engine.generate_all(prompts, key=jax.random.key(1)), rounds=3)
    benchmark.extra_info["decode_tokens_per_second"] = float(state.tokens_per_second)
