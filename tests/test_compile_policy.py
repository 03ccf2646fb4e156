"""The suite's compile policy (tests/compile_policy.py): what it changes, and only that."""

from __future__ import annotations

import os

import compile_policy
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src import compiler

needs_the_policy = pytest.mark.skipif(not compile_policy.enabled(), reason="VSAMPLER_TEST_COMPILE=default")


def _module(fn, *args):
    return jax.jit(fn).lower(*args).compiler_ir()


@needs_the_policy
def test_the_flags_reach_every_process_the_tests_start():
    flags = os.environ["XLA_FLAGS"].split()
    assert all(flag in flags for flag in compile_policy.FLAGS)
    compile_policy.set_flags()  # again: nothing added twice
    assert os.environ["XLA_FLAGS"].split() == flags


def test_the_largest_tensor_counts_results_inside_loops():
    def program(x):
        inside = lax.fori_loop(0, 3, lambda i, total: total + jnp.ones((5000, 1000)).sum(), 0.0)
        return jnp.sort(x) * 2, inside

    assert compile_policy.largest_tensor(_module(program, jnp.arange(10.0))) == 5000 * 1000


def test_small_cpu_programs_compile_unoptimised_and_large_ones_with_the_fusion_emitters():
    small = _module(lambda x: x * 2, jax.ShapeDtypeStruct((compile_policy.SMALL_ELEMENTS - 1,), np.float32))
    large = _module(lambda x: x * 2, jax.ShapeDtypeStruct((compile_policy.SMALL_ELEMENTS,), np.float32))
    assert compile_policy.overrides("cpu", small) == {"xla_backend_optimization_level": 0}
    assert compile_policy.overrides("cpu", large) == {"xla_cpu_use_fusion_emitters": True}
    assert compile_policy.overrides("tpu", small) == {}  # deviceless TPU compiles: libtpu's defaults


@needs_the_policy
def test_it_is_installed_once_and_programs_give_their_results():
    assert getattr(compiler.compile_or_get_cached, "_vsampler_policy", False)  # by tests/conftest.py
    assert not compile_policy.install()
    x = np.arange(1000, dtype=np.float32)
    assert float(jax.jit(lambda v: (v * 3).sum() + 1)(x)) == float((x * 3).sum() + 1)
