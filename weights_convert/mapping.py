"""The key table between PyTorch SegFormer checkpoints and the Flax variable tree.

Canonical source names are the Hugging Face hub names (transformers 4 layout, also what
transformers 5 `save_pretrained` writes). Other layouts are first renamed to these:
transformers-5 in-memory names (`model.state_dict()`), encoder-only `SegformerModel` checkpoints
(no `segformer.` prefix) and, through `SOURCE_NORMALIZERS`, further formats such as NVlabs/mmseg.

Every row: (HF module name, Flax module path, kind). `{i}` is a stage, `{j}` a block in the stage.
The kind says which tensors the module has and how each is laid out in torch vs Flax.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

_BLOCK = "segformer.encoder.block.{i}.{j}"
_FBLOCK = "segformer/encoder/block_{i}_{j}"

MODULE_TABLE: tuple[tuple[str, str, str], ...] = (
    # encoder: overlap patch embeddings
    ("segformer.encoder.patch_embeddings.{i}.proj", "segformer/encoder/patch_embeddings_{i}/proj", "conv"),
    (
        "segformer.encoder.patch_embeddings.{i}.layer_norm",
        "segformer/encoder/patch_embeddings_{i}/layer_norm",
        "layer_norm",
    ),
    # encoder: transformer blocks
    (f"{_BLOCK}.layer_norm_1", f"{_FBLOCK}/layer_norm_1", "layer_norm"),
    (f"{_BLOCK}.attention.self.query", f"{_FBLOCK}/attention/self/query", "linear"),
    (f"{_BLOCK}.attention.self.key", f"{_FBLOCK}/attention/self/key", "linear"),
    (f"{_BLOCK}.attention.self.value", f"{_FBLOCK}/attention/self/value", "linear"),
    (f"{_BLOCK}.attention.self.sr", f"{_FBLOCK}/attention/self/sr", "conv"),
    (f"{_BLOCK}.attention.self.layer_norm", f"{_FBLOCK}/attention/self/layer_norm", "layer_norm"),
    (f"{_BLOCK}.attention.output.dense", f"{_FBLOCK}/attention/output/dense", "linear"),
    (f"{_BLOCK}.layer_norm_2", f"{_FBLOCK}/layer_norm_2", "layer_norm"),
    (f"{_BLOCK}.mlp.dense1", f"{_FBLOCK}/mlp/dense1", "linear"),
    (f"{_BLOCK}.mlp.dwconv.dwconv", f"{_FBLOCK}/mlp/dwconv/dwconv", "conv"),
    (f"{_BLOCK}.mlp.dense2", f"{_FBLOCK}/mlp/dense2", "linear"),
    # encoder: per-stage norm
    ("segformer.encoder.layer_norm.{i}", "segformer/encoder/layer_norm_{i}", "layer_norm"),
    # all-MLP decode head
    ("decode_head.linear_c.{i}.proj", "decode_head/linear_c_{i}/proj", "linear"),
    ("decode_head.linear_fuse", "decode_head/linear_fuse", "conv"),
    ("decode_head.batch_norm", "decode_head/batch_norm", "batch_norm"),
    ("decode_head.classifier", "decode_head/classifier", "conv"),
    # ImageNet classification head (nvidia/mit-bX)
    ("classifier", "classifier", "linear"),
)

# Per kind: torch tensor name -> (Flax collection, Flax leaf name, layout).
KIND_TENSORS: dict[str, dict[str, tuple[str, str, str]]] = {
    "linear": {"weight": ("params", "kernel", "linear"), "bias": ("params", "bias", "same")},
    "conv": {"weight": ("params", "kernel", "conv"), "bias": ("params", "bias", "same")},
    "layer_norm": {"weight": ("params", "scale", "same"), "bias": ("params", "bias", "same")},
    "batch_norm": {
        "weight": ("params", "scale", "same"),
        "bias": ("params", "bias", "same"),
        "running_mean": ("batch_stats", "mean", "same"),
        "running_var": ("batch_stats", "var", "same"),
        "num_batches_tracked": ("batch_stats", "num_batches_tracked", "count"),
    },
}

# transformers 5 renamed modules in memory (`model.state_dict()`); hub files keep the v4 names.
# (v5 regex, v4 replacement), applied in order.
V5_TO_V4_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(segformer\.)?stages\.(\d+)\.patch_embeddings\.", r"\1encoder.patch_embeddings.\2."),
    (r"^(segformer\.)?stages\.(\d+)\.blocks\.(\d+)\.", r"\1encoder.block.\2.\3."),
    (r"^(segformer\.)?stages\.(\d+)\.layer_norm\.", r"\1encoder.layer_norm.\2."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"^decode_head\.linear_projections\.", "decode_head.linear_c."),
)


def _template_regex(template: str, sep: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile("^" + pattern + re.escape(sep) + r"(?P<tensor>[a-z_]+)$")


_HF_ROWS = [(_template_regex(hf, "."), flax, kind) for hf, flax, kind in MODULE_TABLE]
_FLAX_ROWS = [(_template_regex(flax, "/"), hf, kind) for hf, flax, kind in MODULE_TABLE]


def hf_key_to_flax(key: str) -> tuple[str, str, str] | None:
    """'segformer.encoder.block.0.1.mlp.dense1.weight' -> ('params', 'segformer/.../dense1/kernel', 'linear').
    None if the key is not a SegFormer tensor."""
    for regex, flax_template, kind in _HF_ROWS:
        m = regex.match(key)
        if m is None:
            continue
        spec = KIND_TENSORS[kind].get(m.group("tensor"))
        if spec is None:
            return None
        collection, leaf, layout = spec
        module = flax_template.format(i=m.groupdict().get("i"), j=m.groupdict().get("j"))
        return collection, f"{module}/{leaf}", layout
    return None


def flax_path_to_hf(collection: str, path: str) -> tuple[str, str] | None:
    """Inverse of `hf_key_to_flax`: ('params', '.../dense1/kernel') -> ('...mlp.dense1.weight', 'linear')."""
    module, _, leaf = path.rpartition("/")
    for regex, hf_template, kind in _FLAX_ROWS:
        m = regex.match(f"{module}/{leaf}")
        if m is None:
            continue
        for tensor, (coll, flax_leaf, layout) in KIND_TENSORS[kind].items():
            if coll == collection and flax_leaf == leaf:
                name = hf_template.format(i=m.groupdict().get("i"), j=m.groupdict().get("j"))
                return f"{name}.{tensor}", layout
    return None


# ---------------------------------------------------------------------------------- layouts
def torch_to_flax_tensor(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":  # (out, in) -> (in, out)
        return np.asarray(x.T, order="C")
    if layout == "conv":  # (out, in/groups, kh, kw) -> (kh, kw, in/groups, out)
        return np.asarray(x.transpose(2, 3, 1, 0), order="C")
    if layout == "count":  # torch int64 counter -> int32 (jax default)
        return np.asarray(x, np.int32)
    return np.asarray(x)


def flax_to_torch_tensor(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        x = x.T
    elif layout == "conv":
        x = x.transpose(3, 2, 0, 1)
    elif layout == "count":
        x = x.astype(np.int64)
    return np.asarray(x, order="C")  # not ascontiguousarray: it turns 0-d counters into shape (1,)


def expected_torch_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return tuple(reversed(flax_shape))
    if layout == "conv":
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return tuple(flax_shape)


# ---------------------------------------------------------------------------------- source formats
def is_v5_layout(keys) -> bool:
    return any(re.search(r"(^|\.)stages\.\d+\.|\.q_proj\.|linear_projections", k) for k in keys)


def rename_v5_to_v4(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        for pattern, repl in V5_TO_V4_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def normalize_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Any HF layout (hub v4, transformers-5 in-memory, SegformerModel without prefix) -> hub v4 names."""
    state = rename_v5_to_v4(state) if is_v5_layout(state) else dict(state)
    # A bare SegformerModel checkpoint has no `segformer.` prefix.
    return {("segformer." + k if k.startswith("encoder.") else k): v for k, v in state.items()}


# Format name -> function renaming (and, where needed, reshaping) a state dict into hub v4 names.
# NVlabs/mmseg originals register here (their attn.kv must be split into key and value).
SOURCE_NORMALIZERS: dict[str, Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "hf": normalize_hf,
}


def detect_format(keys) -> str:
    keys = list(keys)
    for name, detector in FORMAT_DETECTORS.items():
        if detector(keys):
            return name
    return "hf"


# Format name -> predicate on the key list; checked before falling back to "hf".
FORMAT_DETECTORS: dict[str, Callable[[list[str]], bool]] = {}
