"""The ``cuda`` backend's operators: ``csrc/`` compiled into ``ctssl._C`` (``torch.ops.ctssl.*``), and here
one Python module per op family, shaped like ``ctssl.kernels`` for the Triton kernels.

Each family module holds, next to each other, the ``torch.autograd.Function`` that wires an
operator's forward and backward (both compiled, no host syncs) and its fake (meta) implementation
for FakeTensor / ``torch.compile``; ``runtime`` loads the extension once, says why when it cannot,
and registers the fakes:

- ``tables``: slot map and int32 neighbour tables (3x3, and radius r for wider halos), built once per batch
  (and radius) and cached on the index;
- ``layout``: ``pack_patches`` / ``densify`` (each other's adjoint);
- ``conv``: halo gather + cuDNN conv (k > 1, incl. ConvNeXt's depthwise 7x7 on radius-r halos), cuBLAS GEMM
  on the rows (1x1);
- ``batchnorm``: Welford statistics, apply with fused ReLU/ReLU6 and residual, two-pass backward;
- ``pool``: max pool (masked taps read 0, taps beyond the image skipped).

The Functions are device-agnostic (every operator also has a CPU loop, which the CPU tests compare
with the ``dense`` backend); ``ctssl.sparse.backends.cuda`` is the thin adapter that runs them on
CUDA tensors. Importing this package never needs the extension; calling an operator does.
"""
from .runtime import load, missing_reason, require

__all__ = ["load", "missing_reason", "require"]
