"""Two processes on localhost (4 CPU devices each, gloo collectives) through `jax.distributed`: the
vocabulary-parallel sampler and the sharded loop give the single-process tokens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multihost

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(num_processes: int, tmp_path) -> list[dict]:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    outs = [tmp_path / f"p{num_processes}_{i}.json" for i in range(num_processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(i), str(num_processes), port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.slow
def test_two_processes_give_the_single_process_tokens(tmp_path):
    (single,) = run_workers(1, tmp_path)
    pair = run_workers(2, tmp_path)
    assert single["process_count"] == 1 and all(r["process_count"] == 2 for r in pair)
    assert pair[0]["sequences"] == pair[1]["sequences"] == single["sequences"]
    assert pair[0]["sampled"] == pair[1]["sampled"] == single["sampled"] == single["reference"]
    assert len(set(map(tuple, single["sequences"]))) == 4  # the rows really differ
