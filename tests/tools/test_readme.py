"""Every Python block of the README runs as written: each section's blocks in order in a fresh process
(a block that continues the one before says so in the README), so nothing leaks in from the tests."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def sections() -> list[tuple[str, str]]:
    """(section heading, its Python blocks joined in order) for each README section with any."""
    out, heading, blocks = [], "", []
    for line_block in re.split(r"(?m)^(#{2,3} .*)$", README.read_text()):
        if re.match(r"#{2,3} ", line_block):
            if blocks:
                out.append((heading, "\n\n".join(blocks)))
            heading, blocks = line_block.strip("# ").strip(), []
        else:
            blocks += re.findall(r"```python\n(.*?)```", line_block, flags=re.S)
    if blocks:
        out.append((heading, "\n\n".join(blocks)))
    return out


# a section's blocks continue the section before when the README says "Continuing the example above"
SCRIPTS: list[tuple[str, str]] = []
for name, code in sections():
    if SCRIPTS and "Continuing the example above" in README.read_text().split(f"### {name}")[-1][:400]:
        previous_name, previous = SCRIPTS.pop()
        SCRIPTS.append((f"{previous_name} + {name}", previous + "\n\n" + code))
    else:
        SCRIPTS.append((name, code))


def test_the_readme_has_its_examples():
    assert len(SCRIPTS) >= 3 and sum(code.count("import") for _, code in SCRIPTS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), SCRIPTS, ids=[name for name, _ in SCRIPTS])
def test_each_readme_example_runs_as_written(name, code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a new user's shell has it
    env["JAX_PLATFORMS"] = "cpu"
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, f"{name}:\n{out.stderr[-3000:]}"
