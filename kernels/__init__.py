"""Triton kernels, each beside its plain PyTorch reference (also the CPU path)."""
