import json
import os
from pathlib import Path

import compile_policy

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices for the mesh tests (set before jax starts); single-device code uses device 0
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# how XLA:CPU compiles the suite's programs (tests/compile_policy.py): less effort, the same programs
compile_policy.set_flags()
# jax's persistent compilation cache, shared by both workers, every module and the subprocesses the tests
# start: the suite drops its compiled programs after each module and slow test (the memory-mapping bound
# below), and a program compiled again is then read back from disk. Set `JAX_COMPILATION_CACHE_DIR=`
# (empty) to compile everything afresh.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("vsampler", deadline=None, max_examples=60, print_blob=True)
hypothesis.settings.load_profile("vsampler")


import jax  # noqa: E402
import pytest  # noqa: E402

from vsampler.core import registry  # noqa: E402
from vsampler.tools import verification  # noqa: E402

compile_policy.install()

# Cost groups (pyproject.toml's markers) that follow from what a test runs, so a registered kernel
# variant brings its marks: `interpret` for every test of an impl that runs the fused kernel (interpret
# mode off TPU / GPU) or of a kernel variant, `tpu_compile` for the deviceless-compile module.
KERNEL_IMPLS = frozenset(registry.names(kernel=True))
if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers already fill the cores: one call at a time
    verification.CHECK_WORKERS = 1
INTERPRET_MODULES = frozenset({"test_kernel_variants"})
TPU_COMPILE_MODULES = frozenset({"test_tpu_compile"})

# What each test cost when last run (`tests/durations.json`, seconds by node id, on 2 cores; refresh it
# with `pytest -m 'slow or not slow' -n 2 --dist loadgroup --store-durations`, then a plain `pytest
# --store-durations`, which records the quick loop's tests without the programs the costly ones
# compiled before them, so that those it made costly leave it too). A test recorded above
# `QUICK_SECONDS` is marked `costly`, which the default run skips (pyproject.toml's addopts): the default
# `pytest` is the quick loop, every test below the bound; CI's `-m 'slow or not slow'` runs all of them.
# A test the file does not know yet (a new one) runs by default until the file is refreshed; a test
# marked `quick` (each implementation's first grid case) runs by default whatever it cost.
DURATIONS_PATH = Path(__file__).with_name("durations.json")
QUICK_SECONDS = 0.75
DURATIONS: dict[str, float] = json.loads(DURATIONS_PATH.read_text()) if DURATIONS_PATH.exists() else {}


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"write each test's seconds (setup, call and teardown) to {DURATIONS_PATH.name}, merged with "
        "the entries of tests this run did not run",
    )


def pytest_collection_modifyitems(items):
    # the slow tests first (a stable sort: otherwise in collection order): under `-n 2 --dist loadgroup`
    # the workers take the long ones early and the many short ones last, so neither waits on the other
    # at the end (longest first); pytest-xdist then orders the groups by size, the slow grid's first.
    # (Not by recorded cost: that interleaves the modules, and each module's fixtures and compiled
    # programs are then set up again every time its tests resume: a CI run slowed by it was stopped.)
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        if DURATIONS.get(item.nodeid, 0.0) > QUICK_SECONDS and item.get_closest_marker("quick") is None:
            item.add_marker(pytest.mark.costly)
        module = getattr(item.module, "__name__", "")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        impl = params.get("impl")
        if module in INTERPRET_MODULES or "variant" in params or (isinstance(impl, str) and impl in KERNEL_IMPLS):
            item.add_marker(pytest.mark.interpret)
        if module in TPU_COMPILE_MODULES:
            item.add_marker(pytest.mark.tpu_compile)


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
    such tests in one process, reproducible with the XLA path's slow grid alone). Drop them after
    each slow test: its shapes are its own. (The verification caches hold arrays, never executables.)"""
    yield
    if request.node.get_closest_marker("slow") is not None:
        jax.clear_caches()


# Whatever the tests compile, a worker drops its compiled programs when its memory mappings pass
# `verification.MAPPINGS_BOUND` (vm.max_map_count: past it XLA's compiler fails or crashes), and reports
# the most it held.
_mappings = {"peak": 0, "releases": 0}


@pytest.fixture(autouse=True)
def _bound_the_memory_mappings():
    yield
    held = verification.mappings()
    _mappings["peak"] = max(_mappings["peak"], held)
    _mappings["releases"] += verification.bound_mappings(held)


def pytest_terminal_summary(terminalreporter):
    """The process's memory mappings, and how much `vsampler.tools.verification.check` reused (each reference
    case is computed once per process). Under pytest-xdist this is the controller's: workers run apart."""
    lines = []
    if _mappings["peak"]:
        lines.append(
            f"memory mappings: at most {_mappings['peak']:,} after a test in this process "
            f"(compiled programs dropped {_mappings['releases']} times)"
        )
    for name, cache in (("reference", verification.REFERENCE_CACHE), ("inputs", verification.INPUT_CACHE)):
        if cache.hits or cache.misses:
            lines.append(
                f"verification {name} cache: {cache.hits} hits, {cache.misses} misses, "
                f"{len(cache)} entries, {cache.nbytes / 2**20:.0f} MiB held (bound {cache.max_bytes / 2**20:.0f} MiB)"
            )
    if lines:
        terminalreporter.write_sep("-", "verification caches and memory mappings")
        for line in lines:
            terminalreporter.write_line(line)


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    # under pytest-xdist the controller receives every worker's reports
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if not session.config.getoption("store_durations") or hasattr(session.config, "workerinput"):
        return
    merged = {**DURATIONS, **{nodeid: round(seconds, 2) for nodeid, seconds in _durations.items()}}
    DURATIONS_PATH.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")
