"""What the vocabulary-parallel sampler communicates per call, against one all-gather of the logits
(B=8, V=128256 on 8 shards), with the time of the sharded call on simulated CPU devices:

    pytest bench/test_vocab_parallel.py --benchmark-only -s

The bytes come from the compiled HLO (`vsampler.tools.communication.communication_report`: the operands of
every all-reduce / all-gather / collective-permute, times their loop trip counts) and are stored in
the benchmark's `extra_info`. The time is of 8 devices simulated on this machine's cores: it shows the
call runs, not what a real tensor-parallel slice would take.
"""

import os

# 8 simulated CPU devices, set before JAX starts its backend (as tests/conftest.py does); single-device
# benchmarks keep using device 0
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vsampler import SamplingParams, sample
from vsampler.tools import communication

BATCH, VOCAB, SHARDS = 8, 128256, 8


def test_vocab_parallel_bytes_per_call(benchmark):
    if len(jax.devices()) < SHARDS:
        pytest.skip(f"needs {SHARDS} devices (JAX started before this module set XLA_FLAGS): run this file alone")
    report = communication.communication_report(BATCH, VOCAB, SHARDS)
    benchmark.extra_info.update(report)
    print(
        f"\nvocab-parallel sample, B={BATCH} V={VOCAB} on {SHARDS} shards, per device per call: "
        f"{report['fixed_bytes']} B + {report['per_pass_bytes']} B per search pass "
        f"(at most {report['bound_bytes']} B) in {report['collectives']} collectives, largest dimension "
        f"{report['largest_dim']}; an all-gather of the float32 logits: {report['gather_operand_bytes']} B in, "
        f"{report['gather_result_bytes']} B out ({report['gather_operand_bytes'] / report['bound_bytes']:.0f}x "
        "the bound)"
    )
    assert report["largest_dim"] <= max(BATCH, SHARDS)
    assert report["bound_bytes"] * 10 < report["gather_operand_bytes"]

    mesh = Mesh(np.array(jax.devices()[:SHARDS]), ("tp",))
    logits = jax.device_put(
        jax.random.normal(jax.random.key(0), (BATCH, VOCAB)) * 3, NamedSharding(mesh, P(None, "tp"))
    )
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    history = jax.random.randint(jax.random.key(1), (BATCH, 512), 0, VOCAB)
    keys = jax.random.split(jax.random.key(2), BATCH)

    def run():
        return jax.block_until_ready(sample(logits, params, keys, history=history, mesh=mesh, vocab_axis="tp"))

    run()  # compile outside the timing
    benchmark.group = f"vocab-parallel B={BATCH} V={VOCAB} {SHARDS} shards"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
