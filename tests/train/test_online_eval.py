"""Online evaluation while pre-training: the k-NN and probe maths, the evaluator's hygiene (mode, RNG, weights
untouched), bad ``--eval-data`` refused at the start, records and plot of a run, and ``--resume``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ctssl.train.checkpoint import load_checkpoint
from ctssl.train.config import ConfigError
from ctssl.train.logger import read_log
from ctssl.train.online_eval import OnlineEvaluator, knn_accuracy, probe_accuracy
from ctssl.train.pretrain import run_pretraining
from ctssl.train.pretrain_cli import main

from .bars_data import write_npz
from .crash import run_until_first_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> str:
    return write_npz(tmp_path_factory.mktemp("bars") / "bars.npz", n=(24, 12, 8))


def _knn_reference(train, train_y, val, num_classes, k, temperature):
    """The definition, one val image at a time in float64."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    predictions = []
    for v in val:
        sim = train @ v
        nearest = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_y[j]] += np.exp(sim[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return np.array(predictions)


def test_knn_accuracy_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g,
                                                                                     dtype=torch.float64)
    train_y, val_y = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (30,), generator=g)
    for k, temperature in ((20, 0.07), (5, 0.5), (1, 0.07)):
        expected = _knn_reference(train.numpy(), train_y.numpy(), val.numpy(), 3, k, temperature)
        got = knn_accuracy(train, train_y, val, val_y, 3, k=k, temperature=temperature, chunk=7)
        assert got == pytest.approx(float((expected == val_y.numpy()).mean()))
    # k = 1 with the val set equal to the train set: every image is its own nearest neighbour
    assert knn_accuracy(train, train_y, train, train_y, 3, k=1) == 1.0


def test_probe_separates_separable_features_deterministically():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(60) % 3
    x = torch.randn(60, 6, generator=g) + 4.0 * torch.nn.functional.one_hot(y, 6).float()
    first = probe_accuracy(x[:40], y[:40], x[40:], y[40:], 3, steps=100)
    assert first == 1.0 and probe_accuracy(x[:40], y[:40], x[40:], y[40:], 3, steps=100) == first
    assert probe_accuracy(x[:40], y[:40], x[40:], y[40:], 3, steps=0) == pytest.approx(float((y[40:] == 0).float()
                                                                                             .mean()))


def test_evaluate_leaves_encoder_and_rng_as_found(bars):
    from ctssl.models import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("resnet18", in_chans=3)
    evaluator = OnlineEvaluator(bars, image_size=32, channels=3, max_images=10, probe=True, probe_steps=20)
    assert evaluator.train.images.shape == (10, 1, 32, 32) and len(evaluator.val.labels) == 10
    assert evaluator.train.images.dtype == torch.float16  # grey, half precision: bounded host memory
    assert evaluator.k == 10  # at most the number of train images
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    rng = torch.get_rng_state()
    encoder.train()
    result = evaluator.evaluate(encoder)
    assert encoder.training and all(m.training for m in encoder.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in encoder.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(v, before[k]), k
    assert 0.0 <= result["knn_acc"] <= 1.0 and 0.0 <= result["probe_acc"] <= 1.0 and result["eval_seconds"] > 0
    assert evaluator.evaluate(encoder)["knn_acc"] == result["knn_acc"]


def test_features_pool_every_spatial_dim_of_a_3d_encoder(bars):
    class Volume(torch.nn.Module):  # stands for a 3-D encoder: (B, C, D, H, W) last stage
        def forward_features(self, x):
            return [x.unsqueeze(2).expand(-1, -1, 3, -1, -1) * 2.0]

    evaluator = OnlineEvaluator(bars, image_size=16, channels=1, max_images=6)
    feats = evaluator.features(Volume(), evaluator.train.images)
    torch.testing.assert_close(feats, 2.0 * evaluator.train.images.float().mean(dim=(2, 3)))


def test_images_that_do_not_fit_the_encoder_are_refused_by_check(bars):
    from ctssl.models import create_encoder

    encoder = create_encoder("resnet18", in_chans=3)
    evaluator = OnlineEvaluator(bars, image_size=32, channels=1, max_images=4)  # grey images, an RGB encoder
    encoder.train()
    with pytest.raises(ConfigError, match=r"--eval-data .*shape \(1, 32, 32\), do not fit the encoder"):
        evaluator.check(encoder)
    assert encoder.training
    OnlineEvaluator(bars, image_size=32, channels=3, max_images=4).check(encoder)


def test_a_3d_encoder_is_evaluated_on_a_3d_labeled_set(tmp_path):
    """MedMNIST's 3-D layout ((N, D, H, W) volumes) through a 3-D ResNet: features pooled over D, H and W."""
    from ctssl.models import create_encoder

    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 8), ("val", 4), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 12, 12, 12), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 2)[:, None]
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_3d", in_chans=1)
    evaluator = OnlineEvaluator(str(tmp_path / "organmnist3d.npz"), image_size=16, channels=1, probe=True,
                                probe_steps=10)
    assert evaluator.train.images.shape == (8, 1, 16, 16, 16)
    evaluator.check(encoder)
    result = evaluator.evaluate(encoder)
    assert 0.0 <= result["knn_acc"] <= 1.0 and 0.0 <= result["probe_acc"] <= 1.0
    assert evaluator.features(encoder, evaluator.val.images).shape == (4, encoder.num_features)
    with pytest.raises(ConfigError, match="do not fit the encoder"):  # volumes for a 2-D encoder
        evaluator.check(create_encoder("resnet18", in_chans=1))


@pytest.mark.parametrize("make_bad, message", [
    (lambda tmp: tmp / "missing.csv", "no such file"),
    (lambda tmp: (tmp / "bad.csv").write_text("path,label\nnope.png,a\nnope2.png,b\n") and tmp / "bad.csv", ""),
])
def test_bad_eval_data_fails_at_start_in_one_line(pretrain_store, tmp_path, capsys, make_bad, message):
    bad = make_bad(tmp_path)
    out = tmp_path / "run"
    rc = main(["--method", "byol", "--preset", "toy", "--data", str(pretrain_store), "--out", str(out),
               "--steps", "2", "--no-progress", "--eval-data", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"--eval-data {bad}" in err and message in err, err
    assert not out.exists()  # nothing written: the check comes before training


def test_run_evaluates_logs_plots_and_resumes_without_duplicates(pretrain_store, bars, tiny_config, tmp_path,
                                                                   capsys):
    cfg = tiny_config("byol", pretrain_store, tmp_path / "straight", max_steps=5, eval_images=12)
    straight = load_checkpoint(run_pretraining(cfg))

    # the same run with online evaluation every 2 steps, crashing right after its step-3 checkpoint
    evaluated = dataclasses.replace(cfg, out=str(tmp_path / "eval"), eval_data=bars, eval_every=2, ckpt_every=3,
                                    eval_probe=True, progress=True)
    run_until_first_checkpoint(evaluated, KeyboardInterrupt)
    log = Path(evaluated.out) / "log.jsonl"
    assert [r["step"] for r in read_log(log) if r.get("kind") == "eval"] == [2]
    capsys.readouterr()

    resumed = load_checkpoint(run_pretraining(evaluated, resume=True))
    for key, value in straight["model"].items():  # evaluation changes nothing in training
        assert torch.equal(value, resumed["model"][key]), key
    records = [r for r in read_log(log) if r.get("kind") == "eval"]
    assert [r["step"] for r in records] == [2, 4, 5]  # the end of the run is evaluated too
    for r in records:
        assert 0.0 <= r["knn_acc"] <= 1.0 and 0.0 <= r["probe_acc"] <= 1.0 and r["eval_seconds"] > 0
        assert (r["eval_train_images"], r["eval_val_images"]) == (12, 12)
    assert all("loss" not in r for r in records)  # the loss curve's readers see training records only
    assert (Path(evaluated.out) / "eval_curve.png").stat().st_size > 0
    err = capsys.readouterr().err
    assert "online eval on" in err and "12 train / 12 val images" in err
    end = [r for r in read_log(log) if r.get("event") == "end"][-1]
    assert end["eval_seconds"] > 0 and end["images_per_s"] > 0

    # resuming the finished run evaluates nothing again
    run_pretraining(evaluated, resume=True)
    assert [r["step"] for r in read_log(log) if r.get("kind") == "eval"] == [2, 4, 5]


def test_eval_settings_are_checked():
    from ctssl.train.config import PretrainConfig

    with pytest.raises(ConfigError, match="eval_every must be >= 1"):
        PretrainConfig(eval_every=0).validate()
    with pytest.raises(ConfigError, match="wandb_mode"):
        PretrainConfig(wandb_mode="cloud").validate()
