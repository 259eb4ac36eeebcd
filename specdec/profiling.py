"""NVTX ranges for Nsight: named spans around the engine's stages and kernel launches.

Off unless `SPECDEC_NVTX=1` and CUDA is available; when off, `nvtx_range` returns a shared
do-nothing context manager, so the hot path pays one dictionary lookup.
"""

import contextlib
import os

import torch

_NULL = contextlib.nullcontext()


def enabled() -> bool:
    return os.environ.get("SPECDEC_NVTX") == "1" and torch.cuda.is_available()


def nvtx_range(name: str):
    if not enabled():
        return _NULL
    return torch.cuda.nvtx.range(name)
