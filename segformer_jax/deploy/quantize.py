"""Post-training int8 weight-only quantization of a SegFormer, and its checkpoint format.

Every `kernel` (Dense, Conv, depthwise conv; ~99% of the parameters) is stored as int8 with one
float32 scale per output channel (symmetric, round to nearest: w ~= q * scale, q in [-127, 127],
scale = max|w| / 127 over the other axes). Biases, LayerNorm/BatchNorm parameters and statistics stay
float32. Weights are dequantized inside the jitted function (`quantized_apply`), so int8 is what is
held in memory and on disk (~4x smaller); the arithmetic stays float32.

    qvars = quantize_variables(variables)
    save_quantized(model, qvars, "b0-int8")                 # config.json + model-int8.safetensors
    model, qvars = load_quantized("b0-int8")
    logits = jax.jit(quantized_apply(model))(qvars, images)
    model, variables = load_quantized("b0-int8", dequantize=True)   # plain float32 variables

`from_pretrained` refuses these directories with a message pointing here (the float32 weights are
not in them); `python -m segformer_jax.predict --model b0-int8` loads them directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segformer_jax.pretrained import (  # the file format's name, known to from_pretrained
    QUANTIZED_FORMAT as FORMAT,
)
from segformer_jax.pretrained import (
    QUANTIZED_WEIGHTS_NAME,
    QuantizedCheckpointError,
    _check_fits,
)
from segformer_jax.pretrained import (
    _quantized_weights_file as _weights_file,
)
from segformer_jax.pretrained import (
    is_quantized as is_quantized,  # part of this module's API
)

_SCALE_SUFFIX = ".__scale__"


def _is_qleaf(x) -> bool:
    return isinstance(x, Mapping) and set(x) == {"q", "scale"}


def quantize_array(w: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric per-output-channel (last axis) int8: {'q': int8 like w, 'scale': float32 (out,)}."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return {"q": q, "scale": scale}


def quantize_variables(variables: Mapping[str, Any], *, min_size: int = 0) -> dict[str, Any]:
    """float32 variables -> same tree with every params `kernel` (of >= min_size elements) replaced
    by {'q': int8, 'scale': float32}."""

    def walk(tree, collection):
        out = {}
        for k, v in tree.items():
            if isinstance(v, Mapping):
                out[k] = walk(v, collection)
            elif collection == "params" and k == "kernel" and np.ndim(v) >= 2 and np.size(v) >= min_size:
                out[k] = quantize_array(np.asarray(v))
            else:
                out[k] = np.asarray(v)
        return out

    return {c: walk(t, c) for c, t in variables.items() if c in ("params", "batch_stats")}


def dequantize_variables(qvariables: Mapping[str, Any], dtype=jnp.float32) -> dict[str, Any]:
    """Inverse (up to rounding) of quantize_variables; jit-friendly (jnp)."""

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if _is_qleaf(v):
                out[k] = jnp.asarray(v["q"]).astype(dtype) * jnp.asarray(v["scale"], dtype)
            elif isinstance(v, Mapping):
                out[k] = walk(v)
            else:
                out[k] = v
        return out

    return {c: walk(t) for c, t in qvariables.items()}


def quantized_apply(model):
    """`fn(qvariables, images, **kw)`: model.apply on weights dequantized inside the (caller's) jit."""

    def apply(qvariables, images, **kwargs):
        return model.apply(dequantize_variables(qvariables), images, **kwargs)

    return apply


# ------------------------------------------------------------------------------------ files
def _flatten(qvariables) -> dict[str, np.ndarray]:
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            name = f"{prefix}/{k}" if prefix else k
            if _is_qleaf(v):
                flat[name] = np.asarray(v["q"], np.int8)
                flat[name + _SCALE_SUFFIX] = np.asarray(v["scale"], np.float32)
            elif isinstance(v, Mapping):
                walk(v, name)
            else:
                flat[name] = np.asarray(v)

    walk(qvariables, "")
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        if name.endswith(_SCALE_SUFFIX):
            continue
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        scale = flat.get(name + _SCALE_SUFFIX)
        node[leaf] = {"q": value, "scale": scale} if scale is not None else value
    return tree


def save_quantized(model, qvariables: Mapping[str, Any], out_dir: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write config.json + model-int8.safetensors atomically (staging folder renamed into place).
    `qvariables` from quantize_variables (float32 variables are quantized first)."""
    from safetensors.numpy import save_file

    from segformer_jax.models.model import architecture_name

    flat_in = jax.tree_util.tree_leaves(qvariables, is_leaf=_is_qleaf)
    if not any(_is_qleaf(x) for x in flat_in):
        qvariables = quantize_variables(qvariables)
    from segformer_jax.fileio import atomic_directory

    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        info = {"format": FORMAT, "scheme": "symmetric per-output-channel int8, kernels only"}
        save_file(
            _flatten(jax.device_get(qvariables)),
            os.path.join(staging, QUANTIZED_WEIGHTS_NAME),
            metadata={"format": FORMAT, "quantization": json.dumps(info)},
        )
        config = json.loads(model.config.to_json_string(architecture_name(model), with_impl=True))
        config["segformer_jax"]["quantization"] = info
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    return os.path.abspath(os.fspath(out_dir))


def load_quantized(path: str | os.PathLike, *, dequantize: bool = False, config=None, dtype="float32"):
    """-> (model, qvariables) (int8 kernels; apply with quantized_apply), or with dequantize=True
    (model, float32 variables) for code that wants plain variables."""
    from safetensors.numpy import load_file

    from segformer_jax.models.config import SegformerConfig
    from segformer_jax.models.model import ARCHITECTURES

    path = os.fspath(path)
    weights = _weights_file(path)
    if weights is None:
        raise QuantizedCheckpointError(
            f"{path} is not an int8 checkpoint written by save_quantized "
            f"(no {QUANTIZED_WEIGHTS_NAME} with format {FORMAT!r}); for float32 "
            "checkpoints use segformer_jax.from_pretrained"
        )
    arch = "SegformerForSemanticSegmentation"
    if config is None:
        config_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
        config = SegformerConfig.from_json_file(config_path)
        with open(config_path) as f:
            arch = (json.load(f).get("architectures") or [arch])[0]
    from segformer_jax.models.kernels import compute_dtype

    model = ARCHITECTURES[arch](config, dtype=compute_dtype(dtype))
    qvariables = _unflatten(load_file(weights))
    try:
        _check_fits(model, _shapes_of(qvariables))
    except ValueError as e:
        raise QuantizedCheckpointError(f"{weights}: {e}") from None
    if dequantize:
        return model, jax.tree_util.tree_map(np.asarray, dequantize_variables(qvariables))
    return model, qvariables


def _shapes_of(qvariables):
    """Shapes of the dequantized tree, without computing it."""

    def walk(tree):
        return {
            k: jax.ShapeDtypeStruct(v["q"].shape, jnp.float32)
            if _is_qleaf(v)
            else walk(v)
            if isinstance(v, Mapping)
            else v
            for k, v in tree.items()
        }

    return walk(qvariables)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path` (a directory or a file)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
