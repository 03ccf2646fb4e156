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
