"""Reference models for the tests: transformers' PyTorch SegFormer built here (random init, no
download), with LayerNorm/BatchNorm parameters and running statistics moved away from 1/0 so that
a mix-up of scale/bias/mean/var cannot hide, and logits scaled to order 10."""

from __future__ import annotations

import jax
import numpy as np
import torch
import transformers

import segformer_jax as sj
from segformer_jax.pretrained import variable_shapes
from weights_convert.convert import torch_state_to_flax

TINY = dict(hidden_sizes=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_attention_heads=(1, 2, 3, 4), decoder_hidden_size=16)


def hf_config(num_labels: int = 7, **kwargs) -> transformers.SegformerConfig:
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return transformers.SegformerConfig(num_labels=num_labels, **kwargs)


@torch.no_grad()
def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
            module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(0.5 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            module.num_batches_tracked.fill_(17)


@torch.no_grad()
def scale_logits(model: torch.nn.Module, images_nchw: torch.Tensor, target: float = 10.0) -> None:
    """Scale the final classifier so that the largest logit on `images_nchw` is about `target`."""
    head = model.decode_head.classifier if hasattr(model, "decode_head") else model.classifier
    was_training = model.training
    model.eval()
    peak = model(images_nchw).logits.abs().max().item()
    head.weight.mul_(target / peak)
    head.bias.mul_(target / peak)
    model.train(was_training)


def build_reference(
    cls=transformers.SegformerForSemanticSegmentation,
    *,
    num_labels: int = 7,
    seed: int = 0,
    image_size=(64, 64),
    **config_kwargs,
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(hf_config(num_labels, **config_kwargs)).eval()
    perturb_norms(model, seed)
    x = torch.from_numpy(images(1, *image_size, seed=seed + 100, layout="NCHW"))
    scale_logits(model, x)
    return model


def images(batch: int, height: int, width: int, *, seed: int = 0, layout: str = "NHWC") -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NCHW" else x


def flax_config(hf_model: torch.nn.Module, **overrides) -> sj.SegformerConfig:
    return sj.SegformerConfig.from_hf_dict(hf_model.config.to_dict()).replace(**overrides)


def to_flax(hf_model: torch.nn.Module, flax_cls=sj.SegformerForSemanticSegmentation, **config_overrides):
    """Convert the in-memory state dict (transformers-5 names) into (flax model, variables)."""
    model = flax_cls(flax_config(hf_model, **config_overrides))
    state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}  # no aliasing of torch buffers
    variables, _ = torch_state_to_flax(state, variable_shapes(model))
    return model, jax.tree_util.tree_map(np.asarray, variables)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def random_variables(model, seed: int = 0) -> dict:
    """Random weights of order 0.3 for a Flax model (no torch involved), with a valid BatchNorm state."""
    rng = np.random.default_rng(seed)
    variables = jax.tree_util.tree_map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), variable_shapes(model)
    )
    bn = variables["batch_stats"]["decode_head"]["batch_norm"]
    bn["var"] = np.ones_like(bn["var"])
    bn["num_batches_tracked"] = np.zeros((), np.int32)
    return variables
