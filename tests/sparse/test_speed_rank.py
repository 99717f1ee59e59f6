"""``auto`` picks the candidate that ran a masked step fastest on the device, measured once and cached."""
import json
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from ctssl.sparse import backends, device_cache, get_backend, self_check, speed_rank
from ctssl.sparse.backends import auto_backend, explain_auto
from ctssl.sparse.backends.base import CONVNEXT_OPS
from ctssl.sparse.backends.torch_packed import TorchBackend

DELAY = 0.025  # seconds added to every conv of the slow backend: 50 ms a step against ~2 ms


class SlowBackend(TorchBackend):
    """The torch backend's results, late."""

    name = "slow"

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        time.sleep(DELAY)
        return super().conv2d(x, weight, bias, stride, padding, dilation, groups)


class QuickBackend(TorchBackend):
    """The torch backend under another name (listed after ``slow``)."""

    name = "quick"


class QuickResNetOnlyBackend(TorchBackend):
    """Fast, but without ConvNeXt's depthwise conv."""

    name = "quick-resnet"
    supported_ops = TorchBackend.supported_ops - {"depthwise_conv"}


class ExplodingBackend(TorchBackend):
    """Fast until its conv has run ``fuse`` times, then it raises (0: at once, in the warm-up)."""

    name = "exploding"
    fuse = 0
    calls = 0

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        type(self).calls += 1
        if type(self).calls > type(self).fuse:
            raise RuntimeError("kernel exploded\nsecond line")
        return super().conv2d(x, weight, bias, stride, padding, dilation, groups)


FAKES = {"slow": "SlowBackend", "quick": "QuickBackend", "quick-resnet": "QuickResNetOnlyBackend",
         "exploding": "ExplodingBackend"}


@pytest.fixture
def fresh(monkeypatch, tmp_path, intra_op_threads):
    """Empty verdict and ranking caches in a temporary $XDG_CACHE_HOME, the fake backends registered, one
    intra-op thread (threads on shared cores only add noise to the times), and a list of the candidates of
    each measurement: ``fresh.measured``; ``fresh.dir``: the ranking cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(speed_rank, "_rankings", {})
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(ExplodingBackend, "calls", 0)
    for name, cls in FAKES.items():
        backends.register_backend(name, __name__, cls)
    measured = []
    real = speed_rank.measure
    monkeypatch.setattr(speed_rank, "measure", lambda bs, *a, **k: measured.append([b.name for b in bs]) or
                        real(bs, *a, **k))
    yield SimpleNamespace(dir=tmp_path / "ctssl" / "speed-rank", measured=measured)
    for name in FAKES:
        backends._REGISTRY.pop(name)
        backends._instances.pop(name, None)
    torch.set_num_threads(threads)


def test_auto_picks_the_measured_fastest_not_the_first_listed(fresh, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("slow", "quick"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # auto's first use may be anywhere
        assert get_backend("auto", "cpu").name == "quick"
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    assert fresh.measured == [["slow", "quick"]]
    pick = explain_auto("cpu")
    assert pick.candidates == ("slow", "quick") and pick.ranking.family == "resnet"
    assert list(pick.ranking.times_ms) == ["quick", "slow"]
    assert pick.ranking.times_ms["slow"] > 2 * 1e3 * DELAY  # two convs a step, each delayed
    assert pick.ranking.device == device_cache.device_name("cpu")
    assert pick.reason() == f"measured on {pick.ranking.device}: {pick.ranking.summary()}"
    record = json.loads(json.dumps(pick.as_dict()))  # what a benchmark stores
    assert record["backend"] == "quick" and record["ranking"]["times_ms"] == pick.ranking.times_ms


def test_times_are_cached_on_disk_and_reused_until_the_versions_change(fresh, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("slow", "quick"))
    assert auto_backend("cpu").name == "quick"
    assert auto_backend("cpu").name == "quick"  # this process remembers
    files = list(fresh.dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("resnet-")  # written atomically: no temp file left
    stored = json.loads(files[0].read_text())
    assert stored["key"]["candidates"] == ["quick", "slow"] and stored["key"]["family"] == "resnet"
    assert stored["key"]["torch"] == torch.__version__ and stored["key"]["device"].startswith("cpu")
    assert list(stored["ranking"]["times_ms"]) == ["quick", "slow"]
    monkeypatch.setattr(speed_rank, "_rankings", {})  # a new process: only the disk remembers
    assert auto_backend("cpu").name == "quick"
    assert explain_auto("cpu").ranking.cached
    assert len(fresh.measured) == 1
    monkeypatch.setattr(speed_rank, "_rankings", {})
    monkeypatch.setattr(device_cache, "fingerprint", lambda: "a changed kernel")
    assert auto_backend("cpu").name == "quick"
    assert len(fresh.measured) == 2 and len(list(fresh.dir.iterdir())) == 2


@pytest.mark.parametrize("fuse", [0, 2], ids=["in the warm-up", "after the warm-up"])
def test_a_backend_that_raises_while_timed_is_skipped_with_one_warning(fresh, monkeypatch, fuse):
    monkeypatch.setattr(ExplodingBackend, "fuse", fuse)  # 2 convs: one warm-up step of the ResNet block
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("exploding", "slow"))
    with pytest.warns(RuntimeWarning, match=r"backend 'exploding' failed while `auto` timed it on cpu .*"
                                            r"\(RuntimeError: kernel exploded\); `auto` uses 'slow' instead"):
        assert auto_backend("cpu").name == "slow"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither measured nor reported again
        pick = explain_auto("cpu")
    assert pick.backend.name == "slow" and list(pick.ranking.times_ms) == ["slow"]
    assert pick.ranking.errors == {"exploding": "RuntimeError: kernel exploded"}
    assert pick.reason().endswith("; exploding failed while timed (RuntimeError: kernel exploded)")
    assert len(fresh.measured) == 1


def test_check_false_measures_nothing_but_uses_a_cached_ranking(fresh, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("slow", "quick"))
    pick = explain_auto("cpu", check=False)
    assert pick.backend.name == "slow" and pick.ranking is None  # nothing known: the listed order
    assert pick.reason() == ("not measured yet: the first of slow, quick as listed "
                             "(`ctssl-backends --check` measures them)")
    assert fresh.measured == [] and not fresh.dir.exists()
    assert auto_backend("cpu").name == "quick"
    monkeypatch.setattr(speed_rank, "_rankings", {})
    assert auto_backend("cpu", check=False).name == "quick"  # read from the disk
    assert len(fresh.measured) == 1


def test_ops_filter_the_candidates_and_pick_the_workload(fresh, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("slow", "quick-resnet"))
    assert auto_backend("cpu", ops=CONVNEXT_OPS).name == "slow"  # the only one with ConvNeXt's ops: not timed
    assert fresh.measured == []
    assert auto_backend("cpu").name == "quick-resnet"
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("slow", "quick"))
    pick = explain_auto("cpu", ops=CONVNEXT_OPS)
    assert pick.backend.name == "quick" and pick.ranking.family == "convnext"  # the ConvNeXt block was timed
    assert pick.ranking.times_ms["slow"] > 1e3 * DELAY  # its depthwise conv went through the slow conv2d
    assert fresh.measured == [["slow", "quick-resnet"], ["slow", "quick"]]
    assert sorted(p.name.split("-")[0] for p in fresh.dir.iterdir()) == ["convnext", "resnet"]


def test_a_single_candidate_is_never_measured(fresh):
    assert backends.AUTO_ORDER_CPU == ("torch",)
    pick = explain_auto("cpu")
    assert pick.backend.name == "torch" and pick.ranking is None
    assert pick.reason() == "nothing measured: torch is the only backend auto can use on this device"
    assert fresh.measured == [] and not fresh.dir.exists()


def test_cli_check_prints_the_times_and_why_auto_picked(fresh, monkeypatch, capsys):
    from ctssl.cli import backends as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("slow", "quick"))
    import ctssl.sparse

    # only the backends this test is about, and no self-checks (test_self_check covers those lines)
    monkeypatch.setattr(ctssl.sparse, "backend_status", lambda: {"torch": None, "slow": None, "quick": None})
    monkeypatch.setattr(self_check, "run_self_check", lambda b, d: self_check.Verdict(b.name, str(d), True, 0.0))
    assert cli(["--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    times = {line.split()[1]: line for line in lines if line.startswith("time ")}
    assert set(times) == {"slow", "quick"} and times["quick"].startswith("time  quick      cpu, resnet step: ")
    ranking = speed_rank.cached_ranking(["slow", "quick"], "cpu")
    assert lines[-1] == (f"auto picks: cpu -> quick (measured on {ranking.device}: {ranking.summary()}); "
                         f"cuda -> (no GPU visible)")
    assert fresh.measured == [["slow", "quick"]]
    assert cli([]) == 0  # without --check: the cached times, nothing measured again
    assert capsys.readouterr().out.splitlines()[-1] == lines[-1]
    assert len(fresh.measured) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("ops", [None, CONVNEXT_OPS], ids=["resnet", "convnext"])
def test_on_a_gpu_every_candidate_runs_the_timed_step_and_the_fastest_is_picked(monkeypatch, tmp_path, ops):
    """The real workload (bf16 autocast, channels-last, stage-1 size) on the GPU's backends."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(speed_rank, "_rankings", {})
    pick = explain_auto("cuda", ops=ops)
    if len(pick.candidates) < 2:
        pytest.skip(f"needs two usable backends on the GPU (triton, cuda, spconv); usable: {pick.candidates}")
    ranking = pick.ranking
    assert ranking.family == speed_rank.family(ops) and not ranking.cached
    assert ranking.errors == {} and set(ranking.times_ms) == set(pick.candidates)
    assert pick.backend.name == min(ranking.times_ms, key=ranking.times_ms.get)
    assert pick.reason() == f"measured on {torch.cuda.get_device_name()}: {ranking.summary()}"
