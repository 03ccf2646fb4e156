"""The dispatcher: which implementation "auto" picks, and what it refuses."""

import pytest

from vsampler import available_impls, resolve_impl
from vsampler.core import registry


@pytest.mark.parametrize(("backend", "want"), [("tpu", "pallas"), ("gpu", "xla"), ("cpu", "xla")])
def test_auto_picks_the_fast_path_for_the_backend(backend, want):
    assert resolve_impl("auto", backend) == want


def test_every_named_impl_is_available_and_unknown_ones_are_refused():
    assert {"reference", "xla", "pallas", "pallas-triton", "pallas-chunked"} <= set(available_impls())
    for name in ("reference", "xla", "pallas", "pallas-triton", "pallas-chunked"):
        assert resolve_impl(name) == name
    with pytest.raises(ValueError, match="impl must be one of") as err:
        resolve_impl("triton")
    assert all(repr(name) in str(err.value) for name in available_impls())  # every name it accepts


def test_runs_from_a_source_checkout_without_install():
    """A machine that can install nothing (the GPU hosts) runs the package with PYTHONPATH=<checkout>:
    kernels/ must still import as vsampler.kernels. `-S` skips the site .pth files (the editable install)."""
    import os
    import site
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


@pytest.mark.parametrize("impl", list(registry.names()))
def test_sample_step_applies_the_eos_rule_the_same_on_every_impl(impl):
    """Spec stage 8 through the step entry: finished rows emit pad and stay finished; a row that samples
    an EOS id comes back finished with the EOS token; running rows get `sample`'s token."""
    import jax
    import numpy as np

    from vsampler import SamplingParams, sample, sample_step

    logits = jax.random.normal(jax.random.key(0), (4, 300)) * 3
    logits = logits.at[1, 17].set(50.0).at[2, 17].set(50.0)  # rows 1 and 2 surely pick token 17
    params = SamplingParams(temperature=np.array([0.0, 0.0, 1.0, 0.7]), top_k=np.array([0, 5, 0, 40]))
    key = jax.random.key(3)
    finished = np.array([False, False, True, False])
    tokens, done = sample_step(
        logits, params, key, finished=finished, pad_token_id=299, eos_token_id=[17, 250], impl=impl
    )
    plain = sample(logits, params, key, impl="reference")
    assert np.asarray(tokens).tolist() == [int(plain[0]), 17, 299, int(plain[3])]
    assert np.asarray(done).tolist() == [int(plain[0]) in (17, 250), True, True, int(plain[3]) in (17, 250)]
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        sample_step(logits, params, key, finished=finished, pad_token_id=-1, impl=impl)
