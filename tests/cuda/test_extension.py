"""The compiled extension: it loads (or says why not), its schemas exist, bad input gives clear errors."""
import pytest
import torch

from ctssl.cuda_ops import runtime
from ctssl.sparse import BackendUnavailableError, PatchIndex, get_backend
from ctssl.sparse.backends.cuda import CudaBackend

from .helpers import EXT_REASON, needs_ext

OPS = ["patch_tables", "neighbour_table", "pack_patches", "densify", "halo_gather", "halo_scatter", "masked_conv2d",
       "masked_conv2d_backward", "bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply",
       "max_pool2d", "max_pool2d_backward"]
assert sorted(OPS) == sorted(runtime.REQUIRED_OPS)


def test_missing_extension_or_gpu_is_explained():
    reason = CudaBackend().unavailable_reason()
    if EXT_REASON is not None:
        assert reason == EXT_REASON and "pip install --no-build-isolation" in reason
    elif not torch.cuda.is_available():
        assert "no CUDA GPU" in reason
    else:
        assert reason is None
    if reason is not None:
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
            get_backend("cuda")


def test_backend_refuses_cpu_tensors_naming_itself():
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors only.*backend='torch'"):
        CudaBackend().check_device(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend 'cuda'"):
        CudaBackend().sparse_input(torch.zeros(1, 3, 32, 32), PatchIndex(torch.ones(1, 1, 1, dtype=torch.bool)))


@needs_ext
def test_schemas_are_registered():
    assert runtime.load() is not None
    for name in OPS:
        schema = getattr(torch.ops.ctssl, name).default._schema
        assert str(schema).startswith(f"ctssl::{name}(")
    conv = str(torch.ops.ctssl.masked_conv2d.default._schema)
    assert "Tensor? bias" in conv and "int patch_side" in conv


def _table(N):
    return torch.full((N, 3, 3), -2, dtype=torch.int32)


@needs_ext
@pytest.mark.parametrize("call,match", [
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(16, 3, dtype=torch.int64), _table(1), 4, 1),
     r"halo_gather: argument 'rows' must be float32, float16, bfloat16 or float64"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(16, 3), _table(1).long(), 4, 1),
     r"halo_gather: argument 'neighbours' must have dtype Int"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(15, 3), _table(1), 4, 1),
     r"halo_gather: argument 'rows' has 15 rows but the neighbour table has 1 patches"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(3, 16).t(), _table(1), 4, 1),
     r"halo_gather: argument 'rows' must be contiguous"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(16, 3), _table(1), 4, 5),
     r"halo_gather: halo \(padding\) must be in \[0, radius \* patch_side = 1 \* 4\]"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(2, 3), torch.full((2, 5, 5), -2, dtype=torch.int32), 1, 3),
     r"halo_gather: halo \(padding\) must be in \[0, radius \* patch_side = 2 \* 1\].*ceil\(halo / patch_side\)"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(16, 3), torch.zeros(1, 2, 2, dtype=torch.int32), 4, 1),
     r"halo_gather: argument 'neighbours' must have shape \(N, 2r\+1, 2r\+1\)"),
    (lambda: torch.ops.ctssl.max_pool2d(torch.zeros(16, 3), torch.zeros(1, 5, 5, dtype=torch.int32), 4, 3, 2, 1),
     r"max_pool2d: argument 'neighbours' must have shape \(N, 3, 3\) \(the table of radius 1\)"),
    (lambda: torch.ops.ctssl.masked_conv2d(torch.zeros(1, 3), _table(1), torch.zeros(3, 1, 7, 7), None, 1, 1, 3, 1, 3),
     r"masked_conv2d: halo \(padding\) must be in \[0, radius \* patch_side = 1 \* 1\]"),
    (lambda: torch.ops.ctssl.neighbour_table(torch.zeros(1, 2, 2, dtype=torch.int32), torch.tensor([0]), -1),
     r"neighbour_table: argument 'radius' must be in \[0, 64\], got -1"),
    (lambda: torch.ops.ctssl.neighbour_table(torch.zeros(1, 2, 2, dtype=torch.int32), torch.tensor([4]), 2),
     r"neighbour_table: argument 'patch_ids' must lie in \[0, 4\)"),
    (lambda: torch.ops.ctssl.neighbour_table(torch.zeros(1, 2, 2), torch.tensor([0]), 2),
     r"neighbour_table: argument 'slot' must have dtype Int"),
    (lambda: torch.ops.ctssl.halo_gather(torch.zeros(16, 3), _table(1) + 7, 4, 1),
     r"argument 'neighbours' must hold slots in \[0, 1\)"),
    (lambda: torch.ops.ctssl.masked_conv2d(torch.zeros(16, 3), _table(1), torch.zeros(5, 3, 3, 3).double(), None,
                                           4, 1, 1, 1, 1),
     r"masked_conv2d: argument 'weight' must have dtype Float"),
    (lambda: torch.ops.ctssl.masked_conv2d(torch.zeros(16, 3), _table(1), torch.zeros(5, 4, 3, 3), None,
                                           4, 1, 1, 1, 1),
     r"masked_conv2d: argument 'weight' .* does not match 3 input channels"),
    (lambda: torch.ops.ctssl.masked_conv2d(torch.zeros(16, 3), _table(1), torch.zeros(5, 3, 3, 3), None,
                                           4, 1, 0, 1, 1),
     r"does not map a patch of side 4 onto side p / stride"),
    (lambda: torch.ops.ctssl.bn_apply(torch.zeros(4, 3), torch.zeros(2), torch.ones(3), None, None, None, 1),
     r"bn_apply: argument 'mean' must have shape \(3,\)"),
    (lambda: torch.ops.ctssl.bn_apply(torch.zeros(4, 3), torch.zeros(3), torch.ones(3), None, None,
                                      torch.zeros(4, 3).half(), 1),
     r"bn_apply: argument 'residual' must have the dtype of 'rows'"),
    (lambda: torch.ops.ctssl.bn_apply(torch.zeros(4, 3), torch.zeros(3), torch.ones(3), None, None, None, 3),
     r"activation must be 0 \(none\), 1 \(relu\) or 2 \(relu6\)"),
    (lambda: torch.ops.ctssl.bn_backward_apply(torch.zeros(4, 3), None, torch.zeros(4, 3), torch.zeros(3),
                                               torch.ones(3), None, torch.zeros(3), torch.zeros(3), 4.0, True, 1,
                                               False),
     r"argument 'y' \(the forward output\) is required"),
    (lambda: torch.ops.ctssl.max_pool2d(torch.zeros(16, 3), _table(1), 4, 3, 2, 2),
     r"max_pool2d: need stride >= 1 and 0 <= padding <= min"),
    (lambda: torch.ops.ctssl.max_pool2d_backward(torch.zeros(4, 3), torch.zeros(4, 3), _table(1), 4, 3, 2, 1),
     r"max_pool2d_backward: argument 'argmax' must have dtype Char"),
    (lambda: torch.ops.ctssl.pack_patches(torch.zeros(1, 3, 64, 48), torch.zeros(1, dtype=torch.long), 2, 2),
     r"pack_patches: argument 'images' of size 64x48 does not split into a 2x2 grid"),
    (lambda: torch.ops.ctssl.pack_patches(torch.zeros(1, 3, 64, 64), torch.tensor([4]), 2, 2),
     r"pack_patches: argument 'patch_ids' must lie in \[0, 4\)"),
    (lambda: torch.ops.ctssl.densify(torch.zeros(16, 3), torch.zeros(1, 2, 2, dtype=torch.int32), 4,
                                     torch.zeros(2)),
     r"densify: argument 'token' must have shape \(3,\)"),
    (lambda: torch.ops.ctssl.densify(torch.zeros(16, 3), torch.ones(1, 2, 2, dtype=torch.int32), 4, None),
     r"densify: argument 'slot' refers to slot 1 but 'rows' holds only 1 patches"),
    (lambda: torch.ops.ctssl.patch_tables(torch.ones(1, 2, 2), 4),
     r"patch_tables: argument 'active' must have dtype Bool"),
    (lambda: torch.ops.ctssl.patch_tables(torch.ones(1, 2, 2, dtype=torch.bool), 3),
     r"patch_tables: argument 'num_patches' is 3 but 'active' has 4 visible patches"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_missing_module_reasons_name_the_cause(monkeypatch):
    missing = ModuleNotFoundError("No module named 'ctssl._C'", name="ctssl._C")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in runtime._diagnose(missing)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(runtime, "_nvcc_found", lambda: False)
    assert "no nvcc was found" in runtime._diagnose(missing)
    monkeypatch.setattr(runtime, "_nvcc_found", lambda: True)
    assert "without --no-build-isolation" in runtime._diagnose(missing)
    broken = ImportError("ctssl/_C.so: undefined symbol: _ZN3c10...")
    assert "built against another torch" in runtime._diagnose(broken)


@needs_ext
def test_compiled_kernels_neither_spill_nor_use_local_memory():
    from benchmarks.extension_resources import cuobjdump, extension_path, resources

    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (from triton or the CUDA toolkit) to read the extension's cubins")
    rows = resources(extension_path(), tool)
    kernels = {r["kernel"].split("<")[0] for r in rows}
    assert kernels >= {"bn_apply_kernel", "bn_backward_apply_kernel", "welford_partial_kernel", "halo_gather_kernel",
                       "halo_scatter_kernel", "max_pool_kernel", "pack_kernel", "densify_kernel", "neighbour_kernel"}
    assert all(r["arch"] and r["arch"].startswith("sm_") for r in rows)
    in_memory = [(r["arch"], r["kernel"], r["stack_bytes"], r["local_bytes"]) for r in rows
                 if r["stack_bytes"] or r["local_bytes"]]
    assert not in_memory, f"kernels with a stack frame or local memory (register spills): {in_memory}"
