"""The triton backend through the registry: availability, device checks, modes, input validation."""
import pytest
import torch

from ctssl.kernels import runtime
from ctssl.sparse import get_backend
from ctssl.sparse.backends.triton import TritonBackend
from ctssl.sparse.modules import Conv2d, DropPath

from .util import compare_module, needs_triton, sparse_at

pytestmark = needs_triton


def test_registry_serves_the_triton_backend():
    assert TritonBackend().unavailable_reason() is None
    be = get_backend("triton")
    assert isinstance(be, TritonBackend) and be.name == "triton"


@pytest.mark.skipif(not runtime.INTERPRET, reason="checks the interpreter's device rules")
def test_interpreter_runs_on_cpu_and_refuses_cuda_tensors():
    be = TritonBackend()
    be.check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="triton.*interpreter"):
        be.check_device(torch.device("cuda"))
    with pytest.raises(ValueError, match="triton"):
        runtime.check_tensor("x", torch.zeros(2, 2, device="meta"))


def test_wrappers_name_the_bad_argument():
    from ctssl.kernels.conv import ConvGeometry, conv_forward
    geom = ConvGeometry(32, (3, 3), 1, (1, 1), (1, 1))
    x = torch.zeros(1024, 3)
    nbr = torch.full((9,), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="x has 1024 rows, expected 2 patches"):
        conv_forward(x, torch.zeros(9, 3, 4), None, nbr, geom, 2)
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        conv_forward(x, torch.zeros(9, 3, 4, dtype=torch.float16), None, nbr, geom, 1)
    with pytest.raises(ValueError, match="weight taps have shape"):
        conv_forward(x, torch.zeros(9, 4, 4), None, nbr, geom, 1)
    with pytest.raises(ValueError, match="x must be contiguous"):
        conv_forward(torch.zeros(3, 1024).t(), torch.zeros(9, 3, 4), None, nbr, geom, 1)
    with pytest.raises(TypeError, match="neighbours has dtype torch.int64"):
        conv_forward(x, torch.zeros(9, 3, 4), None, nbr.long(), geom, 1)


def test_conv_dtype_mismatch_outside_autocast_is_refused():
    x = sparse_at(torch.randn(1, 3, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool), "triton")
    with pytest.raises(TypeError, match="input is torch.float32 but its weight is torch.float16"):
        Conv2d(3, 4, 3, 1, 1).half()(x)


def test_drop_path_between_bn_and_add_matches_dense(rng):
    """scale_samples reads a pending BN's values: the BN is applied alone, then scaled, then added."""
    from .test_batchnorm import ConvBnBlock

    class Block(ConvBnBlock):
        def __init__(self):
            super().__init__(5, "identity")
            self.drop = DropPath(0.5)

        def forward(self, x):
            torch.manual_seed(0)  # the same kept images in both backends
            return self.relu(x + self.drop(self.bn1(self.conv1(x))))

    compare_module(Block, 5, 4, rng, batch=4)
