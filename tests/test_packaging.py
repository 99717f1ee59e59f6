"""The installed layout: kernels ship as ctssl.kernels, the CUDA extension is optional."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_inside_the_ctssl_namespace():
    import ctssl.kernels

    assert Path(ctssl.kernels.__file__).parent.name == "kernels"


@pytest.mark.slow
def test_pure_python_wheel_without_cuda(tmp_path):
    """A build with the extension disabled is pure Python, says why, and nests kernels/ under ctssl/."""
    env = {"CTSSL_NO_CUDA": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ctssl: CUDA extension not built: CTSSL_NO_CUDA=1" in proc.stdout + proc.stderr
    wheel = next(tmp_path.glob("ctssl-*.whl"))
    assert wheel.name.endswith("py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ctssl/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert "ctssl/sparse/backends/torch_packed.py" in names
