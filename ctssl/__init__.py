"""ctssl: fast SparK pre-training for CT on a sparse-convolution engine, and the few-label study around it."""
__version__ = "0.1.0"
