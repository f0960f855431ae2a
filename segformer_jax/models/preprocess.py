"""Image normalisation as the SegFormer image processors do it (ImageNet mean/std on 0..255)."""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def normalize_images(images, mean=None, std=None) -> np.ndarray:
    """uint8 (or 0..255 float) RGB images, NHWC or HWC -> float32 normalised with per-channel `mean` /
    `std` on 0..255 pixels (default: ImageNet's)."""
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"normalize_images expects RGB in the last axis (..., 3); got shape {images.shape}")
    mean = IMAGENET_MEAN if mean is None else np.asarray(mean, np.float32)
    std = IMAGENET_STD if std is None else np.asarray(std, np.float32)
    return ((images.astype(np.float32) - mean) / std).astype(np.float32)
