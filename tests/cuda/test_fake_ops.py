"""Fake (meta) implementations of the operators: what FakeTensor / torch.compile see is what runs.

Every op is checked with ``torch.library.opcheck`` and by comparing its fake and meta outputs
with the real CPU outputs (shape, dtype, device, strides, undefined outputs); the cuda backend's
autograd Functions compile with ``fullgraph=True`` and match eager, forward and backward.
"""
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ctssl.cuda_ops import runtime
from ctssl.cuda_ops.batchnorm import row_batch_norm
from ctssl.cuda_ops.conv import MaskedConv2d
from ctssl.cuda_ops.layout import Densify, PackPatches
from ctssl.cuda_ops.pool import MaskedMaxPool2d
from ctssl.cuda_ops.tables import patch_tables
from ctssl.sparse import PatchIndex, random_patch_mask

from .helpers import needs_ext, needs_gpu
from .test_extension import OPS

pytestmark = needs_ext
P, C, COUT = 4, 6, 8  # patch side, channels


@pytest.fixture(scope="module")
def d():
    """Small inputs: a 2 x (2 x 3) mask, its tables, rows at patch side P and the BatchNorm / pool tensors."""
    gen = torch.Generator().manual_seed(0)
    active = random_patch_mask(2, (2, 3), 0.5, generator=gen)
    t = patch_tables(PatchIndex(active))
    n = t.neighbours.shape[0]

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    rows = r(n * P * P, C)
    mean, var = torch.ops.ctssl.bn_stats(rows)
    invstd = torch.rsqrt(var + 1e-5)
    y = torch.ops.ctssl.bn_apply(rows, mean, invstd, None, None, None, 1)
    gy = r(n * P * P, C)
    pooled, argmax = torch.ops.ctssl.max_pool2d(rows, t.neighbours, P, 3, 2, 1)
    empty = patch_tables(PatchIndex(torch.zeros(1, 2, 2, dtype=torch.bool)))
    nbr3 = torch.ops.ctssl.neighbour_table(t.slot, t.patch_ids, 3)  # what a 7x7 window at 1-pixel patches reads
    return SimpleNamespace(r=r, active=active, t=t, n=n, rows=rows, mean=mean, invstd=invstd, y=y, gy=gy, nbr3=nbr3,
                           sums=torch.ops.ctssl.bn_backward_reduce(gy, y, rows, mean, invstd, 1),
                           pooled=pooled, argmax=argmax, empty_nbr=empty.neighbours)


def _conv(k, s, pad, groups, bias, mask=None):
    """masked_conv2d (mask None) or its backward with ``mask`` for one conv geometry."""
    def build(d):
        w, b = d.r(COUT, C // groups, k, k), (d.r(COUT) if bias else None)
        if mask is None:
            return "masked_conv2d", (d.rows, d.t.neighbours, w, b, P, s, pad, 1, groups)
        go = d.r(d.n * (P // s) ** 2, COUT)
        return "masked_conv2d_backward", (go, d.rows, d.t.neighbours, w, P, s, pad, 1, groups, mask)
    return build


def _depthwise(p, mask=None):
    """ConvNeXt's depthwise 7x7 conv (groups = channels) at patch side ``p`` on the radius-3 table."""
    def build(d):
        rows, w, b = d.r(d.n * p * p, C), d.r(C, 1, 7, 7), d.r(C)
        if mask is None:
            return "masked_conv2d", (rows, d.nbr3, w, b, p, 1, 3, 1, C)
        return "masked_conv2d_backward", (d.r(d.n * p * p, C), rows, d.nbr3, w, p, 1, 3, 1, C, mask)
    return build


ALL, ROWS_ONLY, WEIGHT_ONLY = [True, True, True], [True, False, False], [False, True, False]
CASES = {
    "patch_tables": lambda d: ("patch_tables", (d.active, d.n)),
    "pack_patches": lambda d: ("pack_patches", (d.r(2, C, 2 * P, 3 * P), d.t.patch_ids, 2, 3)),
    "pack_patches_channels_last_f64": lambda d: (
        "pack_patches", (d.r(2, C, 2 * P, 3 * P, dtype=torch.float64).to(memory_format=torch.channels_last),
                         d.t.patch_ids, 2, 3)),
    "densify": lambda d: ("densify", (d.rows, d.t.slot, P, None)),
    "densify_token": lambda d: ("densify", (d.rows, d.t.slot, P, d.r(C))),
    "neighbour_table": lambda d: ("neighbour_table", (d.t.slot, d.t.patch_ids, 2)),
    "neighbour_table_radius0": lambda d: ("neighbour_table", (d.t.slot, d.t.patch_ids, 0)),
    "halo_gather": lambda d: ("halo_gather", (d.rows, d.t.neighbours, P, 1)),
    "halo_gather_radius3_bf16": lambda d: ("halo_gather", (d.r(d.n, C).bfloat16(), d.nbr3, 1, 3)),
    "halo_scatter_radius3": lambda d: ("halo_scatter", (d.r(d.n, 7, 7, C), d.nbr3, 1, 3)),
    "halo_scatter": lambda d: ("halo_scatter", (d.r(d.n, P + 2, P + 2, C), d.t.neighbours, P, 1)),
    "conv3x3": _conv(3, 1, 1, 1, True),
    "conv3x3_s2_grouped": _conv(3, 2, 1, 2, False),
    "conv1x1_gemm_s2": _conv(1, 2, 0, 1, True),
    "conv2x2_no_halo": _conv(2, 2, 0, 1, True),
    "depthwise7x7_p1": _depthwise(1),
    "depthwise7x7_p2": _depthwise(2),
    "depthwise7x7_p4_radius3_table": _depthwise(4),
    "depthwise_backward7x7_p1": _depthwise(1, ALL),
    "depthwise_backward7x7_p2_rows_only": _depthwise(2, ROWS_ONLY),
    "depthwise_backward7x7_p1_weight_only": _depthwise(1, WEIGHT_ONLY),
    "conv_backward3x3": _conv(3, 1, 1, 1, True, ALL),
    "conv_backward3x3_rows_only": _conv(3, 1, 1, 1, True, ROWS_ONLY),
    "conv_backward3x3_s2_grouped_weight_only": _conv(3, 2, 1, 2, False, WEIGHT_ONLY),
    "conv_backward1x1_gemm": _conv(1, 1, 0, 1, True, ALL),
    "conv_backward1x1_gemm_s2_weight_only": _conv(1, 2, 0, 1, True, WEIGHT_ONLY),
    "conv_backward2x2_no_halo": _conv(2, 2, 0, 1, True, ALL),
    "conv_no_patches": lambda d: ("masked_conv2d", (d.r(0, C), d.empty_nbr, d.r(COUT, C, 3, 3), None, P, 1, 1, 1, 1)),
    "conv_backward_no_patches": lambda d: (
        "masked_conv2d_backward", (d.r(0, COUT), d.r(0, C), d.empty_nbr, d.r(COUT, C, 3, 3), P, 1, 1, 1, 1, ALL)),
    "bn_stats_f64": lambda d: ("bn_stats", (d.rows.double(),)),
    "bn_stats_bf16": lambda d: ("bn_stats", (d.rows.bfloat16(),)),
    "bn_apply": lambda d: ("bn_apply", (d.rows, d.mean, d.invstd, d.r(C), d.r(C), d.r(*d.rows.shape), 2)),
    "bn_backward_reduce": lambda d: ("bn_backward_reduce", (d.gy, d.y, d.rows, d.mean, d.invstd, 1)),
    "bn_backward_apply": lambda d: ("bn_backward_apply", (d.gy, d.y, d.rows, d.mean, d.invstd, d.r(C), *d.sums,
                                                          float(d.rows.shape[0]), True, 1, True)),
    "bn_backward_apply_no_grad_z": lambda d: ("bn_backward_apply", (d.gy, None, d.rows, d.mean, d.invstd, None,
                                                                    *d.sums, float(d.rows.shape[0]), True, 0, False)),
    "max_pool2d_half": lambda d: ("max_pool2d", (d.rows.half(), d.t.neighbours, P, 3, 2, 1)),
    "max_pool2d_backward": lambda d: ("max_pool2d_backward", (d.r(*d.pooled.shape), d.argmax, d.t.neighbours, P, 3,
                                                              2, 1)),
}


def test_every_op_has_a_registered_fake():
    assert runtime.load() is not None
    assert runtime._state.get("fake_error") is None, runtime._state["fake_error"]
    assert sorted(runtime.FAKES) == sorted(OPS)
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ctssl::{name}", "Meta"), name


def test_cases_cover_every_op(d):
    assert {build(d)[0] for build in CASES.values()} == set(OPS)


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case, d):
    # No input requires grad: the ops have no autograd kernel by design (the autograd.Functions in
    # ctssl.cuda_ops are their derivatives), so test_autograd_registration would have nothing to check.
    name, args = CASES[case](d)
    torch.library.opcheck(getattr(torch.ops.ctssl, name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def _meta(out):
    if out is None:
        return None
    return tuple(out.shape), out.dtype, out.stride()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
@pytest.mark.parametrize("case", list(CASES))
def test_fake_and_meta_outputs_match_real(case, d, device):
    """On CUDA too: the CUDA entries allocate what the fakes say (conv grad_weight's format comes from cuDNN)."""
    name, args = CASES[case](d)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    op = getattr(torch.ops.ctssl, name)
    real = op(*args)
    real = real if isinstance(real, tuple) else (real,)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [_meta(o) for o in fake] == [_meta(o) for o in real]
    assert all(o.device == r.device for o, r in zip(fake, real) if o is not None)
    if device == "cpu":  # meta tensors carry no device, so ATen's conv picks its CPU layouts for them
        meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        meta = meta if isinstance(meta, tuple) else (meta,)
        assert [_meta(o) for o in meta] == [_meta(o) for o in real]
        assert all(o.device.type == "meta" for o in meta if o is not None)


def test_conv_backward_bias_only_mask_leaves_grad_weight_undefined(d):
    """CPU mkldnn's conv backward (float32) computes grad_weight even for a bias-only mask: the
    operator returns only what the mask asks for, like its fake."""
    _, args = _conv(3, 1, 1, 1, True, [False, False, True])(d)
    with FakeTensorMode() as mode:
        fake = torch.ops.ctssl.masked_conv2d_backward(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                        for a in args])
    assert fake[0] is None and fake[1] is None and fake[2] is not None
    assert torch.ops.ctssl.masked_conv2d_backward(*args)[1] is None


def _step(images, patch_ids, slot, neighbours, mask, conv_w, conv_b, bn_w, bn_b, token, running_mean, running_var):
    """Pack, 3x3 conv, BatchNorm + residual + ReLU, max pool, densify with a token: every Function."""
    p = images.shape[-1] // slot.shape[2]
    rows = PackPatches.apply(images, patch_ids, slot, slot.shape[1], slot.shape[2])
    y = MaskedConv2d.apply(rows, conv_w, conv_b, neighbours, p, 1, 1, 1, 1)
    y = row_batch_norm(y, bn_w, bn_b, running_mean, running_var, True, 0.1, 1e-5, activation="relu", residual=rows)
    z = MaskedMaxPool2d.apply(y, neighbours, p, 3, 2, 1)
    return Densify.apply(z, token, slot, patch_ids, p // 2, mask)


def test_compiled_functions_match_eager_forward_and_backward(d):
    """The tables come in as inputs, so the whole step is one graph (a PatchIndex built inside makes
    the row count data-dependent, and the zero-row checks then break the graph: see the next test)."""
    mask = d.active.repeat_interleave(P // 2, 1).repeat_interleave(P // 2, 2).unsqueeze(1)

    def run(fn):
        gen = torch.Generator().manual_seed(1)
        leaves = [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True)
                  for s in ((2, C, 2 * P, 3 * P), (C, C, 3, 3), (C,), (C,), (C,), (C,))]
        running = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
        out = fn(leaves[0], d.t.patch_ids, d.t.slot, d.t.neighbours, mask, *leaves[1:], *running)
        (out * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum().backward()
        return [out.detach(), out.stride(), *running, *(x.grad for x in leaves)]

    torch._dynamo.reset()
    compiled = run(torch.compile(_step, fullgraph=True, backend="aot_eager", dynamic=True))
    for got, want in zip(compiled, run(_step)):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert got == want


def _assert_compiled_matches_eager(layers, images, active):
    """``layers`` on the cuda operators' CPU twins, the patch index built from ``active`` inside the region:
    torch.compile (aot_eager, graph breaks allowed) equals eager in the output, the image gradient and every
    parameter gradient."""
    from .helpers import CpuTwin

    backend = CpuTwin()

    def step(images, active):
        x = backend.sparse_input(images, PatchIndex(active))
        for layer in layers:
            x = layer(x)
        return x.to_dense()

    def run(fn):
        x = images.detach().clone().requires_grad_(True)
        out = fn(x, active)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        (out * weights).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in layers.parameters()]
        layers.zero_grad()
        return [out.detach()] + grads

    torch._dynamo.reset()
    want = run(step)
    got = run(torch.compile(step, backend="aot_eager"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_sparse_layers_with_the_index_built_inside_match_eager():
    """The user's case: torch.compile over sparse layers on the cuda backend's operators, the mask arriving as
    data; ``SymInt num_patches`` lets patch_tables take the data-dependent patch count."""
    from ctssl.sparse.modules import BatchNorm2d, Conv2d, MaxPool2d, ReLU

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([Conv2d(3, C, 3, padding=1), BatchNorm2d(C), ReLU(), MaxPool2d(3, 2, 1)]).double()
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    active = torch.tensor([[[True, False, True], [False, True, True]], [[False] * 3, [True, False, False]]])
    _assert_compiled_matches_eager(layers, images, active)


def test_compiled_convnext_layers_on_radius3_tables_match_eager():
    """ConvNeXt's depthwise 7x7 conv at 1-pixel patches (the radius-3 table built inside the compiled region from a
    data-dependent patch count) and LayerNorm under torch.compile: compiled == eager, forward and backward."""
    from ctssl.sparse.modules import Conv2d, LayerNorm2d

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([Conv2d(3, C, 32, 32), Conv2d(C, C, 7, padding=3, groups=C),
                                  LayerNorm2d(C)]).double()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 128, 128, generator=gen, dtype=torch.float64)
    active = torch.rand(2, 4, 4, generator=gen) < 0.6
    active[1] = False
    _assert_compiled_matches_eager(layers, images, active)


def test_registration_skips_without_register_fake_and_never_breaks_load(monkeypatch):
    monkeypatch.delattr(torch.library, "register_fake")
    assert runtime.register_fakes() is False  # torch < 2.4
    monkeypatch.undo()

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(runtime, "register_fakes", broken)
    monkeypatch.setattr(runtime, "_state", {})
    with pytest.warns(RuntimeWarning, match="fake impls of torch.ops.ctssl.* not registered.*boom"):
        assert runtime.load() is not None
    assert runtime.missing_reason() is None and "boom" in runtime._state["fake_error"]
