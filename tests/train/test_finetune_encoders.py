"""Fine-tuning any registry encoder: ConvNeXt from an export (linear probe freezes it), 3-D ResNets on volumes,
arch and channels read from the file, and one clear error for a 2-D encoder on volumes (or the reverse)."""

import pytest
import torch

from ctssl.data.phantom import write_labeled_volumes
from ctssl.models import convnext_tiny, resnet18_3d
from ctssl.train import finetune as ft
from ctssl.train.finetune_cli import main as finetune_main

from .bars_data import write_npz

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return str(write_labeled_volumes(tmp_path_factory.mktemp("vol") / "volumes.npz", 16, size=16, seed=0))


def _config(data, **kw):
    base = dict(data=data, epochs=1, freeze_epochs=0, image_size=32, batch_size=8, device="cpu")
    base.update(kw)
    return ft.make_config("test", **base)


def test_convnext_linear_probe_from_an_export(tmp_path):
    npz = write_npz(tmp_path / "bars.npz", n=(16, 8, 8))
    torch.manual_seed(0)
    source = convnext_tiny(in_chans=1)
    torch.save(source.state_dict(), tmp_path / "cnx.pt")
    model, info = ft.build_model(_config(npz, init=str(tmp_path / "cnx.pt")), num_classes=2)
    assert (info["arch"], info["in_chans"], model.head.fc.out_features) == ("convnext_tiny", 1, 2)
    assert torch.equal(model.stages[1].blocks[0].conv_dw.weight, source.stages[1].blocks[0].conv_dw.weight)

    cfg = _config(npz, init=str(tmp_path / "cnx.pt"), linear_probe=True)
    result = ft.run_finetune(cfg, tmp_path / "lp", log=None)
    assert result["init"]["arch"] == "convnext_tiny" and result["n_train"] == 16
    tuned = torch.load(tmp_path / "lp" / "best.pt", weights_only=False)["model"]
    init = source.state_dict()
    for key, value in tuned.items():
        if key.startswith("head.fc."):
            continue
        assert torch.equal(value, init[key]), f"the linear probe changed {key}"
    assert not torch.equal(tuned["head.fc.weight"], init["head.fc.weight"][:2])


def test_resnet18_3d_fine_tunes_on_phantom_volumes_from_random_and_from_an_export(volumes, tmp_path):
    result = ft.run_finetune(_config(volumes, arch="resnet18_3d", image_size=16), tmp_path / "random", log=None)
    assert result["init"] == {"arch": "resnet18_3d", "in_chans": 1, "method": "random", "source": "random"}
    assert result["n_train"] == 12 and result["n_val"] == 2 and result["n_test"] == 2

    torch.manual_seed(0)
    source = resnet18_3d()
    torch.save(source.state_dict(), tmp_path / "r18_3d.pt")
    rc = finetune_main(["--data", volumes, "--init", str(tmp_path / "r18_3d.pt"), "--out", str(tmp_path / "ft"),
                        "--preset", "test", "--image-size", "16", "--device", "cpu", "--augment", "crop", "-q"])
    assert rc == 0
    tuned = torch.load(tmp_path / "ft" / "best.pt", weights_only=False)
    assert tuned["info"]["arch"] == "resnet18_3d" and tuned["info"]["in_chans"] == 1
    # an InstanceNorm 3-D ResNet is recognised too, and too small a volume for it is one clear error
    torch.save(resnet18_3d(norm="instance").state_dict(), tmp_path / "r18_3d_in.pt")
    with pytest.raises(ft.FinetuneError, match="resnet18_3d with InstanceNorm needs at least 64"):
        ft.run_finetune(_config(volumes, init=str(tmp_path / "r18_3d_in.pt"), image_size=16), tmp_path / "in",
                        log=None)


def test_a_2d_encoder_on_volumes_is_one_clear_error(volumes, tmp_path, capsys):
    rc = finetune_main(["--data", volumes, "--init", "random", "--arch", "resnet18", "--out", str(tmp_path / "x"),
                        "--preset", "test", "--image-size", "16", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--arch resnet18 is a 2-D encoder" in err and "3-D samples of shape (16, 16, 16)" in err
    assert "resnet18_3d" in err
    npz = write_npz(tmp_path / "bars.npz", n=(8, 4, 4))
    with pytest.raises(ft.FinetuneError, match=r"resnet18_3d is a 3-D encoder .* 2-D samples of shape \(16, 16\)"):
        ft.run_finetune(_config(npz, arch="resnet18_3d"), tmp_path / "y", log=None)


def test_arch_choices_come_from_the_registry(capsys):
    from ctssl.models import encoder_names
    from ctssl.train.finetune_cli import build_parser

    arch = next(a for a in build_parser()._actions if a.dest == "arch")
    assert list(arch.choices) == encoder_names() and "convnext_tiny" in arch.choices and "resnet50_3d" in arch.choices


def test_volume_augmentation_flips_and_crops_every_axis():
    from ctssl.train.finetune_data import RandomFlip3d, RandomResizedCrop3d, training_augmentation

    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    assert torch.equal(RandomFlip3d(1.0)(x), x.flip([-3, -2, -1])) and torch.equal(RandomFlip3d(0.0)(x), x)
    g = torch.Generator().manual_seed(0)
    vol = torch.rand(1, 20, 18, 16, generator=g)
    assert RandomResizedCrop3d(8)(vol, g).shape == (1, 8, 8, 8)
    for kind in ("flip", "crop"):
        assert training_augmentation(kind, 8, spatial_dims=3)(vol, g).shape == (1, 8, 8, 8)
    assert training_augmentation("none", 8, spatial_dims=3) is None
