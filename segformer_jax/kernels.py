"""Hand-written forms of operations that XLA compiles poorly on some backends.

Each function here computes exactly the same function as its straightforward counterpart; the
equivalence suite checks both against the PyTorch reference."""

from __future__ import annotations

import jax.numpy as jnp


def depthwise_conv3x3(x, kernel, bias):
    """Depthwise 3x3 conv, stride 1, zero padding 1, NHWC; kernel (3, 3, 1, C), bias (C,).

    Written as 9 shifted multiply-adds: XLA:CPU runs `feature_group_count=C` convolutions at under
    1 GFLOP/s, while this form is elementwise and vectorises over channels."""
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for i in range(3):
        for j in range(3):
            term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out + bias
