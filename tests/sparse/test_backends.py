import pytest
import torch

from ctssl.sparse import BackendUnavailableError, available_backends, backend_status, get_backend
from ctssl.sparse.backends import register_backend


def test_reference_backends_are_always_available():
    assert {"dense", "torch"} <= set(available_backends())
    assert get_backend("dense").name == "dense"
    assert get_backend("torch").name == "torch"


def test_auto_picks_torch_on_cpu():
    assert get_backend("auto", "cpu").name == "torch"


def test_unknown_backend_lists_choices():
    with pytest.raises(BackendUnavailableError) as err:
        get_backend("tensorrt")
    msg = str(err.value)
    assert "unknown backend 'tensorrt'" in msg and "torch" in msg and "spconv" in msg


def test_unavailable_backend_says_why_and_what_to_install():
    register_backend("missing-demo", "ctssl.sparse.backends.does_not_exist", "Nope", needs="the demo package")
    try:
        status = backend_status()
        assert status["missing-demo"] == "not implemented in this version of ctssl"
        with pytest.raises(BackendUnavailableError, match="not available.*the demo package.*Usable here"):
            get_backend("missing-demo")
    finally:
        from ctssl.sparse import backends
        backends._REGISTRY.pop("missing-demo")


def test_backend_name_type_is_checked():
    with pytest.raises(TypeError, match="backend must be"):
        get_backend(3)


def test_cli_lists_backends(capsys):
    from ctssl.cli import backends
    assert backends([]) == 0
    out = capsys.readouterr().out
    assert "dense      available" in out and "torch      available" in out


def test_cli_help_says_what_it_lists(capsys):
    from ctssl.cli import backends
    with pytest.raises(SystemExit) as done:
        backends(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ctssl-backends") and "auto" in out


def test_cli_says_what_auto_picks(capsys, monkeypatch):
    from ctssl.cli import backends
    from ctssl.sparse.backends import auto_backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends([]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == ("auto picks: cpu -> torch (nothing measured: torch is the only backend auto can use on this "
                    "device); cuda -> (no GPU visible)")
    assert auto_backend("cpu").name == "torch"


@pytest.mark.parametrize("module,cls", [("ctssl.sparse.backends.cuda", "CudaBackend"),
                                        ("ctssl.sparse.backends.minkowski", "MinkowskiBackend")])
def test_2d_only_backends_refuse_volumes_with_the_reason(module, cls):
    """Their operators and coordinate maps are 2-D: a volume is refused where the backend is chosen."""
    import importlib

    backend = getattr(importlib.import_module(module), cls)()
    assert backend.spatial_dims == (2,)
    backend.check_spatial_dims(2)
    with pytest.raises(ValueError, match=rf"^backend '{backend.name}' does not implement sparse ops on 3-D volumes "
                                         r"\(it supports 2-D\); use backend 'torch' or 'dense'$"):
        backend.check_spatial_dims(3)


def test_every_backend_declares_its_grids():
    import importlib

    from ctssl.sparse.backends import _REGISTRY

    dims = {name: getattr(importlib.import_module(mod), cls).spatial_dims for name, (mod, cls) in _REGISTRY.items()}
    assert dims == {"dense": (2, 3), "torch": (2, 3), "triton": (2, 3), "cuda": (2,), "spconv": (2, 3),
                    "minkowski": (2,)}
