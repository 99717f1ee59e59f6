"""The CUDA kernels on a GPU: every op in float32/float16/bfloat16 against a float64 reference,
the whole ResNet-50 and ConvNeXt-T encoders, CUDA-graph capture, and device checks. Skipped without a GPU."""
import copy

import pytest
import torch

from ctssl.cuda_ops.batchnorm import row_batch_norm
from ctssl.cuda_ops.tables import neighbour_table, patch_tables
from ctssl.models import convnext_tiny, create_resnet
from ctssl.sparse import PatchIndex, get_backend
from ctssl.sparse.batchnorm_rows import batch_norm_rows
from ctssl.sparse.halo import halo_gather
from ctssl.sparse.modules import BatchNorm2d, Conv2d, LayerNorm2d, MaxPool2d

from ..sparse.helpers import random_batchnorm
from .helpers import edge_masks, needs_ext, needs_gpu, rel_err, sparse_at

pytestmark = [needs_ext, needs_gpu, pytest.mark.gpu]
DTYPES = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative (norm) tolerance


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 is compared at float32 accuracy: keep cuDNN and cuBLAS off TF32 here."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _module_vs_dense64(module_fn, stride, cin, dtype, gen, size=(128, 96), batch=4, train=True):
    """The module on the cuda backend in ``dtype`` vs the dense reference in float64 (both on the GPU).

    Inputs, parameters and loss weights are first rounded to ``dtype``, so the reference sees the
    very values the kernels see (max-pool ties break the same way) and only arithmetic differs.
    """
    H, W = size
    images = torch.randn(batch, cin, H, W, generator=gen).to(dtype).double()
    tol = DTYPES[dtype]
    for active in edge_masks(batch, H // 32, W // 32, gen):
        active = active.cuda()
        ref_m = module_fn().to(dtype).double().cuda().train(train)
        out = {}
        for name, be, dt in (("dense", "dense", torch.float64), ("cuda", "cuda", dtype)):
            m = copy.deepcopy(ref_m).to(dt)
            x = images.cuda().to(dt).requires_grad_(True)
            y = m(sparse_at(x, active, be, stride))
            dense = y.to_dense()
            w = torch.randn(dense.shape, generator=torch.Generator().manual_seed(7)).to(dtype).cuda()
            (dense * w.to(dt)).sum().backward()
            out[name] = (dense.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()},
                         dict(m.named_buffers()))
        d, c = out["dense"], out["cuda"]
        assert c[0].dtype == dtype and torch.isfinite(c[0]).all()
        assert rel_err(c[0], d[0]) < tol
        assert rel_err(c[1], d[1]) < 4 * tol
        for n in d[2]:
            assert rel_err(c[2][n], d[2][n]) < 4 * tol, n
        for n in d[3]:
            assert rel_err(c[3][n].double(), d[3][n].double()) < 4 * tol, n
        mask = PatchIndex(active).dense_mask(y.stride)
        assert (c[0] * ~mask).abs().max() == 0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("k,s,p,stride", [(7, 2, 3, 1), (3, 1, 1, 4), (3, 2, 1, 8), (3, 1, 1, 32),
                                          (1, 1, 0, 4), (1, 2, 0, 16)])
def test_conv(k, s, p, stride, dtype):
    _module_vs_dense64(lambda: Conv2d(16, 32, k, s, p, bias=True), stride, 16, dtype, torch.Generator().manual_seed(k))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("stride", [4, 8, 16, 32])
def test_depthwise_conv(stride, dtype):
    """ConvNeXt's 7x7 depthwise conv: cuDNN's grouped conv on halos of radius 1, 1, 2, 3 patches."""
    _module_vs_dense64(lambda: Conv2d(48, 48, 7, 1, 3, groups=48), stride, 48, dtype,
                       torch.Generator().manual_seed(stride))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layer_norm(dtype):
    def ln():
        m = LayerNorm2d(48, eps=1e-6)
        with torch.no_grad():
            m.weight.normal_(1.0, 0.5)
            m.bias.normal_(0.0, 0.5)
        return m

    torch.manual_seed(8)
    _module_vs_dense64(ln, 8, 48, dtype, torch.Generator().manual_seed(8))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm(dtype, train):
    _module_vs_dense64(lambda: random_batchnorm(48), 4, 48, dtype, torch.Generator().manual_seed(2), train=train)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_max_pool(dtype):
    _module_vs_dense64(lambda: MaxPool2d(3, 2, 1), 2, 40, dtype, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_fused_batchnorm_matches_float64(dtype, activation):
    gen = torch.Generator().manual_seed(4)
    M, C = 20000, 96
    rows = (torch.randn(M, C, generator=gen) * 3 + 1).to(dtype).cuda()
    res = torch.randn(M, C, generator=gen).to(dtype).cuda()
    gy = torch.randn(M, C, generator=gen).to(dtype).cuda()
    w, b = (torch.rand(C, generator=gen) + 0.5).cuda(), torch.randn(C, generator=gen).cuda()
    act = {None: lambda v: v, "relu": torch.relu, "relu6": lambda v: v.clamp(0, 6)}[activation]

    def run(fused, dt, pdt):
        x, r = rows.to(dt).requires_grad_(True), res.to(dt).requires_grad_(True)
        ww, bb = w.to(pdt).requires_grad_(True), b.to(pdt).requires_grad_(True)
        rm, rv = torch.zeros(C, device="cuda", dtype=pdt), torch.ones(C, device="cuda", dtype=pdt)
        if fused:
            y = row_batch_norm(x, ww, bb, rm, rv, True, 0.1, 1e-5, activation=activation, residual=r)
        else:
            y = act(batch_norm_rows(x, ww, bb, rm, rv, True, 0.1, 1e-5) + r)
        (y * gy.to(dt)).sum().backward()
        return y.detach(), x.grad, r.grad, ww.grad, bb.grad, rm, rv

    ref, out = run(False, torch.float64, torch.float64), run(True, dtype, torch.float32)
    tol = DTYPES[dtype]
    for a, b_ in zip(out, ref):
        assert rel_err(a, b_) < 4 * tol


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layout_ops_are_exact(dtype):
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(4, 24, 96, 128, generator=gen).to(dtype).cuda()
    for active in edge_masks(4, 3, 4, gen):
        idx = PatchIndex(active.cuda())
        t = patch_tables(idx)
        assert torch.equal(t.slot.long(), idx.slot) and torch.equal(t.neighbours.long(), idx.neighbours)
        assert torch.equal(t.patch_ids, idx.patch_ids)
        cu, tb = get_backend("cuda").sparse_input(images, idx), get_backend("torch").sparse_input(images, idx)
        assert torch.equal(cu.values, tb.values)
        assert torch.equal(cu.to_dense(), tb.to_dense())
        token = torch.randn(24, generator=gen).to(dtype).cuda()
        assert torch.equal(get_backend("cuda").densify(cu, token), get_backend("torch").densify(tb, token))
        for r in (2, 3):
            assert torch.equal(neighbour_table(idx, r).long(), idx.neighbour_table(r))
        for p, halo in ((32, 3), (8, 1), (1, 1), (2, 3), (1, 3)):
            rows = torch.randn(idx.num_patches * p * p, 24, generator=gen).to(dtype).cuda()
            nbr = neighbour_table(idx, -(-halo // p))
            out = torch.ops.ctssl.halo_gather(rows, nbr, p, halo)
            assert torch.equal(out, halo_gather(rows, idx.halo_plan(p, halo), idx.num_patches, 0.0))
            # the adjoint: an exact sum of at most (2r+1)^2 copies in float64
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64).cuda()
            back = torch.ops.ctssl.halo_scatter(g, nbr, p, halo)
            assert torch.allclose((out.double() * g).sum(), (rows.double() * back).sum(), rtol=1e-10)


def _encoder_run(model, images, active, backend, weights, autocast=False):
    m = copy.deepcopy(model)
    x = images.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        maps = m.forward_masked(x, active, backend)
    sum((mp.double() * w).sum() for mp, w in zip(maps, weights)).backward()
    return [mp.detach() for mp in maps], x.grad, {n: p.grad for n, p in m.named_parameters()}


def _float32_matches_float64(model, gen, backend="cuda"):
    """``backend`` in float32 against the float64 dense truth on 4 random 128 px images with edge masks, judged next
    to the float32 torch backend's own error: maps within 1e-3, every map, the image gradient and every parameter
    gradient within 10x torch's error. Returns (images, active, truth, weights) for further checks."""
    images = torch.randn(4, 3, 128, 128, generator=gen).to(next(model.parameters()).device)
    active = edge_masks(4, 4, 4, gen)[1].to(images.device)
    truth, weights, errors = _float64_truth(model, images, active, gen)
    e_torch = errors(_encoder_run(model, images, active, "torch", weights))
    e_other = errors(_encoder_run(model, images, active, backend, weights))
    assert e_other[:4].max() < 1e-3
    assert (e_other <= 10 * e_torch + 1e-4).all(), (e_other - 10 * e_torch).max()
    return images, active, truth, weights


def _float64_truth(model, images, active, gen):
    """The float64 dense run of ``model`` on ``images`` (the maps weighted by draws from ``gen``), the weights, and a
    function giving another run's relative error in each map, the image gradient and every parameter gradient."""
    model64 = copy.deepcopy(model).double()
    shapes = [mp.shape for mp in model64.forward_masked(images.double(), active, "dense")]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64).to(images.device) for s in shapes]
    truth = _encoder_run(model64, images.double(), active, "dense", weights)
    names = [n for n in truth[2] if truth[2][n] is not None]

    def errors(out):
        errs = [rel_err(a, b) for a, b in zip(out[0], truth[0])] + [rel_err(out[1], truth[1])]
        return torch.tensor(errs + [rel_err(out[2][n], truth[2][n]) for n in names])

    return truth, weights, errors


def test_resnet50_encoder_matches_float64():
    """float32 cuda backend vs float64 dense truth, judged next to the float32 torch backend's own error."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    model = create_resnet("resnet50").cuda().train()
    images, active, truth, weights = _float32_matches_float64(model, gen)
    # bf16 autocast: finite and close in the forward
    out = _encoder_run(model, images, active, "cuda", weights, autocast=True)
    for a, b in zip(out[0], truth[0]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 5e-2


def test_convnext_tiny_encoder_matches_float64():
    """ConvNeXt-T on the cuda backend in float32 vs float64 dense truth, next to the float32 torch backend's error;
    bf16 autocast finite and close."""
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(0)
    model = convnext_tiny(ls_init_value=0.5).cuda().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).cuda() * 0.05)
    images, active, truth, weights = _float32_matches_float64(model, gen)
    # bf16 autocast: finite, and as close to the truth as the torch backend's bf16 maps
    bf16 = {be: _encoder_run(model, images, active, be, weights, autocast=True)[0] for be in ("torch", "cuda")}
    assert all(torch.isfinite(a).all() for a in bf16["cuda"])
    e_torch16 = torch.tensor([rel_err(a, b) for a, b in zip(bf16["torch"], truth[0])])
    e_cuda16 = torch.tensor([rel_err(a, b) for a, b in zip(bf16["cuda"], truth[0])])
    assert (e_cuda16 <= 2 * e_torch16 + 1e-2).all(), (e_cuda16, e_torch16)


def test_cuda_graph_capture_of_a_training_step():
    torch.manual_seed(0)
    conv, bn = Conv2d(8, 16, 3, 1, 1, bias=False).cuda(), BatchNorm2d(16).cuda()
    images = torch.randn(2, 8, 64, 64, device="cuda")
    active = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]], device="cuda")
    idx = PatchIndex(active)
    be = get_backend("cuda")

    def step():
        y = bn(conv(be.sparse_input(images, idx)))
        y.values.square().sum().backward()
        return y.values

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (tables built and cached on the index)
            conv.weight.grad = None
            eager = step().clone()
    torch.cuda.current_stream().wait_stream(s)
    conv.weight.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, eager, atol=1e-5)
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_mixed_devices_raise_naming_the_argument():
    rows = torch.zeros(16, 3, device="cuda")
    with pytest.raises(RuntimeError, match="argument 'neighbours' is on cpu but 'rows' is on cuda"):
        torch.ops.ctssl.halo_gather(rows, torch.full((1, 3, 3), -2, dtype=torch.int32), 4, 1)
    with pytest.raises(RuntimeError, match="argument 'weight' is on cpu"):
        torch.ops.ctssl.masked_conv2d(rows, torch.full((1, 3, 3), -2, dtype=torch.int32, device="cuda"),
                                      torch.zeros(4, 3, 3, 3), None, 4, 1, 1, 1, 1)


def test_backend_selection_on_gpu():
    assert get_backend("cuda", "cuda").name == "cuda"
