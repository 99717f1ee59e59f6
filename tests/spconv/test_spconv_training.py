"""spconv's CPU build runs forward only: training with it on the CPU is refused at selection, before any file."""
from __future__ import annotations

import pytest
import torch

from ctssl.sparse import BackendUnavailableError, get_backend
from ctssl.sparse.backends.spconv import SpconvBackend

REASON = SpconvBackend("spconv").unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"spconv (CPU build) not installed: {REASON}")


def test_selection_for_training_on_cpu_is_refused_with_the_way_out():
    assert get_backend("spconv", "cpu").name == "spconv"  # inference is fine
    with pytest.raises(BackendUnavailableError, match="backend 'spconv' cannot train on cpu: spconv's CPU build "
                                                      "runs forward only.*backend 'torch'"):
        get_backend("spconv", "cpu", training=True)
    assert get_backend("torch", "cpu", training=True).name == "torch"


def test_ctssl_train_refuses_spconv_on_cpu_before_writing(tmp_path, capsys):
    from ctssl.data import make_synthetic_ct, prepare_store
    from ctssl.train.pretrain_cli import main

    synthetic = make_synthetic_ct(tmp_path / "synthetic", n_patients=1, slices_per_series=8, size=64, seed=3,
                                  labeled=False)
    prepare_store(synthetic.dicom_dir, tmp_path / "store", progress=False)
    out = tmp_path / "run"
    code = main(["--method", "spark", "--preset", "toy", "--no-progress", "--backend", "spconv", "--device", "cpu",
                 "--data", str(tmp_path / "store"), "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert "backend 'spconv' cannot train on cpu" in err[0] and "forward only" in err[0]
    assert not out.exists()


def test_cli_says_the_cpu_build_is_forward_only(capsys):
    from ctssl.cli import backends

    assert backends([]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("spconv"))
    assert "available; cannot train on cpu: spconv's CPU build runs forward only" in line
    if torch.cuda.is_available():
        assert "cannot train on cuda" not in line
