"""Shared tools: run a module or model on the triton backend and on the float64 dense reference."""
from __future__ import annotations

import copy

import pytest
import torch

from ctssl.sparse import PatchIndex
from ctssl.sparse.backends.triton import TritonBackend

from ..sparse.helpers import edge_masks as shared_edge_masks
from ..sparse.helpers import rel_err, sparse_at  # noqa: F401  (shared with the sparse and cuda tests)

REASON = TritonBackend().unavailable_reason()
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

F64 = torch.float64
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def edge_masks(batch: int, h: int, w: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The shared edge-case masks, with a visible first patch in the random one (never all masked)."""
    masks = shared_edge_masks(batch, h, w, gen)
    masks[0][0, 0, 0] = True
    return masks


def grad_weight(shape, seed: int = 7) -> torch.Tensor:
    """The same random float64 loss weights for every run of a comparison."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run_module(module, images, active, backend, stride, dtype, patch_size=32):
    """Forward + backward of ``module`` on a sparse map; returns output, input/param grads and buffers."""
    m = copy.deepcopy(module).to(dtype)
    x = images.detach().to(dtype).requires_grad_(True)
    y = m(sparse_at(x, active, backend, stride, patch_size))
    dense = y.to_dense()
    (dense * grad_weight(dense.shape).to(dense.device, dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in m.named_buffers()}
    return dict(out=dense.detach(), x_grad=x.grad.detach(), grads=grads, buffers=buffers, stride=y.stride)


def assert_close(out: dict, ref: dict, tol: float, what: str = "") -> None:
    assert out["stride"] == ref["stride"]
    assert out["out"].shape == ref["out"].shape
    assert rel_err(out["out"], ref["out"]) < tol, f"{what} output"
    assert rel_err(out["x_grad"], ref["x_grad"]) < tol, f"{what} input grad"
    assert out["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        assert rel_err(out["grads"][name], ref["grads"][name]) < tol, f"{what} grad of {name}"
    for name in ref["buffers"]:
        assert rel_err(out["buffers"][name].double(), ref["buffers"][name].double()) < tol, f"{what} buffer {name}"


def compare_module(make, cin, stride, gen, dtypes=(torch.float32,), size=(64, 96), batch=3, train=True,
                   masks=None, tol=None, device="cpu", patch_size=32):
    """``make()`` on the triton backend in each dtype against the dense backend in float64.

    ``size`` (H, W) gives images, (D, H, W) volumes (pass their ``masks``)."""
    images = torch.randn(batch, cin, *size, generator=gen, dtype=F64)
    if torch.float16 in dtypes or torch.bfloat16 in dtypes:  # the same (representable) inputs for every dtype
        images = images.to(torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16).double()
    images = images.to(device)
    module = make().to(F64).to(device).train(train)
    for active in masks if masks is not None else edge_masks(batch, size[0] // 32, size[1] // 32, gen):
        active = active.to(device)
        ref = run_module(module, images, active, "dense", stride, F64, patch_size)
        for dtype in dtypes:
            out = run_module(module, images, active, "triton", stride, dtype, patch_size)
            assert_close(out, ref, tol or TOL[dtype], f"{dtype} mask {active.flatten(1).sum(1).tolist()}")
            # masked positions are exactly zero
            mask = PatchIndex(active, patch_size).dense_mask(out["stride"])
            assert (out["out"] * ~mask).abs().max() == 0
