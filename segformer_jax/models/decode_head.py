"""The all-MLP decode head: unify channels per stage, upsample to 1/4, fuse, classify."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segformer_jax.models import kernels
from segformer_jax.models.config import SegformerConfig
from segformer_jax.models.layers import Dense, Dropout, conv_init, dense_init

Dtype = Any


def upsample_bilinear(x, size: tuple[int, int]):
    """Bilinear resize of NHWC `x` to `size`; equals torch `interpolate(align_corners=False)` when
    upsampling (jax.image.resize only antialiases when downsampling)."""
    return kernels.resize_bilinear(x, size)  # 2-tap blends, not jax.image.resize's dense contraction


class BatchNorm(nn.Module):
    """BatchNorm2d with torch semantics: normalise by the biased batch variance, but update the
    running variance with the unbiased one; `momentum` is torch's (new = (1-m) old + m batch).

    Under a data-parallel jit the batch axis is global, so statistics are over the global batch
    (SyncBN) without extra code."""

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        # torch counts training batches; kept so that HF -> Flax -> HF round-trips bit-exactly.
        num_batches = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if train:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)  # two-pass: no E[x^2]-E[x]^2 cancellation
            if not self.is_initializing():
                n = x.size // c
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * (n / max(n - 1, 1))
                num_batches.value = num_batches.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        dt = kernels.activation_dtype(self.dtype)
        y = x.astype(dt) * mul.astype(dt) + (bias - mean * mul).astype(dt)
        return y


def _pixels_matmul(x, kernel, compute_dtype=jnp.float32):
    """x (..., C_in) @ kernel (C_in, C_out) as one 2D matmul over all pixels (`kernels.matmul`). Written
    on the 4D array, the kernel gradient's contraction runs over three axes, and XLA:CPU then wrote the
    incoming gradient out transposed, (C_out, pixels), before the matmul: at b0 512x512 batch 2 that
    copy (32768 x 256 floats, in the BatchNorm backward) took 80-107 ms of a ~2.2 s training step."""
    return kernels.matmul(x, kernel, compute_dtype)


class Conv1x1(nn.Module):
    """torch `Conv2d(kernel_size=1)`: parameters of `nn.Conv((1, 1))` (kernel (1, 1, in, out)),
    computed as a matmul over channels. XLA:CPU differentiates a 1x1 conv into a convolution with a
    full-image window for the kernel gradient, several times slower than the matmul it is."""

    features: int
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        y = _pixels_matmul(x, kernel[0, 0], self.dtype)
        return y if bias is None else y + bias.astype(y.dtype)


class MLP(nn.Module):
    """Per-stage linear layer to the decoder width (HF `decode_head.linear_c.i.proj`)."""

    features: int
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Dense(self.features, dtype=self.dtype, kernel_init=dense_init(self.initializer_range), name="proj")(x)


def resolve_decode_head_impl(impl: str, train: bool = False) -> str:
    if impl != "auto":
        return impl
    # fused: fewer FLOPs on every backend. phased: faster for inference on XLA:CPU (b0 / b2 512x512
    # 6-13%); no gain in the b0 training step (within 2%, same process), accelerators unmeasured.
    return "phased" if jax.default_backend() == "cpu" and not train else "fused"


class DecodeHead(nn.Module):
    """All-MLP head: linear_c_i per stage, bilinear upsample to stage-1 size, concat in reverse
    order [c4, c3, c2, c1], 1x1 fuse (no bias) + BatchNorm + ReLU, dropout, 1x1 classifier.

    impl='fused' computes the same function with ~3x fewer FLOPs: the fuse conv is linear and
    bilinear upsampling is linear with weights summing to one, so each stage's projection can be
    folded with its slice of the fuse kernel and applied before upsampling.

    impl='phased' is 'fused' with the pixels in column-phase order (kernels.to_column_phases) from
    the upsampling to the classifier, where every layer is per pixel, and the logits put back in
    natural order: the upsampling then needs no per-element interleave (b0 on CPU: the head's
    largest kernel). Falls back to natural order when a stage's width does not divide stage 1's.

    With valid_sizes (each image's size per stage inside a padded batch) the upsampling uses the weights
    of each image's own sizes (`kernels.resize_bilinear_valid`), in the fused form or, for 'concat',
    the concat form."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray], *, train: bool = False, valid_sizes=None):
        cfg = self.config
        n, d = cfg.num_encoder_blocks, cfg.decoder_hidden_size
        size = features[0].shape[1:3]
        projections = [MLP(d, cfg.initializer_range, self.dtype, name=f"linear_c_{i}") for i in range(n)]
        fuse = Conv1x1(d, use_bias=False, kernel_init=conv_init(1, d), dtype=self.dtype, name="linear_fuse")

        impl = resolve_decode_head_impl(cfg.decode_head_impl, train)
        period = None  # column-phase period the pixels are in between upsampling and logits
        if valid_sizes is None:
            upsample = lambda y, i: upsample_bilinear(y, size)
        else:
            upsample = lambda y, i: (
                y if i == 0 else kernels.resize_bilinear_valid(y, size, valid_sizes[i], valid_sizes[0])
            )
        if impl == "concat" or self.is_initializing():
            upsampled = [upsample(proj(f), i) for i, (proj, f) in enumerate(zip(projections, features))]
            x = fuse(jnp.concatenate(upsampled[::-1], axis=-1))
        else:
            if impl == "phased" and valid_sizes is None:
                period = kernels.column_phase_period([f.shape[2] for f in features], size[1])
            x = self._fused(features, size, period, upsample)

        x = BatchNorm(dtype=self.dtype, name="batch_norm")(x, train=train)
        x = nn.relu(x)
        x = Dropout(cfg.classifier_dropout_prob, deterministic=not train)(x)
        logits = Conv1x1(cfg.num_labels, kernel_init=conv_init(1, cfg.num_labels), dtype=self.dtype, name="classifier")(
            x
        )
        return logits if period is None else kernels.from_column_phases(logits, period)

    def _fused(self, features, size, period: int | None, upsample):
        n, d = len(features), self.config.decoder_hidden_size
        params = self.variables["params"]
        fuse_kernel = params["linear_fuse"]["kernel"][0, 0]  # (n*d, d), reversed stage order
        out = None
        for i, f in enumerate(features):
            block = fuse_kernel[(n - 1 - i) * d : (n - i) * d]  # stage i's slice of the fuse
            proj = params[f"linear_c_{i}"]["proj"]
            kernel = proj["kernel"] @ block  # (C_i, d): projection folded into fuse
            bias = proj["bias"] @ block
            y = _pixels_matmul(f, kernel, self.dtype)
            y = y + bias.astype(y.dtype)
            y = upsample(y, i) if period is None else kernels.upsample_to_column_phases(y, size, period)
            out = y if out is None else out + y
        return out
