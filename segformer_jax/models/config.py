"""SegFormer configuration: the fields of Hugging Face's `SegformerConfig` that shape the network,
the b0..b5 variant table, and HF `config.json` in/out."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

# The published MiT variants (NVlabs `mix_transformer.py`, HF nvidia/mit-bX and segformer-bX).
# All share heads (1, 2, 5, 8), sr (8, 4, 2, 1), patch (7, 3, 3, 3), strides (4, 2, 2, 2) and
# mlp ratio 4 (the code's 4; the paper's table says 8 for some stages, the checkpoints use 4).
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": dict(hidden_sizes=(32, 64, 160, 256), depths=(2, 2, 2, 2), decoder_hidden_size=256),
    "b1": dict(hidden_sizes=(64, 128, 320, 512), depths=(2, 2, 2, 2), decoder_hidden_size=256),
    "b2": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 6, 3), decoder_hidden_size=768),
    "b3": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 4, 18, 3), decoder_hidden_size=768),
    "b4": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 8, 27, 3), decoder_hidden_size=768),
    "b5": dict(hidden_sizes=(64, 128, 320, 512), depths=(3, 6, 40, 3), decoder_hidden_size=768),
}

# LayerNorm epsilon: HF modules use torch's default 1e-5 (their `layer_norm_eps` field is unused);
# the NVlabs originals were trained with 1e-6 in blocks and stage norms.
HF_LAYER_NORM_EPS = 1e-5
NVLABS_LAYER_NORM_EPS = 1e-6

# Keys of HF's config.json that we read; anything else in the file is ignored (e.g. dtype).
_HF_FIELDS = (
    "num_channels",
    "num_encoder_blocks",
    "depths",
    "sr_ratios",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "num_attention_heads",
    "mlp_ratios",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout_prob",
    "initializer_range",
    "drop_path_rate",
    "decoder_hidden_size",
    "semantic_loss_ignore_index",
    "reshape_last_stage",
)
_TUPLE_FIELDS = ("depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios")
# Implementation choices (not part of the network's function); see docs in SegformerConfig.
_IMPL_CHOICES = {
    "depthwise_conv_impl": ("auto", "native", "shifted"),
    "decode_head_impl": ("auto", "concat", "fused", "phased"),
}


class ConfigError(ValueError):
    """A configuration or config.json that does not describe a valid SegFormer."""


@dataclasses.dataclass(frozen=True)
class SegformerConfig:
    """Architecture of a SegFormer (defaults: b0, as HF's `SegformerConfig()`)."""

    num_channels: int = 3  # input image channels
    num_encoder_blocks: int = 4  # stages of the Mix Transformer encoder
    depths: tuple[int, ...] = (2, 2, 2, 2)  # transformer blocks per stage
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # spatial reduction of keys/values per stage
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)  # channels per stage
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)  # overlap patch-embed kernel per stage
    strides: tuple[int, ...] = (4, 2, 2, 2)  # overlap patch-embed stride per stage
    num_attention_heads: tuple[int, ...] = (1, 2, 5, 8)  # heads per stage
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)  # Mix-FFN hidden expansion per stage
    hidden_act: str = "gelu"  # Mix-FFN activation (exact erf GELU)
    hidden_dropout_prob: float = 0.0  # dropout after attention/FFN projections
    attention_probs_dropout_prob: float = 0.0  # dropout on attention probabilities
    classifier_dropout_prob: float = 0.1  # dropout before the decode head classifier
    initializer_range: float = 0.02  # std of the truncated-normal init of dense layers
    drop_path_rate: float = 0.1  # stochastic depth at the last block (linear from 0)
    decoder_hidden_size: int = 256  # channels of the all-MLP decode head
    num_labels: int = 150  # segmentation classes (or ImageNet classes)
    semantic_loss_ignore_index: int = 255  # label value ignored by the loss and metrics
    reshape_last_stage: bool = True  # last stage as a feature map (False: tokens B,N,C)
    layer_norm_eps: float = HF_LAYER_NORM_EPS  # block and stage norms: 1e-5 for HF weights, 1e-6 for NVlabs
    # Norms after the patch-embed conv and the attention's reduction conv: 1e-5 in HF and in NVlabs
    # (whose mix_transformer.py builds those two with nn.LayerNorm's default).
    embedding_layer_norm_eps: float = HF_LAYER_NORM_EPS
    # Class names; excluded from hashing/equality so the config stays a valid static module field.
    id2label: Mapping[int, str] | None = dataclasses.field(default=None, compare=False, hash=False)
    # How the 3x3 depthwise conv of Mix-FFN is computed: same function, different speed.
    depthwise_conv_impl: str = "auto"
    # How the decode head fuses the four stages: concat-then-1x1, per-stage 1x1 then sum (fused), or
    # fused in column-phase pixel order (phased); auto: phased for inference on CPU, else fused.
    decode_head_impl: str = "auto"
    # Each stage's blocks as one `lax.scan` (parameters stacked on the fly, tree unchanged): the
    # compiled program holds one block per stage, so compile time no longer grows with depth.
    scan_blocks: bool = False
    # Recompute each block's activations in the backward pass instead of keeping them: less training
    # memory for large crops, at the cost of about one more encoder forward.
    remat_blocks: bool = False

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.id2label is not None:
            object.__setattr__(self, "id2label", {int(k): str(v) for k, v in self.id2label.items()})
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        n = self.num_encoder_blocks
        for name in _TUPLE_FIELDS:
            if len(getattr(self, name)) != n:
                problems.append(f"{name} has {len(getattr(self, name))} entries, num_encoder_blocks={n}")
        if not problems:
            for i, (c, h) in enumerate(zip(self.hidden_sizes, self.num_attention_heads)):
                if c % h:
                    problems.append(f"stage {i}: hidden size {c} is not divisible by {h} heads")
        if self.hidden_act not in ("gelu",):
            problems.append(f"hidden_act={self.hidden_act!r}: only 'gelu' (exact) is supported")
        if self.num_labels < 1:
            problems.append(f"num_labels={self.num_labels} must be >= 1")
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            problems.append(f"id2label has {len(self.id2label)} names but num_labels={self.num_labels}")
        for name, choices in _IMPL_CHOICES.items():
            if getattr(self, name) not in choices:
                problems.append(f"{name}={getattr(self, name)!r}; choose one of {choices}")
        if problems:
            raise ConfigError("invalid SegformerConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived
    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Stochastic depth per block, increasing linearly from 0 to drop_path_rate over all blocks."""
        total = sum(self.depths)
        return tuple(self.drop_path_rate * i / max(total - 1, 1) for i in range(total))

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.resolved_id2label.items()}

    @property
    def resolved_id2label(self) -> dict[int, str]:
        return dict(self.id2label) if self.id2label else {i: f"LABEL_{i}" for i in range(self.num_labels)}

    def replace(self, **changes) -> SegformerConfig:
        if "num_labels" in changes and "id2label" not in changes and self.id2label is not None:
            changes["id2label"] = None  # old names no longer describe the new classes
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, variant: str, **overrides) -> SegformerConfig:
        """The published b0..b5 architecture, e.g. `SegformerConfig.preset("b2", num_labels=19)`."""
        key = variant.lower().removeprefix("mit-").removeprefix("segformer-")
        if key not in VARIANTS:
            raise ConfigError(f"unknown SegFormer variant {variant!r}; choose one of {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[key], **overrides})

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> SegformerConfig:
        model_type = d.get("model_type")
        if model_type != "segformer":
            raise ConfigError(
                f"{source} is not a SegFormer config (model_type={model_type!r}, expected 'segformer'); "
                "point at the directory of a SegformerForSemanticSegmentation / SegformerModel checkpoint"
            )
        kwargs = {k: d[k] for k in _HF_FIELDS if k in d}
        id2label = d.get("id2label")
        if id2label:
            kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            kwargs["num_labels"] = len(id2label)
        elif "num_labels" in d:
            kwargs["num_labels"] = int(d["num_labels"])
        extra = d.get("segformer_jax", {})  # our own fields, written by save_pretrained(format="flax")
        for k in ("layer_norm_eps", "embedding_layer_norm_eps", "depthwise_conv_impl", "decode_head_impl"):
            if k in extra:
                kwargs[k] = extra[k]
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self, architecture: str = "SegformerForSemanticSegmentation") -> dict[str, Any]:
        d: dict[str, Any] = {"architectures": [architecture], "model_type": "segformer"}
        for k in _HF_FIELDS:
            v = getattr(self, k)
            d[k] = list(v) if isinstance(v, tuple) else v
        id2label = self.resolved_id2label
        d["id2label"] = {str(k): v for k, v in id2label.items()}
        d["label2id"] = {v: k for k, v in id2label.items()}
        # HF ignores layer_norm_eps in its modules; record it for readers that do use it.
        d["layer_norm_eps"] = self.layer_norm_eps
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SegformerConfig:
        path = os.fspath(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); is it a SegFormer config.json?") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} does not hold a JSON object; is it a SegFormer config.json?")
        return cls.from_hf_dict(d, source=path)

    def to_json_string(self, architecture: str = "SegformerForSemanticSegmentation", *, with_impl: bool = False) -> str:
        d = self.to_hf_dict(architecture)
        if with_impl:
            d["segformer_jax"] = {
                "layer_norm_eps": self.layer_norm_eps,
                "embedding_layer_norm_eps": self.embedding_layer_norm_eps,
                "depthwise_conv_impl": self.depthwise_conv_impl,
                "decode_head_impl": self.decode_head_impl,
            }
        return json.dumps(d, indent=2, sort_keys=True) + "\n"
