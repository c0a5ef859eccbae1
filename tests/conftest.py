"""Shared test helpers: the device under test, markers, and Triton's interpreter switch.

MISA_TEST_DEVICE overrides the device (default: cuda when a GPU is visible, else cpu). Nothing here
probes a device at import time; pytest_configure runs before any test module imports triton.
"""

import os

import pytest
import torch

# The chunk (tables.py) is shrunk under the interpreter so that "larger than one chunk"
# stays a few thousand elements (the interpreter is slow).
INTERPRETER_CHUNK = "1024"


def pytest_configure(config):
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ.setdefault("MISA_CHUNK", INTERPRETER_CHUNK)
    os.environ.pop("MISA_KERNELS_BACKEND", None)
    # Tests run the default Triton launch config, so that a GPU run does not spend a minute tuning every
    # kernel mode; test_triton_tune.py runs the tuning itself and every candidate config.
    os.environ.setdefault("MISA_TRITON_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def test_device() -> torch.device:
    """The device under test, spelled as its tensors report it (cuda:0, not cuda; cpu, not cpu:0), so
    that `tensor.device == test_device()` holds for tensors made on it."""
    from misa_kernels.checks import canonical_device

    name = os.environ.get("MISA_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return canonical_device(name)


test_device.__test__ = False  # a helper, not a test


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def runnable_backends(device: torch.device):
    """Backends that can run on `device` in this process."""
    import misa_kernels

    return misa_kernels.available_backends(device)
