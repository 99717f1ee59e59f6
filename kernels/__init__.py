"""Triton kernels of the ``triton`` backend, installed as ``ctssl.kernels`` (never a top-level ``kernels``).

One op family per module, each kernel next to the wrapper that checks its inputs
and the ``torch.autograd.Function`` that wires forward and backward:

- ``conv``: implicit-GEMM sparse conv through the neighbour table (forward with
  fused BN statistics, input gradient by parity class, weight gradient);
- ``batchnorm``: statistics, fused ``relu(bn [+ bn | + residual])`` and backward;
- ``pool``: max pool with a gather backward;
- ``layout``: dense <-> packed rows, densify with a mask token;
- ``reduce``: deterministic column sums;
- ``runtime``: interpreter switch, launch configs (autotuned on GPU), input checks.

Set ``TRITON_INTERPRET=1`` before importing to run on CPU tensors (tests only).
"""
