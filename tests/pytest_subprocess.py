"""The suite's tests that run other tests in a fresh process (under x64, under XLA's defaults)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run_pytest(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m pytest -q ARGS` from the project's root in a process of its own with `env`: one process
    (no xdist), no cache written; its output captured."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)


def failure(done: subprocess.CompletedProcess) -> str:
    """What an assertion on `done` shows: the ends of its output."""
    return done.stdout[-4000:] + done.stderr[-2000:]
