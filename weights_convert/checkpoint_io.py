"""Reading and writing checkpoint files: safetensors without torch; .bin/.pth only through
`torch.load(weights_only=True)` (never unpickling arbitrary objects)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

SAFETENSORS_NAMES = ("model.safetensors",)
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAMES = ("pytorch_model.bin",)
TORCH_INDEX = "pytorch_model.bin.index.json"


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read (absent, corrupt, wrong kind)."""


def find_weights_file(directory: str) -> str:
    """The weights file of an HF model directory (safetensors preferred, like transformers)."""
    for name in SAFETENSORS_NAMES + (SAFETENSORS_INDEX,) + TORCH_NAMES + (TORCH_INDEX,):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    present = sorted(os.listdir(directory))
    raise CheckpointFileError(
        f"no weights in {directory}: expected one of model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin "
        f"(found: {', '.join(present) or 'nothing'})"
    )


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A .safetensors / .bin / .pth file (or a sharded *.index.json) -> {key: numpy array}."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.endswith(".index.json"):
        return _load_sharded(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    if path.endswith((".bin", ".pth", ".pt", ".ckpt")):
        return _load_torch(path)
    raise CheckpointFileError(f"{path}: unknown checkpoint file type; expected .safetensors, .bin or .pth")


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointFileError(f"{index_path} is not a valid sharded-checkpoint index ({e})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_state_dict(os.path.join(os.path.dirname(index_path), shard)))
    return state


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointFileError(
            f"{path} is not a readable safetensors file ({e}); re-download or re-export it"
        ) from None


def _load_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(
            f"{path} is a PyTorch pickle; reading it needs torch: "
            "pip install 'segformer-jax[convert]' (or use model.safetensors)"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / unsafe files
        raise CheckpointFileError(f"{path} could not be read with torch.load(weights_only=True): {e}") from None
    # mmseg / NVlabs files nest the weights under 'state_dict' (or 'model').
    for nest in ("state_dict", "model"):
        if isinstance(obj, Mapping) and nest in obj and isinstance(obj[nest], Mapping):
            obj = obj[nest]
    if not isinstance(obj, Mapping):
        raise CheckpointFileError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def save_safetensors(state: Mapping[str, np.ndarray], path: str) -> None:
    from safetensors.numpy import save_file

    # transformers refuses safetensors files without a known 'format' in the metadata.
    save_file({k: np.asarray(v, order="C") for k, v in state.items()}, path, metadata={"format": "pt"})
