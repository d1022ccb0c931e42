"""Triton kernels of the fused recurrence (installed as mmrnn_ext.kernels)."""
