"""ctssl: fast SparK pre-training for CT on a sparse-convolution engine, and the few-label study around it."""
import sys

from . import _source_tree

__version__ = "0.1.0"

_source_tree.mount_kernels(sys.modules[__name__])  # a checkout's ctssl finds ../kernels as ctssl.kernels
