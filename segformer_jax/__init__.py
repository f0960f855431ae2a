"""SegFormer in JAX/Flax, exact to Hugging Face transformers."""

from segformer_jax.config import VARIANTS, ConfigError, SegformerConfig
from segformer_jax.model import SegformerForImageClassification, SegformerForSemanticSegmentation, SegformerModel
from segformer_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_images

__all__ = [
    "VARIANTS", "ConfigError", "SegformerConfig",
    "SegformerModel", "SegformerForSemanticSegmentation", "SegformerForImageClassification",
    "IMAGENET_MEAN", "IMAGENET_STD", "normalize_images",
    "from_pretrained", "save_pretrained",
]


def __getattr__(name):  # pretrained I/O pulls in orbax/safetensors: import it on first use
    if name in ("from_pretrained", "save_pretrained"):
        from segformer_jax import pretrained
        return getattr(pretrained, name)
    raise AttributeError(f"module 'segformer_jax' has no attribute {name!r}")
