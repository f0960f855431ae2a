"""Mix Transformer (MiT) encoder: four stages of overlap patch embedding, efficient-attention
blocks and a LayerNorm, giving features at 1/4, 1/8, 1/16 and 1/32 of the input."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from segformer_jax.config import SegformerConfig
from segformer_jax.layers import Block, OverlapPatchEmbed

Dtype = Any


def stage_sizes(config: SegformerConfig, height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of each stage's output for an input of height x width (torch conv arithmetic)."""
    sizes = []
    for k, s in zip(config.patch_sizes, config.strides):
        p = k // 2
        height = (height + 2 * p - k) // s + 1
        width = (width + 2 * p - k) // s + 1
        sizes.append((height, width))
    return sizes


def check_images(config: SegformerConfig, images) -> None:
    """Clear errors for inputs the network cannot take, instead of failures deep inside XLA."""
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"images must be a 4-D NHWC batch (batch, height, width, {config.num_channels}); "
                         f"got shape {shape}. Add a batch axis with images[None] for a single image.")
    if shape[-1] != config.num_channels:
        hint = " It looks like NCHW: transpose with images.transpose(0, 2, 3, 1)." if shape[1] == config.num_channels else ""
        raise ValueError(f"images must be NHWC with {config.num_channels} channels in the last axis; "
                         f"got shape {shape}.{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point, ImageNet-normalised ((x/255 - mean) / std); got dtype "
                         f"{images.dtype}. Use segformer_jax.normalize_images(uint8_images).")
    for i, ((h, w), sr) in enumerate(zip(stage_sizes(config, shape[1], shape[2]), config.sr_ratios)):
        if h < max(sr, 1) or w < max(sr, 1):
            raise ValueError(f"images of {shape[1]}x{shape[2]} are too small: stage {i + 1} would be {h}x{w}, "
                             f"smaller than its spatial-reduction ratio {sr}. Use at least 32x32 pixels.")


class MixVisionTransformer(nn.Module):
    """HF `segformer.encoder`: returns the four stage outputs, NHWC."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32   # computation dtype (parameters stay float32)

    @nn.compact
    def __call__(self, x, *, train: bool = False) -> tuple[jnp.ndarray, ...]:
        cfg = self.config
        drop_path_rates = cfg.drop_path_rates
        offsets = np.cumsum((0,) + cfg.depths)
        features = []
        for i in range(cfg.num_encoder_blocks):
            x = OverlapPatchEmbed(cfg.hidden_sizes[i], cfg.patch_sizes[i], cfg.strides[i], cfg.layer_norm_eps,
                                  self.dtype, name=f"patch_embeddings_{i}")(x)
            for j in range(cfg.depths[i]):
                x = Block(cfg.hidden_sizes[i], cfg.num_attention_heads[i], cfg.sr_ratios[i], cfg.mlp_ratios[i],
                          drop_path_rates[offsets[i] + j], cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob,
                          cfg.layer_norm_eps, cfg.initializer_range, cfg.depthwise_conv_impl, self.dtype,
                          name=f"block_{i}_{j}")(x, train=train)
            x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=f"layer_norm_{i}")(x)
            features.append(x)
        return tuple(features)
