"""Compile every Triton kernel for sm_90 and sm_80 without a GPU, and report what ptxas says of it.

The interpreter runs kernels as numpy: it misses the errors only the GPU compiler
sees (types, layouts, constexpr rules) and says nothing of registers or spills. This
compiles each kernel variant the wrappers launch, for every autotune config (pruned as
the autotuner prunes) and the fixed config (deterministic mode), with the argument
specialization Triton's JIT applies at run time (16-byte aligned pointers, integers
divisible by 16, integers equal to 1 become constants) at the shapes of one ResNet-50
SparK step (batch 128, 224 px, mask ratio 0.6) and, for the volume variants (``3-D``),
of one ResNet-18-3D step (batch 8, 128^3 crops, mask ratio 0.6), and of ConvNeXt-S's
kernels at the ResNet-50 step, and reads registers and spill bytes (``ptxas -v``), shared
memory (Triton's metadata) and vectorised global loads/stores (the PTX) of each.

    python -m benchmarks.kernel_compile                    # every variant and config, sm_90 + sm_80
    python -m benchmarks.kernel_compile --quick            # fixed configs only, bf16 + fp32 (the CI check)
    python -m benchmarks.kernel_compile --out DIR conv     # + DIR/kernel-resources.{json,md}; names filter

Exit code: the number of variants that failed to compile. Run it in a process where
TRITON_INTERPRET is unset before triton is imported (this module unsets it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ctssl.kernels.batchnorm as bn  # noqa: E402
import ctssl.kernels.conv as conv  # noqa: E402
import ctssl.kernels.depthwise as dw  # noqa: E402
import ctssl.kernels.layernorm as ln  # noqa: E402
import ctssl.kernels.layout as layout  # noqa: E402
import ctssl.kernels.pool as pool  # noqa: E402
import ctssl.kernels.reduce as red  # noqa: E402
from ctssl.kernels.runtime import STATS_BLOCK_M, TunedKernel, size_key  # noqa: E402

from .extension_resources import triton_bundled_tool  # noqa: E402

SMEM_LIMIT = {90: 232448, 80: 166912}
"""Most shared memory one block may use: H100/H200 (227 KiB) and A100 (163 KiB)."""

# One ResNet-50 SparK step: batch 128, 224 px in 7 x 7 patches of 32 px, 20 of 49 visible.
PATCHES = 128 * 20
STEM_P, STAGE1_P, STAGE2_P = 32, 8, 4  # patch side at the stem input, stage 1 and stage 2
# One ResNet-18-3D SparK step: batch 8, 128^3 crops in 4 x 4 x 4 patches of 32^3 voxels, 26 of 64 visible.
PATCHES_3D = 8 * 26
# ConvNeXt-S's stages at the same step: (patch side, neighbour radius of the 7x7 conv, channels)
CONVNEXT_STAGES = ((8, 1, 96), (4, 1, 192), (2, 2, 384), (1, 3, 768))


@dataclass(frozen=True)
class Variant:
    """One way a wrapper launches a kernel: example arguments (values or ``*dtype``) and flags."""

    name: str
    tuned: TunedKernel
    args: dict
    flags: dict = field(default_factory=dict)

    def configs(self, every: bool) -> list[tuple[str, triton.Config]]:
        """The fixed config, and with ``every`` the autotune configs the pruner keeps here."""
        out = [("fixed", self.tuned.fixed)]
        if every and len(self.tuned.configs) > 1:
            kept = self.tuned.configs
            if self.tuned.prune is not None:
                kept = self.tuned.prune(kept, dict(self.args), **self.flags)
            out += [(f"tuned {self.tuned.configs.index(c)}", c) for c in kept]
        return out


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _conv_variants(dt: str) -> list[Variant]:
    x, f32, i32 = _ptr(dt), _ptr("fp32"), _ptr("i32")
    precision = "tf32" if dt == "fp32" else "ieee"
    ptrs = dict(src_ptr=x, w_ptr=x, bias_ptr=f32, dst_ptr=x, stats_ptr=f32, nbr_ptr=i32, taps_ptr=i32,
                ntaps_ptr=i32)
    m1, m_stem = PATCHES * STAGE1_P ** 2, PATCHES * (STEM_P // 2) ** 2
    fwd = dict(NDIM=2, HAS_BIAS=False, STATS=True, PRECISION=precision)
    out = [
        Variant(f"conv fwd 3x3/1 64->64 stage 1 +stats ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m1, C_IN=64, C_OUT=64, Q=STAGE1_P, P_SRC=STAGE1_P, P_DST=STAGE1_P, SRC_STEP=1,
                     DST_STEP=1, MAX_TAPS=9, M_KEY=size_key(m1)), dict(fwd, FLAT_K=False)),
        Variant(f"conv fwd 3x3/2 128->128 stage 2 entry ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=PATCHES * STAGE2_P ** 2, C_IN=128, C_OUT=128, Q=STAGE2_P, P_SRC=STAGE1_P,
                     P_DST=STAGE2_P, SRC_STEP=2, DST_STEP=1, MAX_TAPS=9, M_KEY=size_key(PATCHES * 16)),
                dict(fwd, FLAT_K=False)),
        Variant(f"conv fwd 7x7/2 stem 3->64 +stats, FLAT_K ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m_stem, C_IN=3, C_OUT=64, Q=STEM_P // 2, P_SRC=STEM_P, P_DST=STEM_P // 2,
                     SRC_STEP=2, DST_STEP=1, MAX_TAPS=49, M_KEY=size_key(m_stem)), dict(fwd, FLAT_K=True)),
        Variant(f"conv fwd 7x7/2 stem 1->64 (grey CT) +stats, FLAT_K ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m_stem, C_IN=1, C_OUT=64, Q=STEM_P // 2, P_SRC=STEM_P, P_DST=STEM_P // 2,
                     SRC_STEP=2, DST_STEP=1, MAX_TAPS=49, M_KEY=size_key(m_stem)), dict(fwd, FLAT_K=True)),
        Variant(f"conv fwd 3x3/1 24->40, channels not multiples of 16 ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m1 - 64, C_IN=24, C_OUT=40, Q=STAGE1_P, P_SRC=STAGE1_P, P_DST=STAGE1_P, SRC_STEP=1,
                     DST_STEP=1, MAX_TAPS=9, M_KEY=size_key(m1)), dict(fwd, FLAT_K=False)),
        Variant(f"conv dgrad 3x3/2 128->128 stage 2 entry ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=PATCHES * STAGE2_P ** 2, C_IN=128, C_OUT=128, Q=STAGE2_P, P_SRC=STAGE2_P,
                     P_DST=STAGE1_P, SRC_STEP=1, DST_STEP=2, MAX_TAPS=4, M_KEY=size_key(PATCHES * 16)),
                dict(NDIM=2, HAS_BIAS=False, STATS=False, FLAT_K=False, PRECISION=precision)),
    ]
    wptrs = dict(src_ptr=x, dy_ptr=x, out_ptr=f32, nbr_ptr=i32, taps_ptr=i32)
    for atomic in (True, False):
        mode = "atomic" if atomic else "deterministic"
        out += [
            Variant(f"conv wgrad 3x3/1 64->64 stage 1, {mode} ({dt})", conv._WGRAD,
                    dict(wptrs, M=m1, C_IN=64, C_OUT=64, Q=STAGE1_P, P_SRC=STAGE1_P, SRC_STEP=1, NUM_TAPS=9,
                         ROWS_PER_SPLIT=2048, M_KEY=size_key(m1)),
                    dict(NDIM=2, FLAT_K=False, ATOMIC=atomic, PRECISION=precision)),
            Variant(f"conv wgrad 7x7/2 stem 3->64, FLAT_K, {mode} ({dt})", conv._WGRAD,
                    dict(wptrs, M=m_stem, C_IN=3, C_OUT=64, Q=STEM_P // 2, P_SRC=STEM_P, SRC_STEP=2, NUM_TAPS=49,
                         ROWS_PER_SPLIT=8192, M_KEY=size_key(m_stem)),
                    dict(NDIM=2, FLAT_K=True, ATOMIC=atomic, PRECISION=precision)),
        ]
    return out + _conv_variants_3d(dt, ptrs, wptrs, precision)


def _conv_variants_3d(dt: str, ptrs: dict, wptrs: dict, precision: str) -> list[Variant]:
    """The conv variants of a ResNet-18-3D step: 27-tap GEMMs, the 343-tap stem, 8 dgrad parity classes."""
    m1, m2, m_stem = PATCHES_3D * STAGE1_P ** 3, PATCHES_3D * STAGE2_P ** 3, PATCHES_3D * (STEM_P // 2) ** 3
    fwd = dict(NDIM=3, HAS_BIAS=False, STATS=True, PRECISION=precision)
    out = [
        Variant(f"conv fwd 3x3x3/1 64->64 stage 1 +stats, 3-D ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m1, C_IN=64, C_OUT=64, Q=STAGE1_P, P_SRC=STAGE1_P, P_DST=STAGE1_P, SRC_STEP=1,
                     DST_STEP=1, MAX_TAPS=27, M_KEY=size_key(m1)), dict(fwd, FLAT_K=False)),
        Variant(f"conv fwd 3x3x3/2 128->128 stage 2 entry, 3-D ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m2, C_IN=128, C_OUT=128, Q=STAGE2_P, P_SRC=STAGE1_P, P_DST=STAGE2_P, SRC_STEP=2,
                     DST_STEP=1, MAX_TAPS=27, M_KEY=size_key(m2)), dict(fwd, FLAT_K=False)),
        Variant(f"conv fwd 7x7x7/2 stem 1->64 +stats, FLAT_K, 3-D ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m_stem, C_IN=1, C_OUT=64, Q=STEM_P // 2, P_SRC=STEM_P, P_DST=STEM_P // 2,
                     SRC_STEP=2, DST_STEP=1, MAX_TAPS=343, M_KEY=size_key(m_stem)), dict(fwd, FLAT_K=True)),
        Variant(f"conv dgrad 3x3x3/2 128->128 stage 2 entry, 3-D ({dt})", conv._GATHER_GEMM,
                dict(ptrs, M=m2, C_IN=128, C_OUT=128, Q=STAGE2_P, P_SRC=STAGE2_P, P_DST=STAGE1_P, SRC_STEP=1,
                     DST_STEP=2, MAX_TAPS=8, M_KEY=size_key(m2)),
                dict(NDIM=3, HAS_BIAS=False, STATS=False, FLAT_K=False, PRECISION=precision)),
    ]
    for atomic in (True, False):
        mode = "atomic" if atomic else "deterministic"
        out += [
            Variant(f"conv wgrad 3x3x3/1 64->64 stage 1, {mode}, 3-D ({dt})", conv._WGRAD,
                    dict(wptrs, M=m1, C_IN=64, C_OUT=64, Q=STAGE1_P, P_SRC=STAGE1_P, SRC_STEP=1, NUM_TAPS=27,
                         ROWS_PER_SPLIT=2048, M_KEY=size_key(m1)),
                    dict(NDIM=3, FLAT_K=False, ATOMIC=atomic, PRECISION=precision)),
            Variant(f"conv wgrad 7x7x7/2 stem 1->64, FLAT_K, {mode}, 3-D ({dt})", conv._WGRAD,
                    dict(wptrs, M=m_stem, C_IN=1, C_OUT=64, Q=STEM_P // 2, P_SRC=STEM_P, SRC_STEP=2,
                         NUM_TAPS=343, ROWS_PER_SPLIT=8192, M_KEY=size_key(m_stem)),
                    dict(NDIM=3, FLAT_K=True, ATOMIC=atomic, PRECISION=precision)),
        ]
    return out


def _bn_variants(dt: str) -> list[Variant]:
    x, f32 = _ptr(dt), _ptr("fp32")
    M, C = PATCHES * STAGE1_P ** 2, 256
    s1, s2 = dict(mean1_ptr=f32, invstd1_ptr=f32), dict(mean2_ptr=f32, invstd2_ptr=f32)
    out = [Variant(f"bn partial stats ({dt})", bn._PARTIAL_STATS, dict(x_ptr=x, part_ptr=f32, M=M, C=C))]
    for pair in (False, True):  # one BN + residual + ReLU, or the bottleneck's two BNs + ReLU
        what = "two BNs + ReLU" if pair else "BN + residual + ReLU"
        out += [
            Variant(f"bn apply, {what} ({dt})", bn._APPLY,
                    dict(x1_ptr=x, **s1, w1_ptr=f32, b1_ptr=f32, x2_ptr=x, **s2, w2_ptr=f32, b2_ptr=f32,
                         res_ptr=x, y_ptr=x, M=M, C=C),
                    dict(HAS_W1=True, HAS_B1=True, HAS_BN2=pair, HAS_W2=True, HAS_B2=True, HAS_RES=not pair,
                         RELU=True)),
            Variant(f"bn backward reduce, {what} ({dt})", bn._BWD_REDUCE,
                    dict(dy_ptr=x, y_ptr=x, x1_ptr=x, **s1, x2_ptr=x, **s2, part_ptr=f32, M=M, C=C,
                         ROWS_PER_PROGRAM=2048), dict(RELU=True, HAS_BN2=pair)),
            Variant(f"bn backward dx, {what} ({dt})", bn._BWD_DX,
                    dict(dy_ptr=x, y_ptr=x, x1_ptr=x, **s1, w1_ptr=f32, x2_ptr=x, **s2, w2_ptr=f32, sums_ptr=f32,
                         dx1_ptr=x, dx2_ptr=x, dres_ptr=x, M=M, C=C, inv_n1=1.0 / M, inv_n2=1.0 / M),
                    dict(RELU=True, HAS_W1=True, BATCH1=True, NEED_DX1=True, HAS_BN2=pair, HAS_W2=True,
                         BATCH2=True, NEED_DX2=pair, NEED_DRES=not pair)),
        ]
    return out


def _pool_layout_variants(dt: str) -> list[Variant]:
    x, f32, i32 = _ptr(dt), _ptr("fp32"), _ptr("i32")
    geom = dict(M=PATCHES * STAGE1_P ** 2, C=64, Q=STAGE1_P, P=STEM_P // 2, STRIDE=2, PAD=1)
    npix, side = 128 * 56 * 56, 56
    dense = dict(NPIX=npix, C=256, D=1, H=side, W=side, P=STAGE1_P, GW=7)  # images: D is 1, depth strides 0
    return [
        Variant(f"max pool fwd 3x3/2 ({dt})", pool._FWD, dict(x_ptr=x, y_ptr=x, arg_ptr=_ptr("i8"), nbr_ptr=i32,
                                                          **geom), dict(K=3, NDIM=2)),
        Variant(f"max pool bwd 3x3/2 ({dt})", pool._BWD, dict(dy_ptr=x, arg_ptr=_ptr("i8"), dx_ptr=x, nbr_ptr=i32,
                                                          **geom), dict(K=3, NDIM=2)),
        Variant(f"pack image ({dt})", layout._PACK,
                dict(img_ptr=x, rows_ptr=x, coords_ptr=i32, M=PATCHES * STEM_P ** 2, C=3, P=STEM_P,
                     s_b=3 * 224 * 224, s_c=224 * 224, s_d=0, s_h=224, s_w=1), dict(NDIM=2)),
        Variant(f"densify with mask token, channels-last ({dt})", layout._UNPACK,
                dict(rows_ptr=x, out_ptr=x, slot_ptr=i32, token_ptr=f32, **dense, o_b=256 * side * side, o_c=1,
                     o_d=0, o_h=side * 256, o_w=256), dict(NDIM=2, FILL_TOKEN=True)),
        Variant(f"masked sum (token grad) ({dt})", layout._MASKED_SUM,
                dict(g_ptr=x, slot_ptr=i32, part_ptr=f32, **dense, s_b=256 * side * side, s_c=side * side,
                     s_d=0, s_h=side, s_w=1), dict(NDIM=2)),
        Variant(f"column partial sums ({dt})", red._COLUMN_PARTIAL, dict(x_ptr=x, out_ptr=f32, M=geom["M"], C=256)),
    ] + _pool_layout_variants_3d(dt)


def _pool_layout_variants_3d(dt: str) -> list[Variant]:
    """Max pool and layout kernels of a ResNet-18-3D step: 3x3x3 windows, 128^3 crops, stage-1 maps."""
    x, f32, i32 = _ptr(dt), _ptr("fp32"), _ptr("i32")
    geom = dict(M=PATCHES_3D * STAGE1_P ** 3, C=64, Q=STAGE1_P, P=STEM_P // 2, STRIDE=2, PAD=1)
    side, crop = 32, 128  # the stage-1 map of a 128^3 crop
    vox = side ** 3
    dense = dict(NPIX=8 * vox, C=64, D=side, H=side, W=side, P=STAGE1_P, GW=4)
    return [
        Variant(f"max pool fwd 3x3x3/2, 3-D ({dt})", pool._FWD,
                dict(x_ptr=x, y_ptr=x, arg_ptr=_ptr("i8"), nbr_ptr=i32, **geom), dict(K=3, NDIM=3)),
        Variant(f"max pool bwd 3x3x3/2, 3-D ({dt})", pool._BWD,
                dict(dy_ptr=x, arg_ptr=_ptr("i8"), dx_ptr=x, nbr_ptr=i32, **geom), dict(K=3, NDIM=3)),
        Variant(f"pack volume, 3-D ({dt})", layout._PACK,
                dict(img_ptr=x, rows_ptr=x, coords_ptr=i32, M=PATCHES_3D * STEM_P ** 3, C=1, P=STEM_P,
                     s_b=crop ** 3, s_c=crop ** 3, s_d=crop * crop, s_h=crop, s_w=1), dict(NDIM=3)),
        Variant(f"densify with mask token, channels-last, 3-D ({dt})", layout._UNPACK,
                dict(rows_ptr=x, out_ptr=x, slot_ptr=i32, token_ptr=f32, **dense, o_b=64 * vox, o_c=1,
                     o_d=64 * side * side, o_h=64 * side, o_w=64), dict(NDIM=3, FILL_TOKEN=True)),
        Variant(f"masked sum (token grad), 3-D ({dt})", layout._MASKED_SUM,
                dict(g_ptr=x, slot_ptr=i32, part_ptr=f32, **dense, s_b=64 * vox, s_c=vox, s_d=side * side,
                     s_h=side, s_w=1), dict(NDIM=3)),
    ]


def _convnext_variants(dt: str) -> list[Variant]:
    """ConvNeXt-S's depthwise 7x7 conv (forward + LayerNorm fused, alone, input and weight gradient) at the
    stages where it reads 1, 2 and 3 patches away, and LayerNorm over rows (stem / downsampling)."""
    x, f32, i32 = _ptr(dt), _ptr("fp32"), _ptr("i32")
    out = []
    for p, r, c in (CONVNEXT_STAGES[0], CONVNEXT_STAGES[2], CONVNEXT_STAGES[3]):
        M, geom = PATCHES * p * p, dict(P=p, R=r, K=7, PAD=3)
        where = f"{c}ch, patch side {p}, radius {r}"
        out += [
            Variant(f"convnext depthwise 7x7 + LayerNorm fwd, {where} ({dt})", dw._FWD_LN,
                    dict(x_ptr=x, w_ptr=f32, b_ptr=f32, lnw_ptr=f32, lnb_ptr=f32, conv_ptr=x, y_ptr=x, mean_ptr=f32,
                         rstd_ptr=f32, nbr_ptr=i32, M=M, C=c, eps=1e-6),
                    dict(geom, HAS_BIAS=True, HAS_LNW=True, HAS_LNB=True)),
            Variant(f"convnext depthwise 7x7 fwd / dgrad, {where} ({dt})", dw._FWD,
                    dict(x_ptr=x, w_ptr=f32, b_ptr=f32, y_ptr=x, nbr_ptr=i32, M=M, C=c), dict(geom, HAS_BIAS=False)),
        ]
        for atomic in (True, False):
            out.append(Variant(f"convnext depthwise 7x7 wgrad, {where}, {'atomic' if atomic else 'deterministic'} "
                               f"({dt})", dw._WGRAD,
                               dict(x_ptr=x, dy_ptr=x, out_ptr=f32, nbr_ptr=i32, M=M, C=c, ROWS_PER_SPLIT=M // 2),
                               dict(geom, ATOMIC=atomic)))
    M, c = PATCHES * 8 * 8, 96  # the stem's LayerNorm
    out += [
        Variant(f"convnext LayerNorm rows fwd, {c}ch ({dt})", ln._FWD,
                dict(x_ptr=x, w_ptr=f32, b_ptr=f32, y_ptr=x, mean_ptr=f32, rstd_ptr=f32, M=M, C=c, eps=1e-6),
                dict(HAS_W=True, HAS_B=True)),
        Variant(f"convnext LayerNorm rows bwd, {c}ch ({dt})", ln._BWD,
                dict(dy_ptr=x, x_ptr=x, w_ptr=f32, mean_ptr=f32, rstd_ptr=f32, dx_ptr=x, part_ptr=f32, M=M, C=c),
                dict(HAS_W=True, NEED_DX=True, NEED_PARAMS=True)),
    ]
    return out


def _shared_variants() -> list[Variant]:
    f32 = _ptr("fp32")
    return [
        Variant("bn finalize + running stats (fp32)", bn._FINALIZE,
                dict(part_ptr=f32, mean_ptr=f32, invstd_ptr=f32, var_ptr=f32, rmean_ptr=f32, rvar_ptr=f32,
                     M=PATCHES * 64, C=256, BLOCKS=PATCHES // 2, momentum=0.1, eps=1e-5),
                dict(UPDATE=True, PART_BLOCK_M=STATS_BLOCK_M)),
        Variant("sum of split partials (fp32)", red._SUM_LEADING, dict(x_ptr=f32, out_ptr=f32, S=10, L=9 * 64 * 64)),
    ]


def variants(dtypes=("bf16", "fp16", "fp32")) -> list[Variant]:
    """Every kernel variant the wrappers launch, per storage dtype."""
    out = []
    for dt in dtypes:
        out += _conv_variants(dt) + _bn_variants(dt) + _pool_layout_variants(dt)
    for dt in dtypes:  # after every ResNet variant, so the ResNet rows of the report keep their order
        out += _convnext_variants(dt)
    return out + _shared_variants()


def jit_specialization(value) -> tuple[str, object]:
    """(type, specialization) Triton's JIT gives a launch argument: an int equal to 1 becomes the
    constant 1, an int divisible by 16 gets "D" (16-divisible), a float is fp32; pointers (type
    strings here) are 16-byte aligned, as torch allocates them. Checked against triton's own rule."""
    if isinstance(value, str):
        return value, "D"
    if isinstance(value, float):
        return "fp32", None
    if value == 1:
        return "constexpr", 1
    ty = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    return ty, "D" if value % 16 == 0 else ""


def _specialize(fn, args: dict, consts: dict) -> tuple[dict, dict, dict]:
    """Signature, attributes and constants as the JIT would build them for these arguments."""
    sig, attrs, consts = {}, {}, dict(consts)
    for name, value in args.items():
        ty, spec = jit_specialization(value)
        if ty == "constexpr":
            consts[name] = spec
            continue
        sig[name] = ty
        if spec:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    sig.update({name: "constexpr" for name in consts})
    return {name: sig[name] for name in fn.arg_names}, attrs, consts


def compile_variant(fn, args: dict, consts: dict, arch: int, num_warps: int, num_stages: int):
    sig, attrs, consts = _specialize(fn, args, consts)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas(arch: int) -> str:
    """Triton's bundled ptxas (the one that built the kernel)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError):  # another triton layout: its bin folder, then PATH
        return triton_bundled_tool("ptxas") or "ptxas"


def ptxas_resources(compiled, arch: int) -> dict:
    """Registers per thread and spill bytes (``ptxas -v`` on the kernel's PTX), shared memory per block."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([_ptxas(arch), f"-arch={gpu}", "-v", ptx, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if proc.returncode != 0 or not regs or not spills:
        raise RuntimeError(f"ptxas -v gave no resource line: {report[-500:]}")
    smem = int(compiled.metadata.shared)
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared_bytes=smem, fits_shared=smem <= SMEM_LIMIT[arch])


def _measure(task: tuple) -> dict:
    """Compile one (arch, variant, config) and read its resources; a failure is a row with its error."""
    arch, v, label, cfg = task
    row = dict(arch=arch, variant=v.name, kernel=v.tuned.kernel.__name__, config=label, blocks=dict(cfg.kwargs),
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    t = time.time()
    try:
        compiled = compile_variant(v.tuned.kernel, v.args, {**v.flags, **cfg.kwargs}, arch, cfg.num_warps,
                                   cfg.num_stages)
        row.update(ptxas_resources(compiled, arch))
        row.update(lowering(compiled))
    except Exception as e:  # report every failing variant, not just the first
        row["error"] = repr(e)[:2000]
    row["seconds"] = round(time.time() - t, 1)
    return row


_FORKED_TASKS: list = []


def _measure_forked(i: int) -> dict:
    return _measure(_FORKED_TASKS[i])


def lowering(compiled) -> dict:
    """How the compiler lowered the kernel's dots and loads (from its TTGIR): ``mma`` is "wgmma"
    (Hopper warp-group MMA), "mma" (mma.sync) or "-" (no dot); ``async_copies`` counts cp.async /
    TMA copies, 0 meaning the loads feeding the dot were not software-pipelined."""
    ttgir = compiled.asm["ttgir"]
    mma = "wgmma" if "warp_group_dot" in ttgir else ("mma" if "tt.dot" in ttgir else "-")
    copies = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")
    stores = re.findall(r"\bst\.global((?:\.[a-z0-9]+)*)", compiled.asm["ptx"])
    vector = sum(".v2" in s or ".v4" in s for s in stores)
    loads = re.findall(r"\bld\.global((?:\.[a-z0-9]+)*)", compiled.asm["ptx"])
    return dict(mma=mma, async_copies=copies, global_stores=len(stores), vector_stores=vector,
                global_loads=len(loads), vector_loads=sum(".v2" in s or ".v4" in s for s in loads))


def run(archs, dtypes, every: bool, names=(), jobs: int = 1) -> list[dict]:
    """Rows for each (arch, variant, config), in that order; ``jobs`` compiler processes."""
    tasks = [(arch, v, label, cfg) for arch in archs for v in variants(dtypes)
             if not names or any(n in v.name or n in v.tuned.kernel.__name__ for n in names)
             for label, cfg in v.configs(every)]
    if jobs <= 1:
        rows = []
        for task in tasks:
            rows.append(_measure(task))
            print(_line(rows[-1]), flush=True)
        return rows
    import multiprocessing

    global _FORKED_TASKS
    _FORKED_TASKS = tasks  # the workers are forked: they see this list, and get only indices
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        rows = []
        for row in pool.imap(_measure_forked, range(len(tasks))):
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    head = (f"sm_{row['arch']} {row['variant']} "
            f"[{row['config']} {row['blocks']} w{row['num_warps']} s{row['num_stages']}]")
    if "error" in row:
        return f"FAIL {head}: {row['error']}"
    return (f"{head}: {row['registers']} regs, spill {row['spill_stores']}/{row['spill_loads']} B, "
            f"smem {row['shared_bytes']} B{'' if row['fits_shared'] else ' (OVER LIMIT)'}, "
            f"{row['mma']}, {row['async_copies']} async copies, "
            f"vector loads {row['vector_loads']}/{row['global_loads']}")


def markdown(rows: list[dict], command: str) -> str:
    """The report: toolchain, command, then one table row per compiled (variant, config, arch)."""
    ptxas = subprocess.run([_ptxas(90), "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Triton kernels: registers, spills and shared memory (static, ptxas)",
        "",
        f"- date: {datetime.date.today().isoformat()}; no GPU involved: compiled for the target, not run",
        f"- command: `{command}`",
        f"- triton {triton.__version__}; ptxas: {ptxas.splitlines()[-1] if ptxas else 'unknown'}",
        "- shapes: one ResNet-50 SparK step, batch 128, 224 px, mask ratio 0.6 (20 of 49 patches visible); `3-D` "
        "variants: one ResNet-18-3D step, batch 8, 128^3 crops (26 of 64 patches visible); ConvNeXt-S's "
        "depthwise/LayerNorm kernels at the ResNet-50 step; "
        "arguments specialized as Triton's JIT does at run time",
        f"- shared-memory limits per block: sm_90 {SMEM_LIMIT[90]} B, sm_80 {SMEM_LIMIT[80]} B; autotuning "
        "skips a config over the limit, the fixed config must fit",
        "- `fixed`: the config of deterministic mode (and of single-config kernels); `tuned i`: an autotune "
        "config the pruner keeps for this variant",
        "",
        "- `mma`: wgmma (Hopper warp-group MMA), mma (mma.sync) or - (no dot); `async`: cp.async/TMA copies "
        "in the TTGIR, 0 for a dot kernel meaning its loads were not software-pipelined; `vec st`: global "
        "store instructions in the PTX that write 2 or 4 words at once / all global stores",
        "",
        "| arch | variant | config | blocks | warps | stages | regs | spill st/ld (B) | smem (B) | mma | async "
        "| vec st |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocks = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["blocks"].items())
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['variant']} | {r['config']} | {blocks} | {r['num_warps']} | "
                         f"{r['num_stages']} | compile failed | | | | | |")
            continue
        smem = f"{r['shared_bytes']}" + ("" if r["fits_shared"] else " **over**")
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        if r["spill_stores"] or r["spill_loads"]:
            spill = f"**{spill}**"
        lines.append(f"| sm_{r['arch']} | {r['variant']} | {r['config']} | {blocks} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['registers']} | {spill} | {smem} | {r['mma']} | {r['async_copies']} | "
                     f"{r['vector_stores']}/{r['global_stores']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="only variants whose name or kernel contains one of these")
    p.add_argument("--quick", action="store_true", help="fixed configs only, bf16 and fp32")
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    p.add_argument("--out", help="write kernel-resources.json and kernel-resources.md into this folder")
    p.add_argument("--jobs", type=int, default=1, help="compiler processes")
    p.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16", "fp32"], help="storage dtypes (default: all; "
                   "bf16 and fp32 with --quick)")
    a = p.parse_args(argv)
    t = time.time()
    dtypes = a.dtypes or (["bf16", "fp32"] if a.quick else ["bf16", "fp16", "fp32"])
    rows = run(a.arch, tuple(dtypes), every=not a.quick, names=a.names,
               jobs=a.jobs)
    fails = sum("error" in r for r in rows)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        command = "python -m benchmarks.kernel_compile " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(os.path.join(a.out, "kernel-resources.json"), "w") as f:
            json.dump(dict(command=command, triton=triton.__version__, rows=rows), f, indent=1)
        with open(os.path.join(a.out, "kernel-resources.md"), "w") as f:
            f.write(markdown(rows, command))
    print(f"{len(rows)} compiled in {time.time() - t:.0f} s; failures {fails}")
    return fails


if __name__ == "__main__":
    sys.exit(main())
