"""One process of the 2-process test (tests/engine/test_multihost.py): 4 CPU devices of its own, gloo collectives.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON

Runs, on meshes over every process's devices, the vocabulary-parallel sampler (the vocabulary split over
all 8 devices, so across the processes) and a short generation (dp=2 x tp=4), and writes the tokens
(gathered to every process) to OUT_JSON. With NUM_PROCESSES=1 it is the single-process run to compare
against (8 local devices, the same mesh shape).
"""

from __future__ import annotations

import json
import os
import sys

process_id, num_processes, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compile_policy  # noqa: E402  (the suite's compile policy, as tests/conftest.py sets it up)

compile_policy.set_flags()

import jax  # noqa: E402

compile_policy.install()

if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
    )

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from vsampler import SamplingParams, sample, vInference, vInferenceConfig, vInferencePreCompileConfig  # noqa: E402
from vsampler.engine.partitioning import create_mesh  # noqa: E402
from vsampler.testing.tiny_decoder import TinyDecoder, TinyDecoderConfig  # noqa: E402

assert jax.device_count() == 8, jax.devices()

# the vocabulary-parallel sampler, the vocabulary over all 8 devices of both processes
vocab_mesh = create_mesh(tp=8)
host_logits = np.random.default_rng(2).normal(size=(4, 32000)).astype(np.float32) * 3
logits = jax.make_array_from_callback(
    host_logits.shape, NamedSharding(vocab_mesh, P(None, "tp")), lambda index: host_logits[index]
)
sampler_params = SamplingParams(
    temperature=np.array([0.0, 0.8, 1.0, 0.7], np.float32),
    top_k=np.array([0, 50, 0, 0]),
    top_p=np.array([1.0, 0.9, 0.95, 1.0], np.float32),
    min_p=0.02,
)
tokens = sample(logits, sampler_params, jax.random.key(3), mesh=vocab_mesh, vocab_axis="tp")
sampled = np.asarray(tokens.addressable_data(0)).tolist()
reference = np.asarray(sample(host_logits, sampler_params, jax.random.key(3), impl="reference")).tolist()

mesh = create_mesh(dp=2, tp=4)
model = TinyDecoder(TinyDecoderConfig(num_heads=8, num_kv_heads=4), rngs=nnx.Rngs(0))
params = SamplingParams(
    max_tokens=8,
    temperature=np.array([0.0, 1.0, 0.8, 1.2], np.float32),
    top_k=np.array([0, 30, 0, 0]),
    top_p=np.array([1.0, 1.0, 0.9, 1.0], np.float32),
)
engine = vInference(
    model,
    vInferenceConfig(max_new_tokens=8, streaming_chunks=4, eos_token_id=[3], pad_token_id=0, sampling_params=params),
    mesh=mesh,
)
engine.precompile(vInferencePreCompileConfig(batch_size=4, prefill_length=8))
prompts = np.random.default_rng(0).integers(1, 512, (4, 5)).astype(np.int32)
state = engine.generate_all(prompts, key=jax.random.key(11))
sequences = multihost_utils.process_allgather(state.sequences, tiled=True)
result = {
    "process_count": jax.process_count(),
    "sampled": sampled,
    "reference": reference,
    "sequences": np.asarray(sequences).tolist(),
}
with open(out_path, "w") as f:
    json.dump(result, f)
