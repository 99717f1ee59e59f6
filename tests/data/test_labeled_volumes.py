"""3-D labeled sets: MedMNIST's 3-D .npz layout, trilinear resizing, and the phantom volumes (nodule or not)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctssl.data.labeled import load_labeled, load_medmnist
from ctssl.data.phantom import labeled_volume, write_labeled_volumes
from ctssl.data.phantom import main as phantoms_main


def _write_3d(path, n=(6, 2, 2), side=12, label_shape="column"):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        y = np.arange(count) % 2
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, side, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = y[:, None] if label_shape == "column" else y
    np.savez(path, **arrays)
    return path, arrays


@pytest.mark.parametrize("label_shape", ["column", "flat"])
def test_medmnist_3d_layout_gives_resized_volumes(tmp_path, label_shape):
    path, arrays = _write_3d(tmp_path / "organmnist3d.npz", label_shape=label_shape)
    splits = load_labeled(path, size=8)
    train = splits["train"]
    assert train.spatial_dims == 3 and len(train) == 6 and train.classes[:2] == ["bladder", "femur-left"]
    x, y = train[1]
    assert x.shape == (1, 8, 8, 8) and y == 1
    volume = torch.from_numpy(arrays["train_images"][1].astype(np.float32) / 255)
    expected = F.interpolate(volume[None, None], size=(8, 8, 8), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(x, expected)
    assert train.image(1).shape == (12, 12, 12)  # before resizing
    # the subset of a few-label fraction keeps it a volume set
    assert train.subset([0, 1])[0][0].shape == (1, 8, 8, 8)


def test_2d_rgb_medmnist_is_not_taken_for_volumes(tmp_path):
    arrays = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
              (("images", np.zeros((4, 10, 10, 3), np.uint8)), ("labels", np.arange(4)[:, None] % 2))}
    np.savez(tmp_path / "rgb.npz", **arrays)
    ds = load_medmnist(tmp_path / "rgb.npz", size=8)["train"]
    assert ds.spatial_dims == 2 and ds[0][0].shape == (1, 8, 8)


def test_mixed_images_and_volumes_are_refused(tmp_path):
    path, arrays = _write_3d(tmp_path / "m.npz")
    arrays["test_images"] = np.zeros((2, 12, 12), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="mixes images and volumes"):
        load_medmnist(path)


def test_phantom_volume_nodule_is_a_bright_ball_and_nothing_else_changes():
    size = 24
    with_nodule = labeled_volume(0, 5, size, nodule=True)
    without = labeled_volume(0, 5, size, nodule=False)
    assert with_nodule.shape == (size, size, size)
    changed = np.argwhere(np.abs(with_nodule - without) > 1.0)
    assert len(changed) > 10  # a lesion of a few voxels' radius
    assert (with_nodule - without).sum() > 0  # soft tissue (HU ~0) in the lung (HU ~-850): brighter
    centre = changed.mean(0)
    assert np.abs(changed - centre).max() < size / 3  # one compact ball, not scattered changes
    assert len(np.unique(changed[:, 0])) >= 3  # spans several slices


def test_write_labeled_volumes_in_medmnist_layout(tmp_path):
    path = write_labeled_volumes(tmp_path / "v.npz", 12, size=16, seed=1)
    with np.load(path) as data:
        assert data["train_images"].shape[1:] == (16, 16, 16) and data["train_images"].dtype == np.uint8
        labels = np.concatenate([data[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
        assert data["val_labels"].shape[1] == 1
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6
    splits = load_labeled(path, size=16)
    assert splits["val"].spatial_dims == 3 and set(splits["val"].labels) == {0, 1}
    with pytest.raises(ValueError, match="at least 6"):
        write_labeled_volumes(tmp_path / "w.npz", 4)


def test_phantoms_cli_writes_labeled_volumes(tmp_path, capsys):
    rc = phantoms_main([str(tmp_path / "p"), "--patients", "1", "--slices", "2", "--size", "16", "--no-labeled",
                        "--volumes", "6", "--volume-size", "16"])
    assert rc == 0 and "6 labeled volumes" in capsys.readouterr().out
    assert load_labeled(tmp_path / "p" / "labeled" / "volumes.npz", size=16)["train"].spatial_dims == 3
