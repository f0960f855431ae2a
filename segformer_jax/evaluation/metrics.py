"""Segmentation evaluation: confusion matrix on device, mIoU / mAcc (mPA) / aAcc as mmseg computes them,
whole-image and sliding-window inference.

Conventions (mmseg `mean_iou` / `IoUMetric`):
* rows of the confusion matrix are ground-truth classes, columns predicted classes;
* pixels labelled `ignore_index` (and labels outside [0, K)) are not counted;
* per class IoU = TP / (GT + Pred - TP), Acc = TP / GT; a class with a zero denominator (absent from the
  ground truth, and for IoU also never predicted) gets NaN and is excluded from the means;
* aAcc = all TP / all counted pixels;
* Dice = 2 TP / (GT + Pred), Precision = TP / Pred, Recall = TP / GT (= Acc), Fscore = the F1 of
  Precision and Recall (mmseg `mDice` / `mFscore`, beta 1); NaN where a denominator is 0 (Fscore:
  where Precision or Recall is NaN, or both are 0), excluded from the means.

Binary models (one logit channel) are evaluated as 2 classes: background 0, foreground 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segformer_jax.inference.tiling import logits_size, slide_windows  # shared with predict
from segformer_jax.models.kernels import resize_bilinear, resize_bilinear_valid

# Flush the on-device int32 matrix to the host int64 one before 2^31 pixels can have been counted.
_FLUSH_PIXELS = 2**30


def confusion_matrix(labels, preds, num_classes: int, ignore_index: int = 255):
    """(K, K) int32 counts, rows = ground truth, columns = prediction. labels, preds: int (...) same shape."""
    labels = labels.astype(jnp.int32).reshape(-1)
    preds = preds.astype(jnp.int32).reshape(-1)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    index = jnp.where(valid, labels * num_classes + jnp.clip(preds, 0, num_classes - 1), 0)
    # bincount with a static length: a scatter-add, which XLA runs well on CPU, GPU and TPU.
    counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[index].add(valid.astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrixAccumulator:
    """Sums per-batch confusion matrices on device (no host sync per batch); moves the running sum to
    a host int64 matrix before int32 could overflow (Cityscapes val alone is 2^31 pixels)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._host = np.zeros((num_classes, num_classes), np.int64)
        self._device = None
        self._pixels_on_device = 0

    def add(self, batch_matrix, num_pixels: int) -> None:
        if self._device is not None and self._pixels_on_device + num_pixels >= _FLUSH_PIXELS:
            self._flush()
        self._device = batch_matrix if self._device is None else self._device + batch_matrix
        self._pixels_on_device += num_pixels

    def _flush(self) -> None:
        if self._device is not None:
            self._host += np.asarray(jax.device_get(self._device), np.int64)
        self._device, self._pixels_on_device = None, 0

    def result(self) -> np.ndarray:
        self._flush()
        return self._host.copy()


def segmentation_metrics(matrix, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, mAcc (mean per-class pixel accuracy, 'mPA'), aAcc and per-class IoU / Acc from a (K, K)
    confusion matrix. NaN entries mark classes with no ground truth (and no prediction, for IoU)."""
    cm = np.asarray(matrix, np.float64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
        dice = np.where(gt + pred > 0, 2 * tp / (gt + pred), np.nan)
        precision = np.where(pred > 0, tp / pred, np.nan)
        recall = acc
        fscore = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), np.nan)
    total = cm.sum()

    def nanmean(x):
        return float(np.nanmean(x)) if np.any(~np.isnan(x)) else float("nan")

    per_class = {}
    for i, name in enumerate(names):
        per_class[name] = {
            "IoU": float(iou[i]),
            "Acc": float(acc[i]),
            "Dice": float(dice[i]),
            "Fscore": float(fscore[i]),
            "Precision": float(precision[i]),
            "Recall": float(recall[i]),
        }
    return {
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mDice": nanmean(dice),
        "mFscore": nanmean(fscore),
        "mPrecision": nanmean(precision),
        "mRecall": nanmean(recall),
        "num_pixels": int(total),
        "per_class": per_class,
    }


SUMMARY_METRICS = ("mIoU", "mAcc", "aAcc", "mDice", "mFscore", "mPrecision", "mRecall")
PER_CLASS_METRICS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")


def format_table(results: Mapping) -> str:
    """Per-class table (percent, as mmseg prints it) followed by the summary line."""
    names = list(results["per_class"])
    width = max([5] + [len(n) for n in names])
    columns = [c for c in PER_CLASS_METRICS if any(c in row for row in results["per_class"].values())]
    cell = max(len(c) for c in columns)
    lines = [
        " | ".join([f"{'Class':<{width}}"] + [f"{c:>{cell}}" for c in columns]),
        "-+-".join(["-" * width] + ["-" * cell] * len(columns)),
    ]

    def pct(v):
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    for name in names:
        row = results["per_class"][name]
        lines.append(" | ".join([f"{name:<{width}}"] + [f"{pct(row.get(c)):>{cell}}" for c in columns]))
    lines.append("  ".join(f"{m} {pct(results[m])}" for m in SUMMARY_METRICS if m in results))
    return "\n".join(lines)


def save_json(results: Mapping, path: str) -> None:
    """JSON with NaN written as null (strict JSON has no NaN)."""

    def clean(v):
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    with open(path, "w") as f:
        json.dump(clean(results), f, indent=2)


# ----------------------------------------------------------------------------- inference


def upsample_logits(logits, size):
    """Logits (B, h, w, K) to (B, H, W, K), torch bilinear align_corners=False (mmseg `resize`)."""
    return resize_bilinear(logits.astype(jnp.float32), tuple(size))


def predict_whole(logits_fn: Callable, images, out_size=None, valid_size=None):
    """Whole-image inference: logits of the full image, upsampled to `out_size` (default: image size).

    valid_size (B, 2): each image's (h, w) inside a padded batch, labels padded likewise (out_size =
    the images' size). `logits_fn(images, valid_size)` then gives each image's unpadded logits, which
    are upsampled to its own (h, w) with that size's weights: the padding changes nothing."""
    out_size = tuple(out_size or images.shape[1:3])
    if valid_size is None:
        return upsample_logits(logits_fn(images), out_size)
    if out_size != tuple(images.shape[1:3]):
        raise ValueError(f"valid_size needs labels of the images' size {images.shape[1:3]}; got {out_size}")
    logits = logits_fn(images, valid_size).astype(jnp.float32)
    return resize_bilinear_valid(logits, out_size, logits_size(valid_size), valid_size)


def predict_slide(
    logits_fn: Callable, images, crop: Sequence[int], stride: Sequence[int], num_classes: int, out_size=None
):
    """Sliding-window inference (mmseg `slide_inference`): each crop's logits are upsampled to the crop
    size, summed into a full-size canvas, and divided by the number of windows covering each pixel."""
    b, height, width, _ = images.shape
    total = jnp.zeros((b, height, width, num_classes), jnp.float32)
    count = np.zeros((1, height, width, 1), np.float32)  # static: the windows are known at trace time
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        window = images[:, y1:y2, x1:x2]
        window_logits = upsample_logits(logits_fn(window), (y2 - y1, x2 - x1))
        total = total + jnp.pad(window_logits, ((0, 0), (y1, height - y2), (x1, width - x2), (0, 0)))
        count[:, y1:y2, x1:x2] += 1
    logits = total / jnp.asarray(count)
    out_size = tuple(out_size or (height, width))
    return logits if out_size == (height, width) else upsample_logits(logits, out_size)


def predict(
    logits_fn: Callable,
    images,
    *,
    mode: str = "whole",
    crop=None,
    stride=None,
    num_classes=None,
    out_size=None,
    valid_size=None,
):
    """Full-resolution logits (B, H, W, K) by whole-image or sliding-window inference. valid_size: see
    `predict_whole` (whole mode; sliding windows are planned on the padded size: exact when the images
    fill it, as Cityscapes' do)."""
    if mode == "whole":
        return predict_whole(logits_fn, images, out_size, valid_size)
    if mode == "slide":
        if crop is None or stride is None or num_classes is None:
            raise ValueError("slide inference needs crop, stride and num_classes")
        return predict_slide(logits_fn, images, tuple(crop), tuple(stride), num_classes, out_size)
    raise ValueError(f"eval mode={mode!r}; choose 'whole' or 'slide'")
