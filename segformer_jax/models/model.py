"""SegFormer models: the encoder alone, with the all-MLP segmentation head, and with the
ImageNet classification head of the mit-bX checkpoints. Inputs are float NHWC, ImageNet-normalised."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from segformer_jax.models import kernels
from segformer_jax.models.config import SegformerConfig
from segformer_jax.models.decode_head import DecodeHead
from segformer_jax.models.encoder import MixVisionTransformer, check_images, check_valid_size, valid_stage_sizes
from segformer_jax.models.layers import dense_init

Dtype = Any


class SegformerModel(nn.Module):
    """HF `segformer`: the MiT encoder; returns the four stage features (NHWC)."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32  # computation dtype; parameters stay float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, valid_size=None):
        """valid_size: see SegformerForSemanticSegmentation."""
        check_images(self.config, images)
        if valid_size is not None:
            check_valid_size(images, valid_size)
        encoder = MixVisionTransformer(self.config, self.dtype, name="encoder")
        return encoder(images.astype(kernels.activation_dtype(self.dtype)), train=train, valid_size=valid_size)


class SegformerForSemanticSegmentation(nn.Module):
    """Encoder + all-MLP decode head. Logits are (B, ceil(H/4), ceil(W/4), num_labels), NHWC."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32  # computation dtype; parameters stay float32

    @nn.compact
    def __call__(self, images, *, train: bool = False, output_hidden_states: bool = False, valid_size=None):
        """valid_size: optional (B, 2) int array, the (height, width) of each image inside a batch padded
        at the bottom / right (a runtime value: one compilation serves every size inside the padding).
        Each image's logits are then those of its unpadded self, `apply(variables, image[:h, :w])`, in
        the top-left (ceil(h/4), ceil(w/4)) of the output; elsewhere they are unspecified. Without it,
        zero padding changes every logit (attention is global, the convs and upsampling see the
        padding)."""
        features = SegformerModel(self.config, self.dtype, name="segformer")(images, train=train, valid_size=valid_size)
        stage_valid = None if valid_size is None else valid_stage_sizes(self.config, valid_size)
        logits = DecodeHead(self.config, self.dtype, name="decode_head")(features, train=train, valid_sizes=stage_valid)
        logits = logits.astype(jnp.float32)
        return (logits, features) if output_hidden_states else logits


class SegformerForImageClassification(nn.Module):
    """Encoder + global average pool + linear classifier (the nvidia/mit-bX ImageNet checkpoints)."""

    config: SegformerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        features = SegformerModel(self.config, self.dtype, name="segformer")(images, train=train)
        pooled = features[-1].mean(axis=(1, 2))
        logits = nn.Dense(
            self.config.num_labels,
            dtype=self.dtype,
            kernel_init=dense_init(self.config.initializer_range),
            name="classifier",
        )(pooled)
        return logits.astype(jnp.float32)


ARCHITECTURES = {
    "SegformerForSemanticSegmentation": SegformerForSemanticSegmentation,
    "SegformerForImageClassification": SegformerForImageClassification,
    "SegformerModel": SegformerModel,
}


def architecture_name(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} is not a SegFormer model class ({', '.join(ARCHITECTURES)})")
