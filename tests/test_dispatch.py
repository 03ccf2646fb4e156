"""The dispatcher: which implementation "auto" picks, and what it refuses."""

import pytest

from vsampler import available_impls, resolve_impl


@pytest.mark.parametrize(("backend", "want"), [("tpu", "pallas"), ("gpu", "xla"), ("cpu", "xla")])
def test_auto_picks_the_fast_path_for_the_backend(backend, want):
    assert resolve_impl("auto", backend) == want


def test_every_named_impl_is_available_and_unknown_ones_are_refused():
    assert {"reference", "xla", "pallas", "pallas-triton"} <= set(available_impls())
    for name in ("reference", "xla", "pallas", "pallas-triton"):
        assert resolve_impl(name) == name
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("triton")


def test_runs_from_a_source_checkout_without_install():
    """A machine that can install nothing (the GPU hosts) runs the package with PYTHONPATH=<checkout>:
    kernels/ must still import as vsampler.kernels. `-S` skips the site .pth files (the editable install)."""
    import os
    import site
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path[:0] = {[root, *site.getsitepackages()]!r}\n"
        "import vsampler.kernels.sampler_triton as k, vsampler\n"
        "print(k.__file__); print(vsampler.available_impls())\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.splitlines()[0] == os.path.join(root, "kernels", "sampler_triton.py")
    assert "pallas" in out.stdout.splitlines()[1]
