"""The public names of ctssl.data, and the light import path of ctssl-prepare workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ctssl.data


def test_every_public_name_resolves():
    for name in ctssl.data.__all__:
        assert getattr(ctssl.data, name) is not None
    assert "SliceStore" in dir(ctssl.data)


def test_prepare_and_dicom_import_without_torch():
    code = ("import sys, ctssl.data.prepare, ctssl.data.dicom, ctssl.data.store; "
            "print('torch' in sys.modules)")
    root = str(Path(ctssl.data.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
