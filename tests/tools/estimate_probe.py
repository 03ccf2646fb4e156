"""Run as a script by tests/tools/test_estimate.py, with libtpu's static profile flag pointing at argv[1]: a
small Pallas kernel whose cost is known in shape (a count pass over an (8, 16384) VMEM block, repeated by
a loop), compiled deviceless for v5e with a fixed-trip loop of each trip count in argv[2:] and once with a
data-dependent `while_loop`; prints {"fori N": cycles, ..., "while": cycles} as JSON."""

import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vsampler.tools.compile_check import tpu_device
from vsampler.tools.estimate import read_static_profile


def counting_kernel(trips: int | None):
    def kernel(x_ref, o_ref):
        x = x_ref[...]

        def count_pass(acc):
            return acc + jnp.sum(jnp.where(x >= acc, 1.0, 0.0), axis=-1, keepdims=True)

        init = jnp.zeros((8, 1), jnp.float32)
        if trips is None:  # data-dependent: the model counts it as 0 trips
            acc = lax.while_loop(lambda a: a[0, 0] < x[0, 0], count_pass, init)
        else:
            acc = lax.fori_loop(0, trips, lambda _, a: count_pass(a), init)
        o_ref[...] = jnp.broadcast_to(acc, o_ref.shape)

    return lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32))(x)


def main() -> None:
    directory, counts = sys.argv[1], [int(n) for n in sys.argv[2:]]
    device = tpu_device("v5e")
    arg = jax.ShapeDtypeStruct((8, 16384), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    out = {}
    for name, trips in [*((f"fori {n}", n) for n in counts), ("while", None)]:
        for path in os.listdir(directory):
            os.unlink(os.path.join(directory, path))
        with jax.default_device(device):
            jax.jit(counting_kernel(trips)).trace(arg).lower(lowering_platforms=("tpu",)).compile()
        out[name] = sum(read_static_profile(directory).values())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
