"""CT data for ctssl: DICOM reading, the prepared slice store, datasets, splits, augmentations.

Pre-training: ``ctssl-prepare DICOM_DIR OUT_DIR`` once (DICOM series and NIfTI volumes), then
``PretrainDataset(OUT_DIR)`` (slices) or ``VolumeDataset(OUT_DIR)`` (random 3-D crops of the series).
Fine-tuning: ``load_labeled(csv | folder | npz)`` and ``nested_fractions`` for few-label runs.
No real data at hand: ``make_synthetic_ct`` writes a phantom DICOM tree and a labeled set.

Names are imported on first use, so that ``ctssl-prepare`` worker processes, which only read
DICOM, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Compose": "augment",
    "GaussianBlur": "augment",
    "GaussianNoise": "augment",
    "IntensityJitter": "augment",
    "MultiCropTransform": "augment",
    "RandomFlip3d": "augment",
    "RandomHorizontalFlip": "augment",
    "RandomResizedCrop": "augment",
    "RandomResizedCrop3d": "augment",
    "RandomRotation": "augment",
    "RandomVerticalFlip": "augment",
    "SparkTransform": "augment",
    "SparkTransform3d": "augment",
    "TwoViewTransform": "augment",
    "TwoViewTransform3d": "augment",
    "contrastive_view": "augment",
    "contrastive_view_3d": "augment",
    "gaussian_blur": "augment",
    "gaussian_noise": "augment",
    "intensity_jitter": "augment",
    "random_resized_crop": "augment",
    "random_resized_crop_3d": "augment",
    "rotate": "augment",
    "AIR_HU": "dicom",
    "CTSeries": "dicom",
    "PAPER_MIN_FILES": "dicom",
    "SkippedFile": "dicom",
    "SliceHeader": "dicom",
    "SliceReadError": "dicom",
    "group_series": "dicom",
    "read_header": "dicom",
    "read_slice_hu": "dicom",
    "scan_dicom_tree": "dicom",
    "WINDOW_PRESETS": "intensity",
    "apply_intensity": "intensity",
    "minmax_scale": "intensity",
    "parse_intensity": "intensity",
    "resample_to_spacing": "intensity",
    "resize_image": "intensity",
    "resize_shorter_and_center_crop": "intensity",
    "slice_to_tensor": "intensity",
    "to_channels": "intensity",
    "window_hu": "intensity",
    "LabeledDataset": "labeled",
    "ORGANMNIST_CLASSES": "labeled",
    "load_csv": "labeled",
    "load_image": "labeled",
    "load_image_folder": "labeled",
    "load_labeled": "labeled",
    "load_medmnist": "labeled",
    "SyntheticCT": "phantom",
    "make_synthetic_ct": "phantom",
    "write_dicom_series": "phantom",
    "PrepareReport": "prepare",
    "UsageError": "prepare",
    "prepare_store": "prepare",
    "PretrainDataset": "pretrain",
    "DEFAULT_FRACTIONS": "splits",
    "nested_fractions": "splits",
    "patient_split": "splits",
    "read_fractions": "splits",
    "stratified_split": "splits",
    "write_fractions": "splits",
    "SliceRecord": "store",
    "SliceStore": "store",
    "StoreError": "store",
    "VolumeDataset": "volumes",
    "resample_volume": "volumes",
    "read_nifti_hu": "nifti",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .augment import (  # noqa: F401
        Compose,
        GaussianBlur,
        GaussianNoise,
        IntensityJitter,
        MultiCropTransform,
        RandomFlip3d,
        RandomHorizontalFlip,
        RandomResizedCrop,
        RandomResizedCrop3d,
        RandomRotation,
        RandomVerticalFlip,
        SparkTransform,
        SparkTransform3d,
        TwoViewTransform,
        TwoViewTransform3d,
        contrastive_view,
        contrastive_view_3d,
        gaussian_blur,
        gaussian_noise,
        intensity_jitter,
        random_resized_crop,
        random_resized_crop_3d,
        rotate,
    )
    from .dicom import (  # noqa: F401
        AIR_HU,
        PAPER_MIN_FILES,
        CTSeries,
        SkippedFile,
        SliceHeader,
        SliceReadError,
        group_series,
        read_header,
        read_slice_hu,
        scan_dicom_tree,
    )
    from .intensity import (  # noqa: F401
        WINDOW_PRESETS,
        apply_intensity,
        minmax_scale,
        parse_intensity,
        resample_to_spacing,
        resize_image,
        resize_shorter_and_center_crop,
        slice_to_tensor,
        to_channels,
        window_hu,
    )
    from .labeled import (  # noqa: F401
        ORGANMNIST_CLASSES,
        LabeledDataset,
        load_csv,
        load_image,
        load_image_folder,
        load_labeled,
        load_medmnist,
    )
    from .nifti import read_nifti_hu  # noqa: F401
    from .phantom import (  # noqa: F401
        SyntheticCT,
        make_synthetic_ct,
        write_dicom_series,
    )
    from .prepare import (  # noqa: F401
        PrepareReport,
        UsageError,
        prepare_store,
    )
    from .pretrain import (  # noqa: F401
        PretrainDataset,
    )
    from .splits import (  # noqa: F401
        DEFAULT_FRACTIONS,
        nested_fractions,
        patient_split,
        read_fractions,
        stratified_split,
        write_fractions,
    )
    from .store import (  # noqa: F401
        SliceRecord,
        SliceStore,
    )
    from .volumes import (  # noqa: F401
        VolumeDataset,
        resample_volume,
    )
