"""NVTX ranges for Nsight (see kernels.dispatch.nvtx_range): off unless SPECDEC_NVTX=1 and CUDA."""

from kernels.dispatch import nvtx_range

__all__ = ["nvtx_range"]
