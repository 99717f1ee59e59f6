"""Model-level benchmarks: the masked ResNet encoder, the masked ConvNeXt-T encoder, a SparK step, a
contrastive step.

On a GPU: ResNet-50, batch 128, 224 px, bf16 autocast, channels-last. On a CPU: the
small development profile (see ``bench_config``).
"""
from __future__ import annotations

import importlib

import pytest
from bench_config import NOMASK, PROFILE, backend_mask_params, require_backend
from bench_model_cases import contrastive_workload, encoder_workload, spark_workload

ENCODER_PARAMS = backend_mask_params(PROFILE.model_mask_ratios)
SPARK_PARAMS = [p for p in backend_mask_params(PROFILE.spark_mask_ratios) if p.values[0] != NOMASK]


def _require_ssl(method: str):
    """Skip (with the reason) when ctssl.ssl or the method cannot be imported here."""
    try:
        ssl = importlib.import_module("ctssl.ssl")
        ssl.method_class(method)
    except (ImportError, AttributeError, ValueError) as exc:
        pytest.skip(f"ctssl.ssl method {method!r} unavailable: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("backend_name,mask_ratio", ENCODER_PARAMS)
def test_encoder(run_workload, backend_name, mask_ratio):
    backend = require_backend(backend_name, backward=True)
    work = encoder_workload(PROFILE, backend, mask_ratio)
    run_workload(work, group=work.info["case"], rounds=PROFILE.model_rounds)


@pytest.mark.parametrize("backend_name,mask_ratio", ENCODER_PARAMS)
def test_convnext_encoder(run_workload, backend_name, mask_ratio):
    from ctssl.sparse.backends.base import CONVNEXT_OPS

    backend = require_backend(backend_name, backward=True, ops=CONVNEXT_OPS)
    work = encoder_workload(PROFILE, backend, mask_ratio, arch="convnext_tiny")
    run_workload(work, group=work.info["case"], rounds=PROFILE.model_rounds)


@pytest.mark.parametrize("backend_name,mask_ratio", SPARK_PARAMS)
def test_spark_step(run_workload, backend_name, mask_ratio):
    _require_ssl("spark")
    backend = require_backend(backend_name, backward=True)
    work = spark_workload(PROFILE, backend, mask_ratio)
    run_workload(work, group=work.info["case"], rounds=PROFILE.model_rounds)


def test_contrastive_step(run_workload):
    _require_ssl("mocov2")
    work = contrastive_workload(PROFILE, "mocov2")
    run_workload(work, group=work.info["case"], rounds=PROFILE.model_rounds)
