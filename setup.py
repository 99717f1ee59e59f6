"""Build ctssl; compile the CUDA extension (csrc/) when a CUDA toolchain and a CUDA torch are present.

Anything else yields a pure-Python install and one line saying why the extension
was not built: never a failed install.
"""
import glob
import os
import sys

from setuptools import setup


def _say(msg: str) -> None:
    print(f"ctssl: {msg}", file=sys.stderr)


def cuda_build():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a reason printed."""
    if os.environ.get("CTSSL_NO_CUDA") == "1":
        _say("CUDA extension not built: CTSSL_NO_CUDA=1")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _say("CUDA extension not built: torch is not importable at build time "
             "(install torch first and use `pip install --no-build-isolation .`)")
        return [], {}
    if torch.version.cuda is None:
        _say(f"CUDA extension not built: torch {torch.__version__} is a CPU-only build")
        return [], {}
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        _say("CUDA extension not built: no CUDA toolkit found (install nvcc and set CUDA_HOME)")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no GPU to ask: Ampere and Hopper
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        _say("CUDA extension not built: csrc/ has no sources")
        return [], {}
    _say(f"building the CUDA extension ctssl._C for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    ext = CUDAExtension(
        "ctssl._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        # no -std flag: BuildExtension adds the standard the installed torch needs (C++20 for 2.14)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def packages():
    """ctssl/ and its subpackages, plus kernels/ mapped to ctssl.kernels."""
    from setuptools import find_packages

    pkgs = ["ctssl"] + [f"ctssl.{p}" for p in find_packages("ctssl")]
    pkgs += ["ctssl.kernels"] + [f"ctssl.kernels.{p}" for p in find_packages("kernels")]
    dirs = {"ctssl": "ctssl", "ctssl.kernels": "kernels"}
    return pkgs, dirs


ext_modules, cmdclass = cuda_build()
package_list, package_dirs = packages()
setup(packages=package_list, package_dir=package_dirs, ext_modules=ext_modules, cmdclass=cmdclass)
