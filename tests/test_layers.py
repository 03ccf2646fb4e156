"""The package's layers import only the layers below them: core < kernels < impls < engine < testing <
tools (the top-level `vsampler/__init__.py` is the facade that re-exports them; only tools, the top
layer, may import it). Read from the sources'
import statements, function-level imports included, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "kernels", "impls", "engine", "testing", "tools")


def _layer(module: str) -> str | None:
    """The layer of a dotted module name under vsampler (None: not one of the package's layers)."""
    parts = module.split(".")
    if parts[0] != "vsampler" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _sources() -> list[tuple[str, Path]]:
    out = [(f"vsampler.kernels.{p.stem}", p) for p in sorted((ROOT / "kernels").glob("*.py"))]
    for layer in LAYERS:
        if layer != "kernels":
            folder = ROOT / "vsampler" / layer
            out += [
                (f"vsampler.{layer}.{'.'.join(p.relative_to(folder).with_suffix('').parts)}", p)
                for p in sorted(folder.rglob("*.py"))
            ]
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from vsampler import tools` names a layer too
            if node.module == "vsampler":
                found += [(node.lineno, f"vsampler.{alias.name}") for alias in node.names]
    return found


def test_every_layer_is_a_package_and_holds_modules():
    assert [(layer, any(m.startswith(f"vsampler.{layer}.") for m, _ in _sources())) for layer in LAYERS] == [
        (layer, True) for layer in LAYERS
    ]


@pytest.mark.parametrize("module,path", _sources(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down_only(module, path):
    own = LAYERS.index(_layer(module))
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {name} ({_layer(name)} is above {LAYERS[own]})"
        for line, name in _imports(path)
        if _layer(name) is not None and LAYERS.index(_layer(name)) > own
    ]
    # the facade imports every layer: only the top one may import it
    facade = [
        f"{path.relative_to(ROOT)}:{line} imports the vsampler facade (only {LAYERS[-1]} may)"
        for line, name in _imports(path)
        if name == "vsampler" and LAYERS[own] != LAYERS[-1]
    ]
    assert not upward and not facade, "\n".join(upward + facade)
