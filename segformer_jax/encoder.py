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
    """HF `segformer.encoder`: four stages, each patch embedding -> blocks -> LayerNorm.
    Returns the four stage outputs, NHWC, at strides 4, 8, 16, 32."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32   # computation dtype (parameters stay float32)

    def setup(self):
        cfg = self.config
        rates = cfg.drop_path_rates
        offsets = np.cumsum((0,) + cfg.depths)
        # Lists of submodules are named `{attribute}_{index}`: patch_embeddings_0, block_2_5, layer_norm_3.
        self.patch_embeddings = [
            OverlapPatchEmbed(cfg.hidden_sizes[i], cfg.patch_sizes[i], cfg.strides[i], cfg.embedding_layer_norm_eps,
                              self.dtype)
            for i in range(cfg.num_encoder_blocks)]
        self.block = [
            [Block(cfg.hidden_sizes[i], cfg.num_attention_heads[i], cfg.sr_ratios[i], cfg.mlp_ratios[i],
                   rates[offsets[i] + j], cfg.attention_probs_dropout_prob, cfg.hidden_dropout_prob,
                   cfg.layer_norm_eps, cfg.embedding_layer_norm_eps, cfg.initializer_range,
                   cfg.depthwise_conv_impl, self.dtype)
             for j in range(cfg.depths[i])]
            for i in range(cfg.num_encoder_blocks)]
        self.layer_norm = [nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)
                           for _ in range(cfg.num_encoder_blocks)]

    def stage(self, x, index: int, *, train: bool = False):
        """Stage `index` (0-based) on the previous stage's NHWC output (or the images)."""
        x = self.patch_embeddings[index](x)
        for block in self.block[index]:
            x = block(x, train=train)
        return self.layer_norm[index](x)

    def __call__(self, x, *, train: bool = False) -> tuple[jnp.ndarray, ...]:
        features = []
        for i in range(self.config.num_encoder_blocks):
            x = self.stage(x, i, train=train)
            features.append(x)
        return tuple(features)
