"""Shared fixtures for the CT data tests: a small phantom set and pydicom's real CT files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ctssl.data.phantom import make_synthetic_ct

PHANTOM_KW = dict(n_patients=3, slices_per_series=8, size=48, seed=7, labeled=True,
                  labeled_patients=6, labeled_slices_per_patient=6)


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory):
    """A synthetic set written once per session (read-only for tests: copy before changing)."""
    return make_synthetic_ct(tmp_path_factory.mktemp("phantom"), **PHANTOM_KW)


@pytest.fixture
def phantom_tree(phantom_set, tmp_path) -> Path:
    """A private, writable copy of the phantom DICOM tree."""
    dst = tmp_path / "dicom"
    shutil.copytree(phantom_set.dicom_dir, dst)
    return dst


@pytest.fixture(scope="session")
def ct_small() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")
