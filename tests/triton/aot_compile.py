"""Compile the Triton kernels for sm_90 and sm_80 without a GPU (the real compiler, ptxas included).

The interpreter runs kernels as numpy and misses errors only the GPU compiler
sees (types, layouts, constexpr rules). ``python -m tests.triton.aot_compile``
compiles every kernel variant for both architectures (a few minutes on 2 cores);
``test_compile_for_gpu.py`` compiles the key variants in CI. Must run in a
process where TRITON_INTERPRET is unset before triton is imported.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ctssl.kernels.batchnorm as bn  # noqa: E402
import ctssl.kernels.conv as conv  # noqa: E402
import ctssl.kernels.layout as layout  # noqa: E402
import ctssl.kernels.pool as pool  # noqa: E402
import ctssl.kernels.reduce as red  # noqa: E402


def _ty(v):
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(v)


def compile_kernel(fn, args: dict, consts: dict, arch: int):
    sig = {k: _ty(v) for k, v in args.items()}
    sig.update({k: "constexpr" for k in consts})
    sig = {k: sig[k] for k in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})


def P(t: str) -> str:
    return "*" + t


F32 = P("fp32")
I32 = P("i32")


def _conv_cases(dt: str) -> list:
    out = []
    gemm_args = dict(src_ptr=P(dt), w_ptr=P(dt), bias_ptr=F32, dst_ptr=P(dt), stats_ptr=F32, nbr_ptr=I32,
                     taps_ptr=I32, ntaps_ptr=I32, M=1000, C_IN=64, C_OUT=64, Q=8, P_SRC=16, P_DST=8, SRC_STEP=2,
                     DST_STEP=3, MAX_TAPS=9, M_KEY=10)
    wgrad_args = dict(src_ptr=P(dt), dy_ptr=P(dt), out_ptr=F32, nbr_ptr=I32, taps_ptr=I32, M=1000, C_IN=64,
                      C_OUT=64, Q=8, P_SRC=16, SRC_STEP=2, NUM_TAPS=9, ROWS_PER_SPLIT=512, M_KEY=10)
    precision = "tf32" if dt == "fp32" else "ieee"
    for flat in (False, True):
        for stats in (False, True):
            out.append((conv._gather_gemm_kernel, gemm_args,
                        dict(HAS_BIAS=True, STATS=stats, FLAT_K=flat, PRECISION=precision, BLOCK_M=128,
                             BLOCK_N=128, BLOCK_K=64)))
        for atomic in (False, True):
            out.append((conv._wgrad_kernel, wgrad_args,
                        dict(FLAT_K=flat, ATOMIC=atomic, PRECISION=precision, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64)))
    return out


def _bn_cases(dt: str) -> list:
    out = [(bn._partial_stats_kernel, dict(x_ptr=P(dt), part_ptr=F32, M=1000, C=64), dict(BLOCK_M=128, BLOCK_C=32))]
    stats1 = dict(mean1_ptr=F32, invstd1_ptr=F32)
    stats2 = dict(mean2_ptr=F32, invstd2_ptr=F32)
    for pair in (False, True):
        apply_args = dict(x1_ptr=P(dt), **stats1, w1_ptr=F32, b1_ptr=F32, x2_ptr=P(dt), **stats2, w2_ptr=F32,
                          b2_ptr=F32, res_ptr=P(dt), y_ptr=P(dt), M=1000, C=64)
        out.append((bn._apply_kernel, apply_args,
                    dict(HAS_W1=True, HAS_B1=True, HAS_BN2=pair, HAS_W2=True, HAS_B2=True, HAS_RES=not pair,
                         RELU=pair, BLOCK_M=64, BLOCK_C=64)))
        reduce_args = dict(dy_ptr=P(dt), y_ptr=P(dt), x1_ptr=P(dt), **stats1, x2_ptr=P(dt), **stats2, part_ptr=F32,
                           M=1000, C=64, ROWS_PER_PROGRAM=512)
        out.append((bn._bwd_reduce_kernel, reduce_args, dict(RELU=pair, HAS_BN2=pair, BLOCK_M=128, BLOCK_C=32)))
        dx_args = dict(dy_ptr=P(dt), y_ptr=P(dt), x1_ptr=P(dt), **stats1, w1_ptr=F32, x2_ptr=P(dt), **stats2,
                       w2_ptr=F32, sums_ptr=F32, dx1_ptr=P(dt), dx2_ptr=P(dt), dres_ptr=P(dt), M=1000, C=64,
                       inv_n1=0.1, inv_n2=0.1)
        out.append((bn._bwd_dx_kernel, dx_args,
                    dict(RELU=pair, HAS_W1=True, BATCH1=pair, NEED_DX1=True, HAS_BN2=pair, HAS_W2=True,
                         BATCH2=True, NEED_DX2=pair, NEED_DRES=True, BLOCK_M=64, BLOCK_C=64)))
    return out


def _pool_layout_cases(dt: str) -> list:
    geom = dict(M=1000, C=64, Q=8, P=16, STRIDE=2, PAD=1)
    blocks = dict(BLOCK_M=64, BLOCK_C=64)
    dense = dict(NPIX=1000, C=64, H=64, W=64, P=8, GW=8)
    out = [
        (pool._maxpool_fwd_kernel, dict(x_ptr=P(dt), y_ptr=P(dt), arg_ptr=P("i8"), nbr_ptr=I32, **geom),
         dict(K=3, **blocks)),
        (pool._maxpool_bwd_kernel, dict(dy_ptr=P(dt), arg_ptr=P("i8"), dx_ptr=P(dt), nbr_ptr=I32, **geom),
         dict(K=3, **blocks)),
        (layout._pack_kernel, dict(img_ptr=P(dt), rows_ptr=P(dt), coords_ptr=I32, M=1000, C=3, P=32, s_b=3000,
                                   s_c=1000, s_h=100, s_w=1), dict(BLOCK_M=64, BLOCK_C=32)),
        (layout._masked_sum_kernel, dict(g_ptr=P(dt), slot_ptr=I32, part_ptr=F32, **dense, s_b=4, s_c=4, s_h=4, s_w=4),
         dict(BLOCK_PIX=256, BLOCK_C=16)),
    ]
    for token in (False, True):
        out.append((layout._unpack_kernel, dict(rows_ptr=P(dt), out_ptr=P(dt), slot_ptr=I32, token_ptr=F32, **dense),
                    dict(FILL_TOKEN=token, BLOCK_PIX=128, BLOCK_C=16)))
    return out


def cases(dtypes=("fp16", "bf16", "fp32")) -> list:
    """(kernel, argument types, constexprs) for every variant the wrappers launch."""
    out = []
    for dt in dtypes:
        out += _conv_cases(dt) + _bn_cases(dt) + _pool_layout_cases(dt)
    for running, rows in (("fp16", 1000), ("fp32", 1)):  # rows == 1 arrives as a constexpr
        args = dict(part_ptr=F32, mean_ptr=F32, invstd_ptr=F32, var_ptr=F32, rmean_ptr=P(running),
                    rvar_ptr=P(running), M=rows, C=64, BLOCKS=8, momentum=0.1, eps=1e-5)
        out.append((bn._finalize_kernel, args, dict(PART_BLOCK_M=128, UPDATE=rows > 1, BLOCK_P=32, BLOCK_C=32)))
    out.append((red._column_partial_kernel, dict(x_ptr=P("bf16"), out_ptr=F32, M=1000, C=64),
                dict(BLOCK_M=128, BLOCK_C=64)))
    out.append((red._sum_leading_kernel, dict(x_ptr=F32, out_ptr=F32, S=10, L=1000), dict(BLOCK_S=8, BLOCK_L=256)))
    return out


QUICK = ("_gather_gemm_kernel", "_wgrad_kernel", "_bwd_dx_kernel", "_maxpool_fwd_kernel", "_unpack_kernel")


def quick_cases() -> list:
    """One bf16 variant of each key kernel (the CI check): the GEMMs with their flags on."""
    picked, seen = [], set()
    for fn, args, consts in cases(("bf16",)):
        key = (fn.__name__, consts.get("FLAT_K"))
        if fn.__name__ in QUICK and key not in seen and (consts.get("STATS", True) and consts.get("ATOMIC", True)):
            seen.add(key)
            picked.append((fn, args, consts))
    return picked


def main(argv=None) -> int:
    """Compile the variants for sm_90 and sm_80 (``--quick``: key ones, sm_90); exit code = failures."""
    argv = sys.argv[1:] if argv is None else argv
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")]
    fails = 0
    for arch in (90,) if quick else (90, 80):
        t = time.time()
        todo = quick_cases() if quick else cases()
        todo = [c for c in todo if not names or any(n in c[0].__name__ for n in names)]
        for fn, args, consts in todo:
            try:
                compile_kernel(fn, args, consts, arch)
            except Exception as e:  # report every failing variant, not just the first
                fails += 1
                print("FAIL", arch, fn.__name__, consts, repr(e)[:2000])
        print(f"sm_{arch}: {len(todo)} variants in {time.time() - t:.0f} s")
    print("failures", fails)
    return fails


if __name__ == "__main__":
    sys.exit(main())
