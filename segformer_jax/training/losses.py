"""Training losses, kept outside the model (as in HF, where the loss lives in `forward(labels=...)`).

The SegFormer loss: logits (B, H/4, W/4, K) are upsampled bilinearly (torch `align_corners=False`)
to the label size, softmax cross-entropy per pixel, pixels labelled `ignore_index` contribute 0.
Two reductions exist in the reference code bases:

* ``"valid"``: mean over non-ignored pixels. Hugging Face (`nn.CrossEntropyLoss(ignore_index=255)`)
  and mmseg with ``avg_non_ignore=True``.
* ``"all"``: sum over pixels / number of all pixels, ignored ones included. mmseg's default
  (``avg_non_ignore=False``), i.e. what the NVlabs SegFormer configs were trained with; it down-weights
  images with many ignored pixels.
"""

from __future__ import annotations

import jax.numpy as jnp

from segformer_jax.models import kernels

REDUCTIONS = ("valid", "all")


def semantic_segmentation_loss(logits, labels, *, ignore_index: int = 255, reduction: str = "valid"):
    """Scalar float32 loss. logits: (B, h, w, K) NHWC float; labels: (B, H, W) int, H >= h, W >= w.

    Uses `kernels.upsampled_cross_entropy_banded` (upsample + CE in bands of rows, same value and
    gradient as the plain jax.image.resize + log_softmax form, no full-resolution buffer: b0 training
    peak memory 1.06x transformers' instead of 1.40x with the whole-image fused form, same speed); it
    falls back to the whole-image `kernels.upsampled_cross_entropy` when the label size is not an integer
    multiple of the logits'."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction={reduction!r}; choose one of {REDUCTIONS}")
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (B, h, w, K) and labels (B, H, W); got {logits.shape} and {labels.shape}")
    if logits.shape[-1] < 2:
        raise ValueError(
            "num_labels must be >= 2 for softmax cross-entropy (HF's num_labels=1 BCE path is not supported)"
        )
    labels = labels.astype(jnp.int32)
    mean_over_valid = kernels.upsampled_cross_entropy_banded(logits, labels, ignore_index)
    if reduction == "valid":
        return mean_over_valid
    # sum / all pixels = (sum / valid) * valid / all; valid/all is a constant w.r.t. the logits.
    num_valid = jnp.maximum(jnp.sum(labels != ignore_index), 1).astype(jnp.float32)
    return mean_over_valid * num_valid / labels.size
