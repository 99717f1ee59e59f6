"""Registers, stack, shared and local memory of every CUDA kernel in the built extension (``ctssl._C``).

Read from the compiled cubins with ``cuobjdump --dump-resource-usage`` (Triton bundles one), so
no GPU is needed. Local memory or a stack frame means the kernel spills registers or keeps an
array in memory; the CI test (``tests/cuda/test_extension.py``) requires neither.

    python -m benchmarks.extension_resources                 # print a table
    python -m benchmarks.extension_resources --out DIR       # + DIR/extension-resources.{json,md}
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROW = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def extension_path() -> str | None:
    """The built ``ctssl/_C`` shared object (the one ctssl loads), or None when the extension was not built."""
    import ctssl
    from ctssl.cuda_ops import runtime

    module = runtime.load()
    if module is not None:
        return module.__file__
    found = sorted(glob.glob(os.path.join(os.path.dirname(ctssl.__file__), "_C*.so")))  # a stale build
    return found[0] if found else None


def triton_bundled_tool(name: str) -> str | None:
    """A CUDA binary (ptxas, cuobjdump, ...) that Triton ships in its NVIDIA backend, if present."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH or under CUDA_HOME."""
    in_cuda_home = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    return (triton_bundled_tool("cuobjdump") or shutil.which("cuobjdump")
            or (in_cuda_home if os.path.exists(in_cuda_home) else None))


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name: str) -> str:
    """``void ctssl::cuda::(anonymous namespace)::k<float>(args)`` -> ``k<float>``."""
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    name = name[len("void "):] if name.startswith("void ") else name
    return re.sub(r"^(\w+::)+", "", name)


def resources(path: str, tool: str) -> list[dict]:
    """One row per (cubin arch, kernel)."""
    text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    rows, arch = [], None
    for line in text.splitlines():
        target = re.match(r"\s*arch = (sm_\d+a?)", line)
        if target:
            arch = target.group(1)
        fn = re.search(r"Function ([^:\s]+):", line)
        if fn:
            rows.append(dict(arch=arch, mangled=fn.group(1)))
            continue
        res = ROW.search(line)
        if res and rows and "registers" not in rows[-1]:
            regs, stack, shared, local = map(int, res.groups())
            rows[-1].update(registers=regs, stack_bytes=stack, shared_bytes=shared, local_bytes=local)
    rows = [r for r in rows if "registers" in r]
    for r, name in zip(rows, _demangle([r["mangled"] for r in rows])):
        r["kernel"] = _short(name)
    return rows


def markdown(rows: list[dict], path: str) -> str:
    lines = [
        "# CUDA extension kernels: registers and memory (static, cuobjdump)",
        "",
        f"- date: {datetime.date.today().isoformat()}; no GPU involved: read from the built cubins",
        f"- extension: `{os.path.basename(path)}`; command: `python -m benchmarks.extension_resources`",
        "- stack or local bytes above 0 would mean register spills or arrays in memory",
        "",
        "| arch | kernel | regs | stack (B) | static shared (B) | local (B) |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"] or "", r["kernel"])):
        lines.append(f"| {r['arch']} | `{r['kernel']}` | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']} | {r['local_bytes']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write extension-resources.json and extension-resources.md into this folder")
    a = p.parse_args(argv)
    path, tool = extension_path(), cuobjdump()
    if path is None or tool is None:
        print("no built extension (ctssl/_C*.so)" if path is None else "no cuobjdump found", file=sys.stderr)
        return 2
    rows = resources(path, tool)
    text = markdown(rows, path)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "extension-resources.json"), "w") as f:
            json.dump(dict(extension=os.path.basename(path), rows=rows), f, indent=1)
        with open(os.path.join(a.out, "extension-resources.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
