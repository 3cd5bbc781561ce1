"""Triton kernels for patchdpo_fast (installed as ``patchdpo_fast.kernels``)."""
