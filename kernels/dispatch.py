"""The one dispatch rule shared by every op in `kernels/`.

CUDA tensors run the Triton kernel; anything else runs the PyTorch reference.
`SPECDEC_KERNELS=triton` or `SPECDEC_KERNELS=torch` forces one side for A/B comparisons
(Triton on CPU tensors needs `TRITON_INTERPRET=1`, set before triton is imported).
"""

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
