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


@pytest.fixture(autouse=True)
def _release_compiled_programs_of_slow_tests(request):
    """The slow grid tests each compile several programs at serving sizes; a module of them kept every
    executable alive until XLA's CPU compiler crashed (a segfault / abort inside compilation after ~90
    such tests in one process, reproducible with tests/test_xla_vs_reference.py alone). Drop them after
    each slow test: its shapes are its own."""
    yield
    if request.node.get_closest_marker("slow") is not None:
        jax.clear_caches()


# Whatever the tests compile, a worker drops its compiled programs when its memory mappings pass
# `verification.MAPPINGS_BOUND` (vm.max_map_count: past it XLA's compiler fails or crashes), and reports
# the most it held.
_mappings = {"peak": 0, "releases": 0}


@pytest.fixture(autouse=True)
def _bound_the_memory_mappings():
    from vsampler import verification

    yield
    _mappings["peak"] = max(_mappings["peak"], verification.mappings())
    _mappings["releases"] += verification.bound_mappings()


def pytest_terminal_summary(terminalreporter):
    if _mappings["peak"]:
        terminalreporter.write_line(
            f"memory mappings: at most {_mappings['peak']:,} after a test in this process "
            f"(compiled programs dropped {_mappings['releases']} times)"
        )
