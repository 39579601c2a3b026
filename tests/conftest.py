"""Test harness: CPU-interpreter Triton, markers, shared fixtures.

Markers:
    gpu       needs a CUDA device (skipped otherwise)
    cuda_ext  needs packdit._C built with CUDA and a CUDA device
    slow      long-running; skipped unless --runslow or PACKDIT_SLOW=1
"""

import functools
import os

import torch

# Triton kernels run under the interpreter on machines without a GPU; this must be set before
# triton is first imported, which is why it happens here at conftest import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests run a fixed example budget in CI (the Triton interpreter is slow); PACKDIT_SLOW=1 runs more.
settings.register_profile("ci", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("slow" if os.environ.get("PACKDIT_SLOW") == "1" else "ci")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "cuda_ext: needs packdit._C built with CUDA and a CUDA device")
    config.addinivalue_line("markers", "slow: long-running; enable with --runslow or PACKDIT_SLOW=1")


@functools.cache
def _cuda_ext_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from packdit import _ext

    if not _ext.has_cuda_ext():
        return "packdit._C was built without CUDA (or is missing)"
    return None


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("PACKDIT_SLOW") == "1"
    no_gpu = None if torch.cuda.is_available() else "no CUDA device"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: enable with --runslow or PACKDIT_SLOW=1"))
        if "gpu" in item.keywords and no_gpu:
            item.add_marker(pytest.mark.skip(reason=no_gpu))
        if "cuda_ext" in item.keywords:
            reason = _cuda_ext_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
