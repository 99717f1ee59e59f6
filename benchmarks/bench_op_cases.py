"""Single-op workloads at ResNet-50's and ConvNeXt-T's shapes: conv (incl. the depthwise 7x7), BN,
LayerNorm, Linear over channels, max pool, layout ops, PatchIndex.

Each builder returns a ``Workload`` for one backend (``None`` = the plain dense op on
unmasked input), one dtype and one mask ratio. The index is built once per input set
and reused, as in a real step, so per-batch tables a backend caches on it are built
in the untimed first run; PatchIndex construction is timed on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from bench_config import NOMASK, Profile, dtype_name
from bench_workload import Workload, random_mask, random_tensor, sparse_map, visible_fraction

from ctssl.sparse import PatchIndex
from ctssl.sparse.backends import Backend


@dataclass(frozen=True)
class ConvShape:
    """A conv of ResNet-50 (torchvision v1.5 layout) or ConvNeXt-T at an input feature stride."""

    key: str
    cin: int
    cout: int
    kernel: int
    stride: int
    in_stride: int  # feature stride of the input map (1 = image)
    groups: int = 1
    padding: int | None = None  # None: kernel // 2

    def __post_init__(self):
        if self.padding is None:
            object.__setattr__(self, "padding", self.kernel // 2)

    def label(self, size: int) -> str:
        side = size // self.in_stride
        kind = "depthwise " if self.groups > 1 and self.groups == self.cin else ""
        return (f"{kind}conv {self.kernel}x{self.kernel}/{self.stride} {self.cin}->{self.cout} "
                f"@{side}px (stride {self.in_stride})")


CONV_SHAPES = (
    ConvShape("stem7x7s2", 3, 64, 7, 2, 1),
    ConvShape("conv3x3s1-c64", 64, 64, 3, 1, 4),
    ConvShape("conv3x3s1-c128", 128, 128, 3, 1, 8),
    ConvShape("conv3x3s1-c256", 256, 256, 3, 1, 16),
    ConvShape("conv3x3s1-c512", 512, 512, 3, 1, 32),
    ConvShape("conv3x3s2-c128", 128, 128, 3, 2, 4),
    ConvShape("conv3x3s2-c256", 256, 256, 3, 2, 8),
    ConvShape("conv3x3s2-c512", 512, 512, 3, 2, 16),
    ConvShape("conv1x1s1-c64to256", 64, 256, 1, 1, 4),
    ConvShape("conv1x1s1-c256to64", 256, 64, 1, 1, 4),
    ConvShape("conv1x1s1-c512to128", 512, 128, 1, 1, 8),
    ConvShape("conv1x1s1-c1024to256", 1024, 256, 1, 1, 16),
    ConvShape("conv1x1s1-c512to2048", 512, 2048, 1, 1, 32),
    ConvShape("conv1x1s2-c256to512", 256, 512, 1, 2, 4),
    ConvShape("conv1x1s2-c512to1024", 512, 1024, 1, 2, 8),
    ConvShape("conv1x1s2-c1024to2048", 1024, 2048, 1, 2, 16),
)

# ConvNeXt-T: the 4x4/4 stem, a 2x2/2 downsampling, and the depthwise 7x7 of every stage (its window
# reaches 1, 1, 2 and 3 patches away at strides 4, 8, 16, 32)
CONVNEXT_CONV_SHAPES = (
    ConvShape("cnx-stem4x4s4", 3, 96, 4, 4, 1, padding=0),
    ConvShape("cnx-down2x2s2-c96to192", 96, 192, 2, 2, 4, padding=0),
    ConvShape("cnx-dw7x7-c96", 96, 96, 7, 1, 4, groups=96),
    ConvShape("cnx-dw7x7-c192", 192, 192, 7, 1, 8, groups=192),
    ConvShape("cnx-dw7x7-c384", 384, 384, 7, 1, 16, groups=384),
    ConvShape("cnx-dw7x7-c768", 768, 768, 7, 1, 32, groups=768),
)

# (channels, feature stride): the stem's BN (stride 2) and the four stage outputs
STAGE_MAPS = ((64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32))
# ConvNeXt-T's stage maps (LayerNorm over channels, the MLP's fc1 C -> 4C)
CONVNEXT_STAGE_MAPS = ((96, 4), (192, 8), (384, 16), (768, 32))
MODES = ("fwd", "fwdbwd")


def _info(profile: Profile, family: str, case: str, backend: Backend | None, dtype: torch.dtype,
          mask_ratio: float | None, mode: str, vis: float | None) -> dict[str, Any]:
    return {
        "suite": "ops", "family": family, "case": case, "mode": mode,
        "backend": NOMASK if backend is None else backend.name, "dtype": dtype_name(dtype),
        "batch": profile.op_batch, "image_size": profile.op_size, "mask_ratio": mask_ratio,
        "visible_fraction": 1.0 if vis is None else vis,
    }


class _Inputs:
    """One input set: the mask, its index, and a dense feature map at a stride."""

    def __init__(self, profile: Profile, seed: int, mask_ratio: float | None, channels: int, stride: int,
                 dtype: torch.dtype):
        B, S = profile.op_batch, profile.op_size
        side = S // stride
        self.dense = random_tensor((B, channels, side, side), dtype, profile.device, seed,
                                   channels_last=profile.is_cuda)
        ratio = 0.5 if mask_ratio is None else mask_ratio  # the no-mask baseline never reads it
        self.index = PatchIndex(random_mask(B, S, ratio, profile.device, seed + 1))


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


def _make_sets(profile: Profile, mask_ratio, channels, stride, dtype, backend, grad: bool):
    """[(x, index)] for every rotation set; x is a SparseTensor (or the dense map for no-mask)."""
    sets = []
    for k in range(profile.rotate):
        inp = _Inputs(profile, 1000 * k + 17, mask_ratio, channels, stride, dtype)
        if backend is None:
            x = _leaf(inp.dense, grad)
        else:
            x = sparse_map(backend, inp.dense, inp.index, stride)
            x.values = _leaf(x.values, grad)
        sets.append((x, inp.index))
    return sets


def _values(x):
    return x if isinstance(x, torch.Tensor) else x.values


def _with_grads(sets, forward):
    """Append a random output gradient (shape found by one untimed forward) to every set."""
    out = []
    for k, (x, index) in enumerate(sets):
        with torch.no_grad():
            y = _values(forward(x))
        g = random_tensor(y.shape, y.dtype, y.device, 7000 + k)
        if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            g = g.contiguous(memory_format=torch.channels_last)
        out.append((x, index, g))
    return out


def _fwd_or_fwdbwd(forward, sets, mode: str, params: list[torch.Tensor]):
    """The step for ``mode`` and its inputs: forward under no_grad, or forward + backward."""
    if mode == "fwd":
        def step(inp):
            with torch.no_grad():
                return forward(inp[0])
        return step, sets
    sets = _with_grads(sets, forward)

    def step(inp):
        x, _, g = inp
        _values(x).grad = None
        for p in params:
            p.grad = None
        _values(forward(x)).backward(g)
    return step, sets


def conv_workload(profile: Profile, shape: ConvShape, backend: Backend | None, dtype: torch.dtype,
                  mask_ratio: float | None, mode: str) -> Workload:
    grad = mode == "fwdbwd"
    cin_per_group = shape.cin // shape.groups
    fan_in = cin_per_group * shape.kernel ** 2
    weight = random_tensor((shape.cout, cin_per_group, shape.kernel, shape.kernel), dtype, profile.device, 5)
    weight = _leaf(weight * (2.0 / fan_in) ** 0.5, grad)
    if profile.is_cuda:
        weight = _leaf(weight.contiguous(memory_format=torch.channels_last), grad)
    sets = _make_sets(profile, mask_ratio, shape.cin, shape.in_stride, dtype, backend, grad)
    s, pad, groups = shape.stride, shape.padding, shape.groups
    if backend is None:
        def forward(x):
            return F.conv2d(x, weight, None, s, pad, 1, groups)
    else:
        def forward(x):
            return backend.conv2d(x, weight, None, s, pad, 1, groups)
    step, inputs = _fwd_or_fwdbwd(forward, sets, mode, [weight])
    vis = None if backend is None else visible_fraction(sets[0][1])
    info = _info(profile, f"conv {mode}", f"{shape.label(profile.op_size)} {mode}", backend, dtype,
                 mask_ratio, mode, vis)
    return Workload(step, inputs, profile.op_batch, info, exclude=[weight] + [_values(x) for x, *_ in inputs],
                    backward=grad)


def _channel_params(profile: Profile, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm's affine weight (around 1) and bias, float32 leaves."""
    dev = profile.device
    return (_leaf(random_tensor((channels,), torch.float32, dev, seed).abs() + 0.5, True),
            _leaf(random_tensor((channels,), torch.float32, dev, seed + 1), True))


def _stage_map_workload(profile: Profile, family: str, what: str, channels: int, stride: int,
                        backend: Backend | None, dtype: torch.dtype, mask_ratio: float | None,
                        params: list[torch.Tensor], forward) -> Workload:
    """Forward + backward of ``forward`` on a stage map of ``channels`` at ``stride``."""
    sets = _make_sets(profile, mask_ratio, channels, stride, dtype, backend, True)
    step, inputs = _fwd_or_fwdbwd(forward, sets, "fwdbwd", params)
    vis = None if backend is None else visible_fraction(sets[0][1])
    side = profile.op_size // stride
    info = _info(profile, f"{family} fwdbwd", f"{what} @{side}px (stride {stride}) fwdbwd", backend, dtype,
                 mask_ratio, "fwdbwd", vis)
    return Workload(step, inputs, profile.op_batch, info, exclude=params + [_values(x) for x, *_ in inputs])


def batchnorm_workload(profile: Profile, channels: int, stride: int, backend: Backend | None,
                       dtype: torch.dtype, mask_ratio: float | None) -> Workload:
    """Training-mode BN forward + backward (statistics over visible positions only)."""
    weight, bias = _channel_params(profile, channels, 3)
    running_mean = torch.zeros(channels, device=profile.device)
    running_var = torch.ones(channels, device=profile.device)
    if backend is None:
        def forward(x):
            return F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    else:
        def forward(x):
            return backend.batch_norm(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5)
    return _stage_map_workload(profile, "batchnorm", f"batchnorm {channels}ch", channels, stride, backend, dtype,
                               mask_ratio, [weight, bias], forward)


def layernorm_workload(profile: Profile, channels: int, stride: int, backend: Backend | None,
                       dtype: torch.dtype, mask_ratio: float | None) -> Workload:
    """ConvNeXt's LayerNorm over the channels of each (visible) position, forward + backward."""
    weight, bias = _channel_params(profile, channels, 3)
    if backend is None:
        def forward(x):
            return F.layer_norm(x.movedim(1, -1), (channels,), weight.to(x.dtype), bias.to(x.dtype),
                                1e-6).movedim(-1, 1)
    else:
        def forward(x):
            return backend.layer_norm(x, weight, bias, 1e-6)
    return _stage_map_workload(profile, "layernorm", f"layernorm {channels}ch", channels, stride, backend, dtype,
                               mask_ratio, [weight, bias], forward)


def linear_workload(profile: Profile, channels: int, stride: int, backend: Backend | None, dtype: torch.dtype,
                    mask_ratio: float | None) -> Workload:
    """ConvNeXt's fc1 (C -> 4C over the channels of each visible position), forward + backward."""
    weight = _leaf(random_tensor((4 * channels, channels), dtype, profile.device, 5) * channels ** -0.5, True)
    bias = _leaf(random_tensor((4 * channels,), dtype, profile.device, 6), True)
    if backend is None:
        def forward(x):
            return F.linear(x.movedim(1, -1), weight, bias)
    else:
        def forward(x):
            return backend.linear(x, weight, bias)
    return _stage_map_workload(profile, "linear", f"linear {channels}->{4 * channels}", channels, stride, backend,
                               dtype, mask_ratio, [weight, bias], forward)


def maxpool_workload(profile: Profile, backend: Backend | None, dtype: torch.dtype,
                     mask_ratio: float | None, mode: str) -> Workload:
    """ResNet's 3x3/2 max pool after the stem (64 channels, stride 2 -> 4)."""
    sets = _make_sets(profile, mask_ratio, 64, 2, dtype, backend, mode == "fwdbwd")
    if backend is None:
        def forward(x):
            return F.max_pool2d(x, 3, 2, 1)
    else:
        def forward(x):
            return backend.max_pool2d(x, 3, 2, 1)
    step, inputs = _fwd_or_fwdbwd(forward, sets, mode, [])
    vis = None if backend is None else visible_fraction(sets[0][1])
    side = profile.op_size // 2
    info = _info(profile, f"maxpool {mode}", f"maxpool 3x3/2 64ch @{side}px {mode}", backend, dtype,
                 mask_ratio, mode, vis)
    return Workload(step, inputs, profile.op_batch, info, exclude=[_values(x) for x, *_ in inputs],
                    backward=mode == "fwdbwd")


def pack_workload(profile: Profile, backend: Backend, dtype: torch.dtype, mask_ratio: float) -> Workload:
    """``sparse_input``: an image batch into the backend's layout (the encoder's first step)."""
    sets = []
    for k in range(profile.rotate):
        inp = _Inputs(profile, 1000 * k + 17, mask_ratio, 3, 1, dtype)
        sets.append((inp.dense, inp.index))

    def step(inp):
        with torch.no_grad():
            return backend.sparse_input(inp[0], inp[1])
    info = _info(profile, "layout", f"pack images 3ch @{profile.op_size}px", backend, dtype, mask_ratio, "fwd",
                 visible_fraction(sets[0][1]))
    return Workload(step, sets, profile.op_batch, info, backward=False)


def to_dense_workload(profile: Profile, channels: int, stride: int, backend: Backend, dtype: torch.dtype,
                      mask_ratio: float) -> Workload:
    sets = _make_sets(profile, mask_ratio, channels, stride, dtype, backend, False)

    def step(inp):
        with torch.no_grad():
            return backend.to_dense(inp[0])
    side = profile.op_size // stride
    info = _info(profile, "layout", f"to_dense {channels}ch @{side}px", backend, dtype, mask_ratio, "fwd",
                 visible_fraction(sets[0][1]))
    return Workload(step, sets, profile.op_batch, info, backward=False)


def densify_workload(profile: Profile, channels: int, stride: int, backend: Backend, dtype: torch.dtype,
                     mask_ratio: float) -> Workload:
    """SparK's densify (masked positions filled with a learned token), forward + backward."""
    token = _leaf(random_tensor((channels,), dtype, profile.device, 9), True)
    sets = _make_sets(profile, mask_ratio, channels, stride, dtype, backend, True)

    def forward(x):
        return backend.densify(x, token)
    step, inputs = _fwd_or_fwdbwd(forward, sets, "fwdbwd", [token])
    side = profile.op_size // stride
    info = _info(profile, "layout", f"densify {channels}ch @{side}px fwdbwd", backend, dtype, mask_ratio,
                 "fwdbwd", visible_fraction(sets[0][1]))
    return Workload(step, inputs, profile.op_batch, info, exclude=[token] + [_values(x) for x, *_ in inputs])


def patch_index_workload(profile: Profile, mask_ratio: float) -> Workload:
    """Building the per-batch PatchIndex from a mask (backend-independent)."""
    masks = [random_mask(profile.op_batch, profile.op_size, mask_ratio, profile.device, 31 + k)
             for k in range(profile.rotate)]

    def step(active):
        return PatchIndex(active)
    info = {"suite": "ops", "family": "index", "case": f"PatchIndex @{profile.op_size}px", "mode": "fwd",
            "backend": "index", "dtype": "bool", "batch": profile.op_batch, "image_size": profile.op_size,
            "mask_ratio": mask_ratio, "visible_fraction": visible_fraction(PatchIndex(masks[0]))}
    return Workload(step, masks, profile.op_batch, info, backward=False)
