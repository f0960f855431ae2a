"""Mix Transformer (MiT) encoder: four stages of overlap patch embedding, efficient-attention
blocks and a LayerNorm, giving features at 1/4, 1/8, 1/16 and 1/32 of the input."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segformer_jax.models.config import SegformerConfig
from segformer_jax.models.layers import Block, LayerNorm, OverlapPatchEmbed, ValidRegion, valid_region, zero_outside

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


def valid_stage_sizes(config: SegformerConfig, valid_size) -> list:
    """`stage_sizes` of runtime image sizes: valid_size (B, 2) int -> per stage (B, 2) int32."""
    size = jnp.asarray(valid_size, jnp.int32)
    sizes = []
    for k, s in zip(config.patch_sizes, config.strides):
        size = (size + 2 * (k // 2) - k) // s + 1
        sizes.append(size)
    return sizes


def check_valid_size(images, valid_size) -> None:
    if not hasattr(valid_size, "dtype"):
        valid_size = np.asarray(valid_size)
    shape = tuple(valid_size.shape)
    if shape != (images.shape[0], 2):
        raise ValueError(
            f"valid_size must be (batch, 2) = (height, width) of each image inside the padded batch, "
            f"batch {images.shape[0]}; got shape {shape}"
        )
    if not jnp.issubdtype(valid_size.dtype, jnp.integer):
        raise ValueError(f"valid_size must be integers (pixels); got dtype {valid_size.dtype}")


def check_images(config: SegformerConfig, images) -> None:
    """Clear errors for inputs the network cannot take, instead of failures deep inside XLA."""
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"images must be a 4-D NHWC batch (batch, height, width, {config.num_channels}); "
            f"got shape {shape}. Add a batch axis with images[None] for a single image."
        )
    if shape[-1] != config.num_channels:
        hint = (
            " It looks like NCHW: transpose with images.transpose(0, 2, 3, 1)."
            if shape[1] == config.num_channels
            else ""
        )
        raise ValueError(
            f"images must be NHWC with {config.num_channels} channels in the last axis; got shape {shape}.{hint}"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point, ImageNet-normalised ((x/255 - mean) / std); got dtype "
            f"{images.dtype}. Use segformer_jax.normalize_images(uint8_images)."
        )
    for i, ((h, w), sr) in enumerate(zip(stage_sizes(config, shape[1], shape[2]), config.sr_ratios)):
        if h < max(sr, 1) or w < max(sr, 1):
            raise ValueError(
                f"images of {shape[1]}x{shape[2]} are too small: stage {i + 1} would be {h}x{w}, "
                f"smaller than its spatial-reduction ratio {sr}. Use at least 32x32 pixels."
            )


class MixVisionTransformer(nn.Module):
    """HF `segformer.encoder`: four stages, each patch embedding -> blocks -> LayerNorm.
    Returns the four stage outputs, NHWC, at strides 4, 8, 16, 32."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32  # computation dtype (parameters stay float32)

    def setup(self):
        cfg = self.config
        rates = cfg.drop_path_rates
        offsets = np.cumsum((0,) + cfg.depths)
        # Lists of submodules are named `{attribute}_{index}`: patch_embeddings_0, block_2_5, layer_norm_3.
        self.patch_embeddings = [
            OverlapPatchEmbed(
                cfg.hidden_sizes[i], cfg.patch_sizes[i], cfg.strides[i], cfg.embedding_layer_norm_eps, self.dtype
            )
            for i in range(cfg.num_encoder_blocks)
        ]
        self.block = [
            [self._make_block(i, rates[offsets[i] + j]) for j in range(cfg.depths[i])]
            for i in range(cfg.num_encoder_blocks)
        ]
        self.layer_norm = [
            LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype) for _ in range(cfg.num_encoder_blocks)
        ]

    def _make_block(self, stage: int, drop_path, *, unbound: bool = False) -> Block:
        cfg = self.config
        kwargs = {"parent": None} if unbound else {}  # unbound: a template for Block.apply
        return Block(
            cfg.hidden_sizes[stage],
            cfg.num_attention_heads[stage],
            cfg.sr_ratios[stage],
            cfg.mlp_ratios[stage],
            drop_path,
            cfg.attention_probs_dropout_prob,
            cfg.hidden_dropout_prob,
            cfg.layer_norm_eps,
            cfg.embedding_layer_norm_eps,
            cfg.initializer_range,
            cfg.depthwise_conv_impl,
            self.dtype,
            **kwargs,
        )

    def stage(self, x, index: int, *, train: bool = False, drop_path_draws=None, valid_size=None):
        """Stage `index` (0-based) on the previous stage's NHWC output (or the images).
        drop_path_draws: (depth, 2, batch) uniform numbers for the blocks' drop path (None: drawn per block).
        valid_size: (B, 2) this stage's output size of each image inside a padded batch (None: all of
        it); the input must be zero outside the image (the previous stage's output is)."""
        x = self.patch_embeddings[index](x)
        valid = None if valid_size is None else valid_region(valid_size, *x.shape[1:3])
        if (self.config.scan_blocks or self.config.remat_blocks) and not self.is_initializing():
            x = self._blocks_functional(x, index, train, drop_path_draws, valid)
        else:
            for j, block in enumerate(self.block[index]):
                draws = None if drop_path_draws is None else drop_path_draws[j]
                x = block(x, train=train, drop_path_draws=draws, valid=valid)
        return zero_outside(self.layer_norm[index](x), valid)

    def _blocks_functional(self, x, index: int, train: bool, drop_path_draws=None, valid: ValidRegion | None = None):
        """The blocks of stage `index` as pure functions of their parameters, so that they can be
        scanned (one compiled block per stage) and/or rematerialised. Same parameters, same function
        as the module path, and the same drop-path masks (the encoder's draws); the keys of the other
        dropouts are split per block from one key of the stage."""
        cfg = self.config
        depth = cfg.depths[index]
        first = sum(cfg.depths[:index])
        rates = cfg.drop_path_rates[first : first + depth]
        params = [self.variables["params"][f"block_{index}_{j}"] for j in range(depth)]
        random = train and (max(rates) > 0 or cfg.hidden_dropout_prob > 0 or cfg.attention_probs_dropout_prob > 0)
        keys = jax.random.split(self.make_rng("dropout"), depth) if random else None

        def block(x, block_params, rate, key, draws):
            if not random:  # drop path is the identity: keep its rate static (rate may be traced here)
                return self._make_block(index, 0.0, unbound=True).apply(
                    {"params": block_params}, x, train=train, valid=valid
                )
            return self._make_block(index, rate, unbound=True).apply(
                {"params": block_params}, x, train=train, drop_path_draws=draws, rngs={"dropout": key}, valid=valid
            )

        if cfg.remat_blocks:
            block = jax.checkpoint(block)
        if not cfg.scan_blocks or depth == 1:
            for j in range(depth):
                x = block(
                    x,
                    params[j],
                    rates[j],
                    keys[j] if random else None,
                    None if drop_path_draws is None else drop_path_draws[j],
                )
            return x
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
        xs = (stacked, jnp.asarray(rates, jnp.float32), keys if random else jnp.zeros((depth,)), drop_path_draws)
        x, _ = jax.lax.scan(lambda carry, inputs: (block(carry, *inputs), None), x, xs)
        return x

    def __call__(self, x, *, train: bool = False, valid_size=None) -> tuple[jnp.ndarray, ...]:
        """valid_size: (B, 2) int, the (height, width) of each image inside a padded batch (it sits at
        the top left). Each image then gets the features of its own unpadded size, zero outside them:
        one compilation serves every size inside the padding. None: the whole input is the image."""
        cfg = self.config
        sizes = [None] * cfg.num_encoder_blocks
        if valid_size is not None:
            sizes = valid_stage_sizes(cfg, valid_size)
            x = zero_outside(x, valid_region(jnp.asarray(valid_size, jnp.int32), *x.shape[1:3]))
        draws = [None] * cfg.num_encoder_blocks
        if train and max(cfg.drop_path_rates, default=0.0) > 0 and not self.is_initializing():
            # One draw for every block's drop path (HF: torch.rand per call); split per stage.
            every = jax.random.uniform(self.make_rng("dropout"), (sum(cfg.depths), 2, x.shape[0]))
            offsets = np.cumsum((0,) + tuple(cfg.depths))
            draws = [every[offsets[i] : offsets[i + 1]] for i in range(cfg.num_encoder_blocks)]
        features = []
        for i in range(cfg.num_encoder_blocks):
            x = self.stage(x, i, train=train, drop_path_draws=draws[i], valid_size=sizes[i])
            features.append(x)
        return tuple(features)
