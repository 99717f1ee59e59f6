"""Op-level benchmarks: every backend at ResNet-50's conv/BN/pool shapes and ConvNeXt-T's convs (stem,
downsampling, depthwise 7x7), LayerNorm and Linear, layout ops, PatchIndex.

Run ``pytest benchmarks/test_bench_ops.py --benchmark-only``; each case records the backend,
dtype, mask ratio, visible fraction, memory and images/s in ``extra_info``.
"""
from __future__ import annotations

import pytest
from bench_config import PROFILE, backend_mask_params, dtype_params, require_backend
from bench_op_cases import (
    CONV_SHAPES,
    CONVNEXT_CONV_SHAPES,
    CONVNEXT_STAGE_MAPS,
    MODES,
    STAGE_MAPS,
    batchnorm_workload,
    conv_workload,
    densify_workload,
    layernorm_workload,
    linear_workload,
    maxpool_workload,
    pack_workload,
    patch_index_workload,
    to_dense_workload,
)

BACKEND_MASKS = backend_mask_params(PROFILE.mask_ratios)
MASKED_ONLY = [p for p in BACKEND_MASKS if p.values[0] != "dense-nomask"]
DTYPES = dtype_params(PROFILE.op_dtypes)
RATIOS = [pytest.param(r, id=f"m{r}") for r in PROFILE.mask_ratios]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", BACKEND_MASKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[s.key for s in CONV_SHAPES])
def test_conv(run_workload, shape, mode, backend_name, mask_ratio, dtype):
    backend = require_backend(backend_name, backward=mode == "fwdbwd")
    work = conv_workload(PROFILE, shape, backend, dtype, mask_ratio, mode)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", BACKEND_MASKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CONVNEXT_CONV_SHAPES, ids=[s.key for s in CONVNEXT_CONV_SHAPES])
def test_convnext_conv(run_workload, shape, mode, backend_name, mask_ratio, dtype):
    ops = {"depthwise_conv"} if shape.groups > 1 else {"conv"}
    backend = require_backend(backend_name, backward=mode == "fwdbwd", ops=ops)
    work = conv_workload(PROFILE, shape, backend, dtype, mask_ratio, mode)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", BACKEND_MASKS)
@pytest.mark.parametrize("channels,stride", CONVNEXT_STAGE_MAPS, ids=[f"c{c}-s{s}" for c, s in CONVNEXT_STAGE_MAPS])
@pytest.mark.parametrize("op,workload", [("layer_norm", layernorm_workload), ("linear", linear_workload)],
                         ids=["layernorm", "linear"])
def test_convnext_per_position(run_workload, op, workload, channels, stride, backend_name, mask_ratio, dtype):
    """ConvNeXt's LayerNorm and fc1 over the channels of each visible position."""
    backend = require_backend(backend_name, backward=True, ops={op})
    work = workload(PROFILE, channels, stride, backend, dtype, mask_ratio)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", BACKEND_MASKS)
@pytest.mark.parametrize("channels,stride", STAGE_MAPS, ids=[f"c{c}-s{s}" for c, s in STAGE_MAPS])
def test_batchnorm(run_workload, channels, stride, backend_name, mask_ratio, dtype):
    backend = require_backend(backend_name, backward=True)
    work = batchnorm_workload(PROFILE, channels, stride, backend, dtype, mask_ratio)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", BACKEND_MASKS)
@pytest.mark.parametrize("mode", MODES)
def test_maxpool(run_workload, mode, backend_name, mask_ratio, dtype):
    backend = require_backend(backend_name, backward=mode == "fwdbwd")
    work = maxpool_workload(PROFILE, backend, dtype, mask_ratio, mode)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", MASKED_ONLY)
def test_pack(run_workload, backend_name, mask_ratio, dtype):
    backend = require_backend(backend_name)
    work = pack_workload(PROFILE, backend, dtype, mask_ratio)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", MASKED_ONLY)
@pytest.mark.parametrize("channels,stride", STAGE_MAPS[1:], ids=[f"c{c}-s{s}" for c, s in STAGE_MAPS[1:]])
def test_to_dense(run_workload, channels, stride, backend_name, mask_ratio, dtype):
    backend = require_backend(backend_name)
    work = to_dense_workload(PROFILE, channels, stride, backend, dtype, mask_ratio)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend_name,mask_ratio", MASKED_ONLY)
@pytest.mark.parametrize("channels,stride", STAGE_MAPS[1:], ids=[f"c{c}-s{s}" for c, s in STAGE_MAPS[1:]])
def test_densify(run_workload, channels, stride, backend_name, mask_ratio, dtype):
    backend = require_backend(backend_name, backward=True)
    work = densify_workload(PROFILE, channels, stride, backend, dtype, mask_ratio)
    run_workload(work, group=work.info["case"])


@pytest.mark.parametrize("mask_ratio", RATIOS)
def test_patch_index(run_workload, mask_ratio):
    work = patch_index_workload(PROFILE, mask_ratio)
    run_workload(work, group=work.info["case"])

