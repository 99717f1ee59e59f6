"""The measuring tools themselves: inputs in each layout, saved-activation accounting,
the stand-alone encoder timing harness (tiny, on the CPU) and the GPU script's syntax."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import encoder_timing
import pytest
import torch
import torch.nn.functional as F
from bench_config import CPU_NOT_TIMED, NOMASK, backend_names, registry_status
from bench_profile import kernel_profile
from bench_timing import saved_activation_bytes
from bench_workload import random_mask, random_tensor, sparse_map

from ctssl.sparse import PatchIndex, get_backend

from .conftest import BENCHMARKS

HERE = str(BENCHMARKS)


@pytest.mark.parametrize("stride", [1, 4, 32])
@pytest.mark.parametrize("name", [n for n in backend_names() if n != NOMASK])
def test_sparse_map_holds_the_masked_features(name, stride):
    """The op benchmarks' inputs at a feature stride are the masked map, in every layout."""
    if registry_status().get(name) is not None:
        pytest.skip(f"backend {name!r} unavailable: {registry_status()[name]}")
    if name in CPU_NOT_TIMED:
        pytest.skip(f"backend {name!r}: {CPU_NOT_TIMED[name]}")
    backend = get_backend(name, "cpu")
    side = 64 // stride
    feats = random_tensor((2, 5, side, side), torch.float32, torch.device("cpu"), 1)
    index = PatchIndex(random_mask(2, 64, 0.5, torch.device("cpu"), 2))
    x = sparse_map(backend, feats, index, stride)
    assert x.stride == stride and x.index is index
    expected = feats * index.dense_mask(stride, feats.dtype)
    torch.testing.assert_close(x.to_dense(), expected)


def test_saved_activation_bytes_counts_saved_tensors_only():
    x = torch.randn(1000, requires_grad=True)
    assert saved_activation_bytes(lambda: x.exp().sum().backward()) == 4000  # exp saves its output
    w = torch.randn(8, 1000, requires_grad=True)
    assert saved_activation_bytes(lambda: F.linear(x, w).sum().backward(), exclude=[x, w]) == 0


def test_encoder_timing_cli_on_cpu(tmp_path):
    out = tmp_path / "enc.json"
    md = tmp_path / "enc.md"
    rc = encoder_timing.main(["--device", "cpu", "--arch", "resnet18", "--batch", "1", "--size", "64",
                              "--mask-ratios", "0.5", "--backends", "dense,torch", "--precision", "fp32",
                              "--warmup", "0", "--iters", "1", "--rotate", "1", "--json", str(out),
                              "--markdown", str(md), "--budget", "torch:1e6", "--falls-with-mask"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["format"] == encoder_timing.FORMAT
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"dense", "torch"}
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and len(r["times_ms"]) == 1 for r in rows.values())
    assert rows["torch"]["loss_check"] == "ok"  # same weights, same input: the same loss as the emulation
    assert rows["torch"]["visible_fraction"] == 0.5
    assert "| torch | 0.50 |" in md.read_text()
    auto = data["auto"]  # on the CPU auto has one candidate, and it was the one timed
    assert (auto["picked"], auto["error"], auto["fastest_measured"], auto["agrees"]) == ("torch", None, "torch", True)
    assert auto["explained"]["candidates"] == ["torch"] and "nothing measured" in auto["reason"]
    assert [b["met"] for b in data["budgets"]] == [True] and data["falls_with_mask"] == []  # one ratio: nothing
    assert "## Absolute goals" in md.read_text()


def test_spark_steps_with_decoder_implementations_and_the_spark_target(tmp_path):
    """--no-encoder --spark: the first decoder implementation on every backend, the others on auto's pick; the
    summary compares with the emulation's step and SparK's reference; a missed --spark-target exits 3."""
    out = tmp_path / "spark.json"
    rc = encoder_timing.main(["--device", "cpu", "--arch", "resnet18", "--batch", "1", "--size", "64",
                              "--mask-ratios", "0.5", "--backends", "dense,torch", "--precision", "fp32",
                              "--warmup", "0", "--iters", "1", "--rotate", "1", "--decoder-width", "64", "--spark",
                              "--no-encoder", "--decoder-impls", "eager,subpixel", "--spark-target", "1000",
                              "--profile-kernels", "3", "--profile-steps", "1",
                              "--json", str(out), "--markdown", str(tmp_path / "spark.md")])
    assert rc == 3  # nothing on a CPU is 1000x faster than the emulation
    data = json.loads(out.read_text())
    rows = [(r["case_kind"], r["backend"], r["decoder_impl"], r["status"]) for r in data["results"]]
    assert rows == [("spark", "dense", "eager", "ok"), ("spark", "torch", "eager", "ok"),
                    ("spark", "torch", "subpixel", "ok")]
    assert data["config"]["decoder_backend"] == "torch"
    by_impl = {r["decoder_impl"]: r for r in data["results"] if r["backend"] == "torch"}
    assert by_impl["subpixel"]["loss_check"] == "ok"  # an exact alternative: the emulation's loss
    s = data["spark_step"]
    assert s["best_backend"] == "torch" and s["met"] is False and s["required_speedup"] == 1000
    assert set(s["decoder_impls_timed"]) == {"eager", "subpixel"}
    assert s["speedup_vs_emulation"] == pytest.approx(s["emulation_median_ms"] / s["best_median_ms"])
    assert "auto" not in data
    text = (tmp_path / "spark.md").read_text()
    assert "## The whole SparK step" in text and "185 images/s per A100" in text and "**no**" in text
    assert "SparK step, subpixel decoder, torch" in text  # where the time goes, per decoder on the decoder backend
    assert "kernel_profile" not in data["results"][0]  # the emulation's step is not profiled


def test_spark_summary_picks_the_fastest_step_and_decoder():
    def row(backend, impl, ms):
        return {"status": "ok", "case_kind": "spark", "backend": backend, "decoder_impl": impl, "median_ms": ms,
                "images_per_s": 128 / (ms / 1e3)}
    rows = [row("dense", "eager", 400.0), row("triton", "eager", 120.0), row("cuda", "eager", 110.0),
            row("cuda", "subpixel", 95.0), row("cuda", "compiled", 80.0),
            {"status": "error", "case_kind": "spark", "backend": "spconv", "decoder_impl": "eager", "reason": "x"}]
    s = encoder_timing.spark_summary(rows, "eager", 4.0)
    assert (s["best_backend"], s["best_decoder_impl"], s["fastest_decoder_impl"]) == ("cuda", "compiled", "compiled")
    assert s["speedup_vs_emulation"] == 5.0 and s["met"] is True
    assert s["decoder_impls_timed"] == {"eager": 110.0, "subpixel": 95.0, "compiled": 80.0}
    assert s["vs_spark_reference"] == pytest.approx(1600 / encoder_timing.SPARK_REFERENCE_IMAGES_PER_S)
    assert round(encoder_timing.SPARK_REFERENCE_IMAGES_PER_S) == 185
    assert encoder_timing.spark_summary(rows, "eager", 6.0)["met"] is False
    assert encoder_timing.spark_summary(rows[:1], "eager", 4.0) is None  # only the emulation was timed


def test_targets_compare_medians_at_the_first_ratio():
    rows = [{"status": "ok", "case_kind": "encoder", "backend": NOMASK, "mask_ratio": None, "median_ms": 100.0},
            {"status": "ok", "case_kind": "encoder", "backend": "dense", "mask_ratio": 0.6, "median_ms": 300.0},
            {"status": "ok", "case_kind": "encoder", "backend": "torch", "mask_ratio": 0.6, "median_ms": 150.0},
            {"status": "ok", "case_kind": "encoder", "backend": "torch", "mask_ratio": 0.3, "median_ms": 10.0},
            {"status": "skipped", "case_kind": "encoder", "backend": "triton", "mask_ratio": 0.6, "reason": "no GPU"}]
    got = encoder_timing.check_targets(rows, [("torch", "dense", 1.5), ("torch", NOMASK, 2.0),
                                              ("triton", NOMASK, 2.0)], 0.6)
    assert [(t["measured_speedup"], t["met"]) for t in got] == [(2.0, True), (100 / 150, False), (None, None)]


def test_absolute_budgets_and_the_fall_with_the_mask_ratio():
    def row(backend, ratio, ms, gib=None):
        return {"status": "ok", "case_kind": "encoder", "backend": backend, "mask_ratio": ratio, "median_ms": ms,
                "peak_mem_bytes": None if gib is None else gib * 2 ** 30}
    rows = [row(NOMASK, None, 30.0), row("dense", 0.6, 140.0), row("dense", 0.3, 139.0), row("dense", 0.9, 141.0),
            row("triton", 0.6, 9.0, 2.0), row("triton", 0.3, 14.0, 3.0), row("triton", 0.9, 5.0, 1.0),
            row("cuda", 0.6, 13.0, 2.0), row("cuda", 0.3, 12.0, 3.0)]
    got = encoder_timing.check_budgets(rows, [("triton", 10.0, 2.5), ("triton", 10.0, 1.5), ("cuda", 12.0, None),
                                              ("spconv", 12.0, None)], 0.6)
    assert [b["met"] for b in got] == [True, False, False, None]  # fast but too much memory; too slow; not timed
    assert got[0]["measured_gib"] == 2.0
    falls = {f["backend"]: f["met"] for f in encoder_timing.check_falls_with_mask(rows)}
    assert falls == {"triton": True, "cuda": False}  # the emulation is not held to it
    with pytest.raises(SystemExit):
        encoder_timing.parse_args(["--budget", "triton:fast", "--json", "x.json"])


def test_encoder_timing_times_convnext_and_skips_backends_without_its_ops(tmp_path):
    out = tmp_path / "enc.json"
    rc = encoder_timing.main(["--device", "cpu", "--arch", "convnext_tiny", "--batch", "1", "--size", "32",
                              "--mask-ratios", "0.0", "--backends", "dense,torch,spconv", "--precision", "fp32",
                              "--warmup", "0", "--iters", "1", "--rotate", "1", "--target", "torch:dense:0.01",
                              "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["loss_check"] == "ok"
    assert rows["spconv"]["status"] == "skipped"
    if registry_status().get("spconv") is None:
        assert "backend 'spconv' cannot run this encoder: it has no depthwise_conv" in rows["spconv"]["reason"]
    assert data["targets"][0]["met"] is True and data["targets"][0]["measured_speedup"] > 0


def test_encoder_timing_on_volumes_in_fresh_processes_with_peak_memory(tmp_path):
    """The 3-D encoder on cubic volumes; on a CPU each case in its own process, with its peak resident memory
    per step and what autograd keeps."""
    out, md = tmp_path / "vol.json", tmp_path / "vol.md"
    rc = encoder_timing.main(["--device", "cpu", "--arch", "resnet18_3d", "--batch", "1", "--size", "64",
                              "--mask-ratios", "0.5", "--backends", "dense,torch", "--precision", "fp32",
                              "--warmup", "0", "--iters", "2", "--rotate", "1", "--isolate", "--json", str(out),
                              "--markdown", str(md)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["spatial_dims"] == 3 and data["config"]["isolate"]
    rows = {r["backend"]: r for r in data["results"]}
    for r in rows.values():
        assert r["status"] == "ok" and r["spatial_dims"] == 3 and len(r["peak_rss_bytes_per_step"]) == 2
        assert r["saved_activation_bytes"] > 0
    assert rows["torch"]["loss_check"] == "ok" and rows["torch"]["visible_fraction"] == 0.5
    if rows["dense"]["peak_mem_bytes"] is not None:  # Linux lets a process reset its peak RSS
        ratio = rows["torch"]["peak_mem_bytes"] / rows["dense"]["peak_mem_bytes"]
        assert rows["torch"]["peak_mem_vs_emulation"] == ratio
    text = md.read_text()
    assert "64^3 voxels" in text and "every case in a fresh process" in text and "VmHWM" in text


def test_kernel_profile_ranks_the_dominant_operator_first():
    x = torch.randn(384, 384)
    prof = kernel_profile(lambda a: (a @ a).relu().sum(), [x], torch.device("cpu"), steps=2, top=3)
    assert prof["steps"] == 2 and len(prof["kernels"]) == 3
    assert "mm" in prof["kernels"][0]["name"]  # the matmul outweighs relu and sum
    ms = [k["ms_per_step"] for k in prof["kernels"]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(k["share"] for k in prof["kernels"]) <= 1 + 1e-9
    assert prof["kernels"][0]["calls_per_step"] == 1
    with pytest.raises(ValueError, match="steps and top"):
        kernel_profile(lambda a: a, [x], torch.device("cpu"), steps=0)


def test_encoder_timing_profiles_kernels_at_the_first_ratio(tmp_path):
    out, md = tmp_path / "enc.json", tmp_path / "enc.md"
    rc = encoder_timing.main(["--device", "cpu", "--arch", "resnet18", "--batch", "1", "--size", "64",
                              "--mask-ratios", "0.5,0.25", "--backends", "torch", "--precision", "fp32",
                              "--warmup", "0", "--iters", "1", "--rotate", "1", "--profile-kernels", "4",
                              "--profile-steps", "1", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    rows = {r["mask_ratio"]: r for r in json.loads(out.read_text())["results"]}
    assert len(rows[0.5]["kernel_profile"]["kernels"]) == 4 and "kernel_profile" not in rows[0.25]
    assert "## Where the time goes" in md.read_text() and "### torch, mask 0.50" in md.read_text()


def test_encoder_timing_rejects_unknown_backend(tmp_path):
    with pytest.raises(SystemExit, match="unknown backend"):
        encoder_timing.main(["--device", "cpu", "--backends", "nope", "--json", str(tmp_path / "x.json")])


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_scripts_parse():
    for script in (os.path.join(HERE, "gpu_check.sh"), os.path.join(HERE, "volume_cpu.sh"),
                   os.path.join(HERE, "..", "scripts", "fetch_gpu_wheels.sh")):
        assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0, script


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_gpu_check_returns_three_files_and_reruns_what_it_left_undone(tmp_path):
    """A CPU rehearsal of one stage. The device brings back at most 8 files from $OUT: gpu_check leaves there only
    its log, the summary and one tarball of every result. A stage cut by the budget is recorded, and
    CTSSL_GPU_CHECK_ONLY=rerun on the same machine runs only it."""
    out = tmp_path / "out"

    def gpu_check(**env):
        if out.exists():
            shutil.rmtree(out)  # the device empties $OUT before every command
        env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "CTSSL_GPU_CHECK_SMOKE": "1",
               "TMPDIR": str(tmp_path), **env}
        proc = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh")], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        return proc.stdout

    cut = gpu_check(CTSSL_GPU_CHECK_ONLY="timing", CTSSL_GPU_CHECK_BUDGET_S="14")  # too little for any stage
    assert "| timing | skipped: budget spent |" in (out / "summary.md").read_text()
    assert "left undone: env timing" in cut

    rerun = gpu_check(CTSSL_GPU_CHECK_ONLY="rerun")
    assert "rerun of: env timing" in rerun and "left undone: nothing" in rerun
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "gpu_check_results.tar.gz", "summary.md"]
    with tarfile.open(out / "gpu_check_results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        data = json.load(tar.extractfile("./encoder_timing.json"))
    assert {"encoder_timing.json", "encoder_timing.md", "summary.md", "gpu_check.log"} <= names
    assert data["format"] == encoder_timing.FORMAT and any(r["status"] == "ok" for r in data["results"])
    summary = (out / "summary.md").read_text()
    assert "| timing | rc 0 |" in summary and "| spark | not selected |" in summary
    assert "tar -xzf <files_at>/gpu_check_results.tar.gz -C benchmarks/results/" in rerun

    assert "the last run left nothing undone" in gpu_check(CTSSL_GPU_CHECK_ONLY="rerun")


def test_a_registered_backend_is_benchmarked_without_an_edit(monkeypatch):
    """A backend registered before the suites are built (a fresh process) gets its cases at every mask
    ratio and runs in them."""
    import bench_config
    from bench_config import backend_mask_params, require_backend

    from ctssl.sparse import backends

    backends.register_backend("torch-copy", "ctssl.sparse.backends.torch_packed", "TorchBackend")
    monkeypatch.setattr(bench_config, "_STATUS", None)  # the registry as a new process reads it
    try:
        ids = [p.id for p in backend_mask_params((0.25, 0.5))]
        assert ids[:3] == [NOMASK, "dense-m0.25", "dense-m0.5"]
        assert {"torch-copy-m0.25", "torch-copy-m0.5"} <= set(ids)
        assert require_backend("torch-copy") is get_backend("torch-copy")
    finally:
        backends._REGISTRY.pop("torch-copy")
        backends._instances.pop("torch-copy", None)
