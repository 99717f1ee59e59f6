"""The installed layout: kernels ship as ctssl.kernels, the CUDA extension is optional."""
import json
import os
import shutil
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


def _checkout_copy(dest: Path) -> Path:
    """A bare checkout at ``dest``: ctssl/ (without the kernels link and the compiled extension), kernels/,
    setup.py; what `python -m pytest` from a fresh clone's root imports after a non-editable install."""
    skip = shutil.ignore_patterns("kernels", "_C*.so", "__pycache__")
    shutil.copytree(ROOT / "ctssl", dest / "ctssl", ignore=skip)
    shutil.copytree(ROOT / "kernels", dest / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", dest / "setup.py")
    return dest


# an editable install of another checkout in this environment must not answer for the copy under test
NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
               "if not getattr(f, '__module__', '').startswith('__editable__')]; ")


def _run(code: str, path: list[Path], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path)), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_EDITABLE + code], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_checkout_without_install_finds_its_own_kernels(tmp_path):
    """ctssl imported from a checkout (no ctssl/kernels inside) mounts ../kernels: triton stays usable."""
    pytest.importorskip("triton")
    src = _checkout_copy(tmp_path / "src")
    out = _run("import json, ctssl, ctssl.kernels.runtime as rt; from ctssl.sparse import backend_status; "
               "print(json.dumps([ctssl.__file__, rt.__file__, backend_status()['triton']]))", [src], src)
    assert out[0] == str(src / "ctssl" / "__init__.py")
    assert out[1] == str(src / "kernels" / "runtime.py")
    assert out[2] is None


def test_a_checkout_uses_the_compiled_extension_of_its_install(tmp_path):
    """A non-editable install keeps ``ctssl._C`` in site-packages; the checkout's ctssl loads it from there."""
    built = sorted((ROOT / "ctssl").glob("_C*.so"))
    if not built:
        pytest.skip("no compiled extension in this checkout (ctssl/_C*.so) to install: needs nvcc and a CUDA torch")
    src = _checkout_copy(tmp_path / "src")
    site = tmp_path / "site"
    (site / "ctssl").mkdir(parents=True)
    shutil.copy(ROOT / "ctssl" / "__init__.py", site / "ctssl" / "__init__.py")
    (site / "ctssl" / built[0].name).symlink_to(built[0])
    info = site / "ctssl-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ctssl\nVersion: 0.1.0\n")
    code = ("import json, ctssl; from ctssl.cuda_ops import runtime; reason = runtime.missing_reason(); "
            "import ctssl._C; print(json.dumps([ctssl.__file__, reason, ctssl._C.__file__]))")
    out = _run(code, [src, site], src)
    assert out == [str(src / "ctssl" / "__init__.py"), None, str(site / "ctssl" / built[0].name)]
    info.rename(site / "ctssl-0.0.9.dist-info")  # another version's build is never used
    (site / "ctssl-0.0.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ctssl\nVersion: 0.0.9\n")
    out = _run(code.replace("import ctssl._C; ", "").replace(", ctssl._C.__file__", ""), [src, site], src)
    assert "not built" in out[1]
