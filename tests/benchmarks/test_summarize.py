"""summarize.py on small FABRICATED result files (made up here, in the test: not measurements)."""
from __future__ import annotations

import json

import pytest
import summarize


def _bench(case, family, backend, ratio, vis, median_s, dtype="float32"):
    return {"group": case, "name": f"test_x[{backend}-{ratio}]", "fullname": "x", "params": {},
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 5, "mean": median_s},
            "extra_info": {"suite": "ops", "family": family, "case": case, "backend": backend, "dtype": dtype,
                           "batch": 2, "mask_ratio": ratio, "visible_fraction": vis, "images": 2,
                           "saved_activation_bytes": 3 * 2 ** 20}}


@pytest.fixture
def fabricated_pytest_json(tmp_path):
    """A made-up pytest-benchmark file: emulation flat at 4 ms, torch proportional to visible."""
    benches = [_bench("conv A", "conv fwd", "dense-nomask", None, 1.0, 0.002)]
    for ratio, vis in ((0.25, 0.75), (0.5, 0.5), (0.75, 0.25)):
        benches.append(_bench("conv A", "conv fwd", "dense", ratio, vis, 0.004))
        benches.append(_bench("conv A", "conv fwd", "torch", ratio, vis, 0.004 * vis))
    data = {"machine_info": {"ctssl": {"device_name": "FABRICATED card", "profile": "cpu",
                                       "versions": {"torch": "0.0"}, "command": "pytest x",
                                       "profile_notes": ["fabricated for a test"]}},
            "commit_info": {"id": "abc"}, "datetime": "2000-01-01T00:00:00", "benchmarks": benches}
    path = tmp_path / "fab.json"
    path.write_text(json.dumps(data))
    return path


def test_markdown_and_plots_from_pytest_benchmark_json(fabricated_pytest_json, tmp_path):
    out = tmp_path / "out"
    assert summarize.main([str(fabricated_pytest_json), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert "FABRICATED card" in md and "fabricated for a test" in md
    # torch at mask 0.75: 1 ms against the emulation's 4 ms -> 4.00x; against no-mask 2 ms -> 2.00x
    row = next(line for line in md.splitlines() if "| torch | 0.75 |" in line)
    assert "| 1 |" in row and "4.00x" in row and "2.00x" in row and "| 3.0 |" in row
    # the sweep table: torch's time falls with the visible fraction (0.25 / 0.75), the emulation's does not
    sweep = md.split("### Cost vs visible fraction")[1]
    torch_line = next(line for line in sweep.splitlines() if "| torch |" in line)
    dense_line = next(line for line in sweep.splitlines() if "| dense |" in line)
    assert "| 0.33 | 0.33 |" in torch_line and "| 1.00 | 0.33 |" in dense_line
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["time_vs_backend_conv_fwd_float32.png", "time_vs_mask_ratio_conv_fwd_float32.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_encoder_timing_json_and_no_plots(tmp_path):
    data = {"format": summarize.ENCODER_TIMING_FORMAT,
            "machine": {"device_name": "FABRICATED gpu", "date": "2000-01-01", "command": "x", "versions": {}},
            "results": [
                {"status": "ok", "case": "enc", "backend": "dense-nomask", "mask_ratio": None, "visible_fraction": 1.0,
                 "dtype": "bfloat16-autocast", "batch": 8, "median_ms": 10.0, "q1_ms": 9.0, "q3_ms": 11.0,
                 "times_ms": [10.0] * 4, "images_per_s": 800.0, "peak_mem_bytes": 2 ** 30},
                {"status": "ok", "case": "enc", "backend": "dense", "mask_ratio": 0.6, "visible_fraction": 0.4,
                 "dtype": "bfloat16-autocast", "batch": 8, "median_ms": 40.0, "q1_ms": 39.0, "q3_ms": 41.0,
                 "times_ms": [40.0] * 4, "images_per_s": 200.0, "peak_mem_bytes": 2 ** 31},
                {"status": "skipped", "case": "enc", "backend": "cuda", "mask_ratio": 0.6, "reason": "not built"}]}
    path = tmp_path / "enc.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "o"
    assert summarize.main([str(path), "--out", str(out), "--no-plots"]) == 0
    md = (out / "summary.md").read_text()
    assert "FABRICATED gpu" in md and "cuda not timed" in md and "not built" in md
    row = next(line for line in md.splitlines() if "| dense | 0.60 |" in line)
    assert "| 40 |" in row and "| 2048.0 |" in row and "0.25x" in row  # 10 ms / 40 ms against no-mask
    assert not list(out.glob("*.png"))


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    assert summarize.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "neither pytest-benchmark JSON" in capsys.readouterr().err
    assert summarize.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
