"""Setup for the Triton backend's tests.

On CPU the kernels run in Triton's interpreter, whose dots are numpy matmuls:
a multi-threaded OpenBLAS spin-waits on a busy machine and made them ~100x
slower here, so BLAS is limited to one thread for these tests.
"""
try:
    from threadpoolctl import threadpool_limits

    _BLAS_LIMIT = threadpool_limits(limits=1, user_api="blas")
except ImportError:  # threadpoolctl comes with scikit-learn; without it the tests are only slower
    _BLAS_LIMIT = None
