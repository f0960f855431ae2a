"""Images for humans: validation image | ground truth | prediction, masks blended in the class palette."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255


def denormalize(images, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """ImageNet-normalised float NHWC -> uint8 RGB."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend class colours over `image` (uint8 HxWx3); ignored / out-of-range pixels stay as they are."""
    palette = np.asarray(palette, np.uint8)
    mask = np.asarray(mask)
    known = (mask >= 0) & (mask < len(palette))
    colours = palette[np.where(known, mask, 0)].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where(known[..., None], np.round(blended), image).astype(np.uint8)


def comparison_grid(images, labels, preds, palette, *, mean, std, gap: int = 2) -> np.ndarray:
    """uint8 (N*H + gaps, 3*W + gaps, 3): one row per example, columns image / ground truth / prediction."""
    rgb = denormalize(images, mean, std)
    rows = []
    for image, label, pred in zip(rgb, np.asarray(labels), np.asarray(preds)):
        cells = [image, overlay(image, label, palette), overlay(image, pred, palette)]
        sep = np.full((image.shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([cells[0], sep, cells[1], sep, cells[2]], axis=1))
    out = []
    for i, row in enumerate(rows):
        if i:
            out.append(np.full((gap, row.shape[1], 3), 255, np.uint8))
        out.append(row)
    return np.concatenate(out, axis=0)


def save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8)).save(path)
