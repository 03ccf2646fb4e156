"""64-bit mode (`jax_enable_x64`, as many JAX users run): every public entry works and gives the same
tokens, log-probs and warped logits as in the default 32-bit mode, on every implementation.

x64 is a process-wide switch: it runs in subprocesses (the cases' two sides, a slice of the suite), so it
cannot leak into the other tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import x64_cases
from pytest_subprocess import failure, run_pytest

TESTS = Path(__file__).parent


def _x64_env() -> dict[str, str]:
    return {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def _cases_in_a_fresh_process(out: Path, x64: bool) -> subprocess.Popen:
    """`x64_cases.py` writing `run()` to `out`, in its own process: both sides start alike (the same
    flags and compile policy, nothing compiled before, no persistent cache), and run side by side."""
    env = {k: v for k, v in _x64_env().items() if x64 or k != "JAX_ENABLE_X64"}
    env["JAX_COMPILATION_CACHE_DIR"] = ""
    return subprocess.Popen(
        [sys.executable, str(TESTS / "x64_cases.py"), str(out)], env=env, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.interpret
def test_every_public_entry_gives_the_same_results_with_x64_on(tmp_path):
    sides = {x64: _cases_in_a_fresh_process(tmp_path / f"x64_{x64}.npz", x64) for x64 in (True, False)}
    results = {}
    for x64, process in sides.items():
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr[-4000:]
        with np.load(tmp_path / f"x64_{x64}.npz") as saved:
            results[x64] = dict(saved)
    on, off = results[True], results[False]
    assert on.pop(x64_cases.X64_KEY) and not off.pop(x64_cases.X64_KEY)  # each side ran in its mode
    assert sorted(on) == sorted(off)
    for name, expected in off.items():
        assert on[name].dtype == expected.dtype, name  # int32 tokens, float32 values: no widening
        np.testing.assert_array_equal(on[name], expected, err_msg=name)


@pytest.mark.slow
def test_a_slice_of_the_suite_passes_with_x64_on():
    """The parameter, edge-case and hardening modules (reference and xla) under x64."""
    modules = ["test_params.py", "test_reference_edges.py", "test_hardening_params.py", "test_hardening_logits.py"]
    assert all((TESTS / m).exists() for m in modules), "a module of the x64 slice moved"
    done = run_pytest(["-m", "not interpret", *[str(TESTS / m) for m in modules]], _x64_env())
    assert done.returncode == 0, failure(done)
