"""The one dispatch rule shared by every op in `kernels/`.

CUDA tensors run the Triton kernel; anything else runs the PyTorch reference.
`SPECDEC_KERNELS=triton` or `SPECDEC_KERNELS=torch` forces one side for A/B comparisons
(Triton on CPU tensors needs `TRITON_INTERPRET=1`, set before triton is imported).
"""

import contextlib
import os

import torch

_CHOICES = ("auto", "triton", "torch")


def use_triton(t: torch.Tensor) -> bool:
    choice = os.environ.get("SPECDEC_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"SPECDEC_KERNELS={choice!r}: expected one of {_CHOICES}")
    if choice == "torch":
        return False
    if choice == "triton":
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("SPECDEC_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return t.is_cuda


_NULL = contextlib.nullcontext()


def nvtx_range(name: str):
    """An NVTX range for Nsight when `SPECDEC_NVTX=1` and CUDA is available; else a shared no-op."""
    if os.environ.get("SPECDEC_NVTX") != "1" or not torch.cuda.is_available():
        return _NULL
    return torch.cuda.nvtx.range(name)
