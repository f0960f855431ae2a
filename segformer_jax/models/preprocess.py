"""Image normalisation as the SegFormer image processors do it (ImageNet mean/std on 0..255)."""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def normalize_images(images) -> np.ndarray:
    """uint8 (or 0..255 float) RGB images, NHWC or HWC -> float32 ImageNet-normalised."""
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"normalize_images expects RGB in the last axis (..., 3); got shape {images.shape}")
    return ((images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
