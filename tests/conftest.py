import os

# Kernels run on CPU only through Triton's interpreter, which must be chosen before triton loads.
if not os.environ.get("SPECDEC_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and os.environ.get("SPECDEC_TEST_CUDA") else "cpu"


def _poisoned():
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-(2**30) if t.dtype.is_signed else 255)
        return t

    return empty


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty output starts as NaN (or a huge negative int): unwritten outputs fail."""
    monkeypatch.setattr(torch, "empty", _poisoned())
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
