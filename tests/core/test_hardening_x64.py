"""64-bit mode (`jax_enable_x64`, as many JAX users run): every public entry works and gives the same
tokens, log-probs and warped logits as in the default 32-bit mode, on every implementation.

x64 is a process-wide switch: it runs in a subprocess, so it cannot leak into the other tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import x64_cases

TESTS = Path(__file__).parent


def _x64_env() -> dict[str, str]:
    return {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


@pytest.mark.slow
@pytest.mark.interpret
def test_every_public_entry_gives_the_same_results_with_x64_on(tmp_path):
    out = tmp_path / "x64.npz"
    done = subprocess.run(
        [sys.executable, str(TESTS / "x64_cases.py"), str(out)], env=_x64_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(out) as on:
        on = dict(on)
    import jax

    assert not jax.config.jax_enable_x64  # this process stays 32-bit
    off = x64_cases.run()
    assert sorted(on) == sorted(off)
    for name, expected in off.items():
        assert on[name].dtype == expected.dtype, name  # int32 tokens, float32 values: no widening
        np.testing.assert_array_equal(on[name], expected, err_msg=name)


@pytest.mark.slow
def test_a_slice_of_the_suite_passes_with_x64_on():
    """The parameter, edge-case and hardening modules (reference and xla) under x64."""
    modules = ["test_params.py", "test_reference_edges.py", "test_hardening_params.py", "test_hardening_logits.py"]
    assert all((TESTS / m).exists() for m in modules), "a module of the x64 slice moved"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-m",
            "not interpret",
            *[str(TESTS / m) for m in modules],
        ],
        env=_x64_env(),
        capture_output=True,
        text=True,
        cwd=TESTS.parents[1],
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
