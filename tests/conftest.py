"""pytest configuration for the convcore test suite.

Hypothesis profiles (select with the HYPOTHESIS_PROFILE environment
variable):

* ``quick`` (default): 30 examples per property, no deadline.
* ``ci``: 150 examples, derandomized (reproducible in CI logs).
* ``thorough``: 1000 examples, for occasional soak runs.
"""

import os
import sys

import pytest

from hypothesis import HealthCheck, settings

# make ``import reference`` / ``import _helpers`` work regardless of the
# pytest import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the backend fixtures: `device` (cpu, shim, gpu) and `gpu_device` (shim, gpu)
from _backends_fixture import device, gpu_device  # noqa: E402,F401

_common = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("quick", max_examples=30, **_common)
settings.register_profile("ci", max_examples=150, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))


def pytest_configure(config):
    # also declared in pyproject.toml; repeating them here is harmless and
    # keeps the suite usable with --strict-markers from any rootdir
    config.addinivalue_line("markers", "slow: takes more than ~2 s")
    config.addinivalue_line("markers", "gpu: needs a GPU")


def pytest_report_header(config):
    return f"hypothesis profile: {getattr(settings, '_current_profile', '?')}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _cuda_shim_summary(terminalreporter)
    helpers = sys.modules.get("_helpers")
    errs = getattr(helpers, "PARITY_ERRORS", None)
    if not errs:
        return
    terminalreporter.section("convcore vs torch: max scaled relative error")
    for key in sorted(errs):
        terminalreporter.write_line(f"{key:<45s} {errs[key]:.3e}")


@pytest.fixture(autouse=True)
def _thread_count_restored():
    """Each test leaves convcore's thread count as it found it: the
    benchmarks' runs set it (bench --zoo --threads 1 in test_bench_zoo.py
    left every later test on one thread)."""
    import convcore
    before = convcore.get_num_threads()
    yield
    if convcore.get_num_threads() != before:
        convcore.set_num_threads(before)


@pytest.fixture(scope="module")
def one_core_thread():
    """Finite differences make thousands of tiny calls; one core thread keeps
    them fast on a busy machine (results are identical across thread counts,
    which test_threads.py checks)."""
    import convcore
    old = convcore.get_num_threads()
    convcore.set_num_threads(1)
    yield
    convcore.set_num_threads(old)


def _cuda_shim_summary(terminalreporter):
    """Per-kernel counts of the CUDA kernels run on the CPU shim
    (tests/test_cuda_shim.py)."""
    shim = sys.modules.get("cuda_shim.shim")
    be = getattr(shim, "ACTIVE", None)
    if be is None or not be.tests:
        return
    terminalreporter.section("CUDA kernels on the CPU shim: tests / launches per kernel")
    for name in sorted(be.tests):
        terminalreporter.write_line(f"{name:<24s} {len(be.tests[name]):4d} tests "
                                    f"{be.launches[name]:6d} launches")
