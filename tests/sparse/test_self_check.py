"""``auto`` checks a custom backend on a device before trusting it; verdicts are cached; the CLI runs the checks."""
import json
import warnings

import pytest
import torch

from ctssl.sparse import backends, get_backend, self_check
from ctssl.sparse.backends.torch_packed import TorchBackend


class BrokenBackend(TorchBackend):
    """Custom kernels gone wrong: every conv output is off by half its value."""

    name = "broken"
    self_check_before_auto = True

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        y = super().conv2d(x, weight, bias, stride, padding, dilation, groups)
        return y.with_values(y.values * 1.5)


class BrokenDepthwiseBackend(TorchBackend):
    """ResNet's ops right, ConvNeXt's depthwise conv wrong where the window reaches 2 patches away."""

    name = "broken-depthwise"

    def conv2d(self, x, weight, bias, stride, padding, dilation, groups):
        if groups == 1:
            return super().conv2d(x, weight, bias, stride, padding, dilation, groups)
        # the bug: a halo one patch deep, as if radius 1 always sufficed
        side = x.patch_side
        clipped = weight[..., 3 - side:4 + side, 3 - side:4 + side] if side < 3 else weight
        return super().conv2d(x, clipped, bias, stride, min(side, 3), dilation, groups)


class GoodBackend(TorchBackend):
    """Custom kernels that compute correctly (the torch backend's, checked like a custom one)."""

    name = "good"
    self_check_before_auto = True


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty verdict cache in a temporary $XDG_CACHE_HOME, and the two demo backends registered."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(self_check, "_verdicts", {})
    monkeypatch.setattr(backends, "_warned", set())
    for name, cls in (("broken", "BrokenBackend"), ("good", "GoodBackend")):
        backends.register_backend(name, __name__, cls)
    yield tmp_path / "ctssl" / "self-check"
    for name in ("broken", "good"):
        backends._REGISTRY.pop(name)
        backends._instances.pop(name, None)


def test_self_check_passes_for_the_torch_backend():
    verdict = self_check.run_self_check(get_backend("torch"), "cpu")
    assert verdict.ok and verdict.error is None and not verdict.forward_only and verdict.seconds < 30


def test_self_check_passes_for_triton_under_the_interpreter():
    reason = backends.backend_status()["triton"]
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    verdict = self_check.run_self_check(get_backend("triton"), "cpu")
    assert verdict.ok, verdict.error


def test_self_check_covers_convnext_ops_where_a_backend_has_them():
    broken = BrokenDepthwiseBackend()
    verdict = self_check.run_self_check(broken, "cpu")
    assert not verdict.ok and "differs from dense" in verdict.error
    resnet_only = type("ResNetOnlyBroken", (BrokenDepthwiseBackend,),
                       {"name": "resnet-only", "supported_ops": TorchBackend.supported_ops - {"depthwise_conv"}})()
    assert self_check.run_self_check(resnet_only, "cpu").ok  # no ConvNeXt ops: the ResNet part alone


def test_self_check_fails_a_wrong_backend_and_names_what_differs():
    verdict = self_check.run_self_check(BrokenBackend(), "cpu")
    assert not verdict.ok and "differs from dense" in verdict.error


def test_auto_skips_a_failing_backend_with_one_warning_and_caches_the_verdict(fresh, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("broken", "torch"))
    with pytest.warns(RuntimeWarning, match=r"backend 'broken' failed its self-check on cpu.*differs from dense.*"
                                            r"`auto` uses 'torch' instead"):
        assert get_backend("auto", "cpu").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second selection neither checks nor warns again
        assert get_backend("auto", "cpu").name == "torch"
    files = list(fresh.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".")  # written atomically: no temp file left
    stored = json.loads(files[0].read_text())
    assert stored["key"]["backend"] == "broken" and stored["key"]["torch"] == torch.__version__
    assert stored["verdict"]["ok"] is False


def test_a_passing_backend_is_chosen_and_its_verdict_reused_from_disk(fresh, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("good",))  # alone: with torch both would be timed
    calls = []
    real = self_check.run_self_check
    monkeypatch.setattr(self_check, "run_self_check", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert get_backend("auto", "cpu").name == "good"
    assert len(calls) == 1
    monkeypatch.setattr(self_check, "_verdicts", {})  # a new process: only the disk remembers
    assert get_backend("auto", "cpu").name == "good"
    assert len(calls) == 1
    assert self_check.cached_verdict(get_backend("good"), "cpu").cached


def test_cli_check_prints_pass_fail_and_time(fresh, capsys):
    from ctssl.cli import backends as cli

    code = cli(["--check"])
    lines = capsys.readouterr().out.splitlines()
    checks = {line.split()[1]: line for line in lines if line.startswith("check ")}
    assert "broken" in checks and ": FAIL in " in checks["broken"] and "differs from dense" in checks["broken"]
    assert ": pass in " in checks["torch"] and ": pass in " in checks["good"]
    assert code == 1  # a backend failed
    assert lines[-1].startswith("auto picks: cpu -> torch")


def test_auto_checks_correctly_inside_inference_mode_and_keeps_the_random_stream(fresh, monkeypatch):
    """``auto``'s first use may come from anywhere: the check neither fails there nor moves the caller's RNG."""
    monkeypatch.setattr(backends, "AUTO_ORDER_CPU", ("good",))  # alone: with torch both would be timed
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert get_backend("auto", "cpu").name == "good"
    assert torch.equal(torch.rand(3), expected)
