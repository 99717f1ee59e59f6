"""The patch index's declared per-backend caches: the one place a backend keeps per-batch state."""
import pytest
import torch

from ctssl.sparse import PatchIndex, backend_status, get_backend
from ctssl.sparse.modules import Conv2d, MaxPool2d


def test_backend_cache_is_one_dict_per_backend_and_index():
    active = torch.ones(1, 2, 2, dtype=torch.bool)
    a, b = PatchIndex(active), PatchIndex(active)
    cache = a.backend_cache("triton")
    assert cache == {} and a.backend_cache("triton") is cache
    assert a.backend_cache("cuda") is not cache
    assert b.backend_cache("triton") is not cache


def _cpu_backends():
    """Backends that keep per-batch tables and run here (the cuda backend through its CPU twin)."""
    status = backend_status()
    params = []
    for name in ("triton", "spconv"):
        reason = status[name]
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    from ctssl.cuda_ops import runtime
    reason = runtime.missing_reason()
    params.append(pytest.param("cuda", marks=pytest.mark.skipif(reason is not None, reason=f"cuda: {reason}")))
    return params


@pytest.mark.parametrize("name", _cpu_backends())
def test_backends_keep_their_tables_in_their_declared_cache(name):
    if name == "cuda":
        from ..cuda.helpers import CpuTwin
        backend = CpuTwin()
    else:
        backend = get_backend(name, "cpu")
    active = torch.tensor([[[True, False], [True, True]]])
    index = PatchIndex(active)
    x = backend.sparse_input(torch.randn(1, 3, 64, 64), index)
    with torch.no_grad():
        MaxPool2d(3, 2, 1)(Conv2d(3, 4, 3, padding=1, bias=False)(x))
    assert index.backend_cache(name), f"{name} cached nothing"
    assert set(vars(index)) == set(vars(PatchIndex(active)))  # no attribute of its own
