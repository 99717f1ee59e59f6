"""Triton kernels of the `triton` backend, installed as ``ctssl.kernels`` (never a top-level ``kernels``)."""
