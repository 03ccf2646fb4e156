import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices for the mesh tests (set before jax starts); single-device code uses device 0
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import hypothesis

hypothesis.settings.register_profile("vsampler", deadline=None, max_examples=60, print_blob=True)
hypothesis.settings.load_profile("vsampler")


import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module compiles its own shapes: drop them afterwards so one long CI process does not
    accumulate every executable of the suite."""
    yield
    jax.clear_caches()
