"""PyTorch state dict <-> Flax variables, pure dict -> dict and loud.

Every source tensor must be used, every target leaf filled and every shape must agree; otherwise
`ConversionError` lists all the offending keys at once (not just the first)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from weights_convert import mapping


class ConversionError(ValueError):
    """A checkpoint that does not fit the target model: missing, unused or mis-shaped tensors."""


def flatten_variables(variables: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
    """{'params': {...}, 'batch_stats': {...}} -> {(collection, 'a/b/c'): leaf}."""
    flat = {}
    for collection, tree in variables.items():
        for path, leaf in traverse_util.flatten_dict(dict(tree), sep="/").items():
            flat[(collection, path)] = leaf
    return flat


def unflatten_variables(flat: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
    by_collection: dict[str, dict[str, Any]] = {}
    for (collection, path), leaf in flat.items():
        by_collection.setdefault(collection, {})[path] = leaf
    return {c: traverse_util.unflatten_dict(d, sep="/") for c, d in by_collection.items()}


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def _fmt(items, limit: int = 40) -> str:
    items = sorted(items)
    shown = "\n    ".join(str(x) for x in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


_FLAX_BASE_PREFIX, _HF_BASE_PREFIX = "segformer/", "segformer."  # HF's base_model_prefix


def _as_task_model_paths(flat: dict[tuple[str, str], Any]) -> tuple[dict[tuple[str, str], Any], str]:
    """A standalone `SegformerModel` names its variables `encoder/...`; the key table names the encoder
    as it sits inside the task models, `segformer/encoder/...`. -> (flat variables under the key
    table's names, the prefix added: '' for the task models)."""
    if flat and all(p.startswith("encoder/") for _, p in flat):
        return {(c, _FLAX_BASE_PREFIX + p): v for (c, p), v in flat.items()}, _FLAX_BASE_PREFIX
    return flat, ""


def torch_state_to_flax(
    state: Mapping[str, np.ndarray],
    target_shapes: Mapping[str, Any],
    *,
    source_format: str | None = None,
    skip_targets: Iterable[str] = (),
    ignore_unused: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Convert a PyTorch SegFormer state dict into Flax variables shaped like `target_shapes`.

    target_shapes: the model's variables or their `jax.eval_shape` (anything with `.shape`).
    source_format: 'hf' (hub v4 / transformers-5 / SegformerModel names) or a registered format;
        detected from the keys when None.
    skip_targets: regexes on Flax paths ('params/decode_head/classifier/...') that are NOT taken from
        the checkpoint (to be re-initialised); source tensors for them are then ignored.
    ignore_unused: regexes on source (hub v4) keys allowed to be left unused, e.g. an ImageNet
        classifier when building a segmentation model.
    allow_missing: regexes on Flax paths allowed to be absent from the checkpoint.

    Returns (variables with the filled leaves, report) where report lists 'skipped', 'missing'
    (allowed ones) and 'unused' (ignored ones). Raises ConversionError listing every problem.
    """
    source_format = source_format or mapping.detect_format(state.keys())
    if source_format not in mapping.SOURCE_NORMALIZERS:
        raise ConversionError(
            f"unknown checkpoint format {source_format!r}; known: {sorted(mapping.SOURCE_NORMALIZERS)}"
        )
    state = mapping.SOURCE_NORMALIZERS[source_format](state)
    targets, prefix = _as_task_model_paths(flatten_variables(target_shapes))
    target_names = {f"{c}/{p[len(prefix) :]}": (c, p) for c, p in targets}  # the names the caller uses
    name_of = {t: n for n, t in target_names.items()}

    filled: dict[tuple[str, str], np.ndarray] = {}
    unused, ignored, shape_errors, skipped_sources = [], [], [], []
    misshaped: set[tuple[str, str]] = set()
    for key, value in state.items():
        hit = mapping.hf_key_to_flax(key)
        target = (hit[0], hit[1]) if hit else None
        if target is None or target not in targets:
            (ignored if _matches(key, ignore_unused) else unused).append(key)
            continue
        if _matches(name_of[target], skip_targets):
            skipped_sources.append(key)
            continue
        value = np.asarray(value)
        layout = hit[2]
        want = tuple(targets[target].shape)
        if tuple(value.shape) != mapping.expected_torch_shape(want, layout):
            shape_errors.append(
                f"{key}: checkpoint {tuple(value.shape)}, model expects "
                f"{mapping.expected_torch_shape(want, layout)} (Flax {name_of[target]} {want})"
            )
            misshaped.add(target)
            continue
        filled[target] = mapping.torch_to_flax_tensor(value, layout)

    skipped = [n for n, t in target_names.items() if _matches(n, skip_targets)]
    absent = [n for n, t in target_names.items() if t not in filled and t not in misshaped and n not in skipped]
    missing = [n for n in absent if not _matches(n, allow_missing)]
    allowed_missing = [n for n in absent if _matches(n, allow_missing)]

    problems = []
    if shape_errors:
        problems.append(
            f"{len(shape_errors)} tensor(s) with the wrong shape (is the config the checkpoint's?):"
            + _fmt(shape_errors)
        )
    if missing:
        problems.append(f"{len(missing)} model variable(s) missing from the checkpoint:" + _fmt(missing))
    if unused:
        problems.append(f"{len(unused)} checkpoint tensor(s) not used by the model:" + _fmt(unused))
    if problems:
        raise ConversionError(
            "checkpoint does not match the SegFormer model:\n- "
            + "\n- ".join(problems)
            + "\nTo re-initialise parts on purpose (e.g. a new head), use from_pretrained(..., "
            "num_labels=...) or reinit=[regex]; see `python -m weights_convert --help`."
        )
    report = {
        "skipped": sorted(skipped),
        "missing": sorted(allowed_missing),
        "unused": sorted(ignored + skipped_sources),
    }
    return unflatten_variables({(c, p[len(prefix) :]): v for (c, p), v in filled.items()}), report


def flax_to_torch_state(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> PyTorch state dict with hub (transformers 4) key names, which transformers 4
    and 5 `from_pretrained` both read. Every Flax leaf must map to a key."""
    flat, prefix = _as_task_model_paths(flatten_variables(variables))
    state, unknown = {}, []
    for (collection, path), leaf in flat.items():
        hit = mapping.flax_path_to_hf(collection, path)
        if hit is None:
            unknown.append(f"{collection}/{path[len(prefix) :]}")
            continue
        key, layout = hit
        state[key] = mapping.flax_to_torch_tensor(np.asarray(leaf), layout)
    if unknown:
        raise ConversionError(f"{len(unknown)} Flax variable(s) have no PyTorch name:" + _fmt(unknown))
    if prefix:  # transformers' SegformerModel writes its own tensors without the `segformer.` prefix
        state = {k.removeprefix(_HF_BASE_PREFIX): v for k, v in state.items()}
    return state
