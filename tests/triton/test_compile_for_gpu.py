"""The kernels compile for Hopper (sm_90) and Ampere (sm_80) with Triton's real compiler, on a machine
without a GPU, and the configs that deterministic mode runs neither spill registers nor exceed
shared memory there (ResNet's and ConvNeXt's kernels).

The interpreter cannot see GPU-only compile errors or register pressure; ptxas can. The full
report (every autotune config, every dtype) is ``python -m benchmarks.kernel_compile --out DIR``.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from ctssl.kernels import conv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_fixed_configs_compile_without_spills_for_sm90_and_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_compile", "--quick", "--jobs", "2",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if "ptxas" in out and ("not found" in out or "No such file" in out):
        pytest.skip(f"Triton's CUDA toolchain (ptxas) is not available here: {out[-300:]}")
    assert proc.returncode == 0, out[-4000:]
    rows = json.loads((tmp_path / "kernel-resources.json").read_text())["rows"]
    assert {r["arch"] for r in rows} == {90, 80}
    assert {r["kernel"] for r in rows} >= {"_gather_gemm_kernel", "_wgrad_kernel", "_apply_kernel",
                                           "_bwd_dx_kernel", "_maxpool_fwd_kernel", "_unpack_kernel",
                                           "_dw_fwd_kernel", "_dw_ln_fwd_kernel", "_dw_wgrad_kernel",
                                           "_ln_fwd_kernel", "_ln_bwd_kernel"}
    volumes = {r["kernel"] for r in rows if "3-D" in r["variant"]}  # the NDIM=3 specializations
    assert volumes >= {"_gather_gemm_kernel", "_wgrad_kernel", "_maxpool_fwd_kernel", "_maxpool_bwd_kernel",
                       "_pack_kernel", "_unpack_kernel", "_masked_sum_kernel"}
    assert not [r for r in rows if "error" in r]
    spilled = [(r["arch"], r["variant"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"fixed configs that spill registers: {spilled}"
    too_big = [(r["arch"], r["variant"], r["shared_bytes"]) for r in rows if not r["fits_shared"]]
    assert not too_big, f"fixed configs over the shared-memory limit: {too_big}"
    assert (tmp_path / "kernel-resources.md").read_text().count("| sm_") == len(rows)
    # the conv GEMMs use the tensor-core MMA of each target and software-pipeline their loads
    # (channel counts that are multiples of 16 allow the 16-byte async copies; bf16 24 -> 40 does not)
    gemms = [r for r in rows if r["kernel"] in ("_gather_gemm_kernel", "_wgrad_kernel")]
    assert len(gemms) >= 20
    assert all(r["mma"] == ("wgmma" if r["arch"] == 90 else "mma") for r in gemms)
    unpipelined = [(r["arch"], r["variant"]) for r in gemms
                   if not r["async_copies"] and "multiples of 16" not in r["variant"]]
    assert not unpipelined, f"conv GEMMs whose loads are not pipelined: {unpipelined}"
    # ConvNeXt's memory-bound kernels (depthwise conv, LayerNorm) read rows with vector loads
    convnext = [r for r in rows if r["variant"].startswith("convnext")]
    assert len(convnext) >= 40
    scalar = [(r["arch"], r["variant"]) for r in convnext if not r["vector_loads"]]
    assert not scalar, f"ConvNeXt kernels without vectorised global loads: {scalar}"


def _per_thread(c) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)


@pytest.mark.parametrize("tuned, prune", [(conv._GATHER_GEMM, conv._prune_gemm), (conv._WGRAD, conv._prune_wgrad)])
def test_flat_k_pruning_keeps_only_tiles_that_do_not_spill(tuned, prune):
    stem = {"C_IN": 3, "C_OUT": 64}
    kept = prune(tuned.configs, stem, FLAT_K=True)
    assert kept and len(kept) < len(tuned.configs)
    assert all(_per_thread(c) <= conv.FLAT_GATHER_PER_THREAD for c in kept)
    dropped = [c for c in tuned.configs if c not in kept and c.kwargs["BLOCK_N"] <= 64]
    assert any(_per_thread(c) > conv.FLAT_GATHER_PER_THREAD for c in dropped)


def test_tap_mode_pruning_fits_channels_and_keeps_k_blocks_of_32():
    kept = conv._prune_gemm(conv._GATHER_GEMM.configs, {"C_IN": 64, "C_OUT": 64}, FLAT_K=False)
    assert kept
    assert all(c.kwargs["BLOCK_K"] >= 32 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
    wide = conv._prune_gemm(conv._GATHER_GEMM.configs, {"C_IN": 512, "C_OUT": 512}, FLAT_K=False)
    assert any(c.kwargs["BLOCK_N"] == 256 for c in wide)
    assert not any(c.kwargs["BLOCK_K"] < 32 for c in wide)


def test_pruning_never_returns_nothing():
    tiny = {"C_IN": 1, "C_OUT": 1}
    assert conv._prune_gemm(conv._GATHER_GEMM.configs, tiny, FLAT_K=True)
    assert conv._prune_wgrad(conv._WGRAD.configs, tiny, FLAT_K=True)


def test_jit_specialization_matches_tritons_own_rule():
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    interpret = os.environ.get("TRITON_INTERPRET")  # the module unsets it for its own process
    try:
        from benchmarks.kernel_compile import jit_specialization
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    for value in (0, 1, 2, 3, 16, 48, 1000, 163840, 2 ** 31 + 16, -16, 0.1, 1e-5):
        assert jit_specialization(value) == tuple(native(BaseBackend, value, False, True, True)), value
    assert jit_specialization("*bf16") == ("*bf16", "D")
