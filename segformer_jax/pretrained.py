"""`from_pretrained` / `save_pretrained`: Hugging Face directories and our own Orbax format.

model, variables = from_pretrained("path/to/hf_or_flax_dir")
save_pretrained(model, variables, "out", format="hf")    # transformers can load it
save_pretrained(model, variables, "out", format="flax")  # Orbax + config.json
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segformer_jax.fileio import atomic_directory
from segformer_jax.models.config import HF_LAYER_NORM_EPS, ConfigError, SegformerConfig
from segformer_jax.models.kernels import compute_dtype, weights_for_compute
from segformer_jax.models.model import ARCHITECTURES, architecture_name
from segformer_jax.xla_options import init_compiler_options

logger = logging.getLogger("segformer_jax")

FLAX_WEIGHTS_DIR = "flax_variables"  # Orbax checkpoint inside a directory saved with format="flax"
CONFIG_NAME = "config.json"
# transformers' SegformerImageProcessor settings beside config.json (resize, normalisation, labels)
PREPROCESSOR_NAME = "preprocessor_config.json"
# A train.py workdir: checkpoints/<step>/ while training, the exported model in final/ at the end.
WORKDIR_CHECKPOINTS, WORKDIR_FINAL = "checkpoints", "final"
# The int8 weight-only checkpoints of segformer_jax.deploy.quantize: recognised here, to refuse them.
QUANTIZED_WEIGHTS_NAME = "model-int8.safetensors"
QUANTIZED_FORMAT = "segformer_jax-int8-weight-only"
_INIT_SIZE = 64  # image side used to trace shapes / initialise fresh parts


class QuantizedCheckpointError(ValueError):
    """An int8 checkpoint given to code that expects float32 weights (or a damaged one)."""


def _quantized_weights_file(path: str) -> str | None:
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, QUANTIZED_WEIGHTS_NAME)
        return candidate if os.path.isfile(candidate) else None
    if os.path.isfile(path) and path.endswith(".safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception:
            return None
        return path if meta.get("format") == QUANTIZED_FORMAT else None
    return None


def is_quantized(path: str | os.PathLike) -> bool:
    """True for a directory written by save_quantized (or its weights file)."""
    return _quantized_weights_file(os.fspath(path)) is not None


def init_variables(model, rng: int | jax.Array = 0, image_shape: tuple[int, int] = (_INIT_SIZE, _INIT_SIZE)):
    """Freshly initialised variables (HF's initialisation scheme), the same values as `model.init`.

    Compiled at XLA optimisation level 0 on CPU: the init graph (one threefry stream per
    parameter, the forward pass dead) is cheap to run but took XLA:CPU's optimiser 3x longer."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    images = jnp.zeros((1, *image_shape, model.config.num_channels), jnp.float32)
    return jax.jit(model.init).lower(rng, images).compile(compiler_options=init_compiler_options())(rng, images)


def variable_shapes(model) -> dict[str, Any]:
    images = jax.ShapeDtypeStruct((1, _INIT_SIZE, _INIT_SIZE, model.config.num_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


# ------------------------------------------------------------------------------------ Hugging Face Hub
class HubError(FileNotFoundError):
    """A Hub id that could not be resolved to a local snapshot (not found, gated, offline and not cached)."""


# What from_pretrained reads from a Hub repo: config.json, then the safetensors weights, and
# pytorch_model.bin only when the repo has no safetensors (never both, never the rest of the repo).
HUB_CONFIG_PATTERNS = [CONFIG_NAME, PREPROCESSOR_NAME]  # the preprocessing sets predict's defaults
HUB_SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
HUB_TORCH_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_id(source: str) -> bool:
    """'org/name' or 'name' (not an existing path, no path syntax, no weights-file extension)."""
    return (
        bool(_REPO_ID.match(source))
        and ".." not in source
        and not source.endswith((".safetensors", ".bin", ".pth", ".pt", ".json", ".ckpt"))
    )


def _hub_offline(local_files_only: bool) -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return local_files_only or constants.HF_HUB_OFFLINE or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_source(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> str:
    """A local path (always wins) or a Hugging Face Hub id -> a local directory / file.

    Ids go through huggingface_hub.snapshot_download into the standard HF cache (or cache_dir):
    config.json first (refused unless it describes a SegFormer), then model.safetensors (or its
    shards), then pytorch_model.bin only if the repo has no safetensors. Offline
    (local_files_only=True or HF_HUB_OFFLINE=1) only the cache is read."""
    source = os.fspath(source)
    if os.path.exists(source):
        return source
    if not looks_like_hub_id(source):
        raise FileNotFoundError(
            f"{source} does not exist: give a Hugging Face model directory (config.json + "
            "model.safetensors / pytorch_model.bin), one written by save_pretrained, or a Hub id such as "
            "nvidia/segformer-b0-finetuned-ade-512-512"
        )
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ImportError(
            f"{source} is not a local path, and loading Hub ids needs huggingface_hub: pip install huggingface_hub "
            "(a core dependency of segformer-jax; reinstall it with pip install -e .)"
        ) from None
    offline = _hub_offline(local_files_only)
    searched = os.path.abspath(os.fspath(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE))
    where = f"{source}" + (f" (revision {revision})" if revision else "")

    def download(patterns):
        return huggingface_hub.snapshot_download(
            source,
            revision=revision,
            cache_dir=searched,
            token=token,
            local_files_only=offline,
            allow_patterns=patterns,
        )

    try:
        if offline:  # one look-up: the cached snapshot, whatever it holds
            snapshot = download(HUB_CONFIG_PATTERNS + HUB_SAFETENSORS_PATTERNS + HUB_TORCH_PATTERNS)
        else:
            snapshot = download(HUB_CONFIG_PATTERNS)
    except errors.GatedRepoError:
        raise HubError(
            f"{where} is a gated repository: accept its terms on https://huggingface.co/{source} and pass "
            "token=... (or set HF_TOKEN / run `hf auth login`)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{where}: no such model on the Hugging Face Hub (or it is private: pass token=... / set HF_TOKEN), "
            f"and no local path {os.path.abspath(source)} exists"
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{source}: the Hub repository has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError as e:
        reason = (
            "offline (" + ("local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1") + ")"
            if offline
            else "the Hub could not be reached"
        )
        raise HubError(
            f"{where} is not a local path and is not in the Hugging Face cache {searched} ({reason}); "
            f"download it once with network access (e.g. hf download {source} config.json model.safetensors"
            + (f" --cache-dir {searched}" if cache_dir else "")
            + "), or pass cache_dir= / set HF_HUB_CACHE to the cache that holds it"
            + (f" [{e}]" if type(e).__name__ == "IncompleteSnapshotError" else "")
        ) from None
    except errors.HFValidationError as e:
        raise FileNotFoundError(f"{source} is neither a local path nor a valid Hub id ({e})") from None

    config_path = os.path.join(snapshot, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{where} (Hub snapshot {snapshot}) has no {CONFIG_NAME}: it is not a SegFormer model")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{config_path} is not a readable config.json ({e})") from None
    if model_type != "segformer":
        raise ConfigError(
            f"{where} is not a SegFormer: its config.json says model_type {model_type!r} (expected 'segformer')"
        )
    if offline:
        return snapshot
    snapshot = download(HUB_SAFETENSORS_PATTERNS)
    if not any(n.endswith(".safetensors") for n in os.listdir(snapshot)):
        snapshot = download(HUB_TORCH_PATTERNS)
    return snapshot


def _read_source(path: str, config: SegformerConfig | None):
    """-> (config, source architecture, torch-style state dict, source format or None)."""
    from weights_convert import checkpoint_io
    from weights_convert.convert import flax_to_torch_state

    if is_quantized(path):
        raise QuantizedCheckpointError(
            f"{path} is an int8 weight-only quantized checkpoint ({QUANTIZED_WEIGHTS_NAME}); it has no "
            "float32 weights. Load it with segformer_jax.deploy.quantize.load_quantized(path) (int8, apply with "
            "quantize.quantized_apply(model)) or load_quantized(path, dequantize=True) for float32 variables; "
            "`python -m segformer_jax.predict --model` takes it directly."
        )
    if os.path.isdir(os.path.join(path, WORKDIR_CHECKPOINTS)) and not os.path.isdir(
        os.path.join(path, FLAX_WEIGHTS_DIR)
    ):
        final = os.path.join(path, WORKDIR_FINAL)
        raise ConfigError(
            f"{path} is a train.py workdir, not a model directory: "
            + (
                f"its trained model is {final}"
                if os.path.isdir(final)
                else "it has no final model yet (rerun train.py with the same --workdir to finish training)"
            )
            + f"; to score a checkpoint: python -m segformer_jax.evaluate --checkpoint {path} --config ..."
        )
    if os.path.isfile(path):
        if os.path.basename(path) == CONFIG_NAME:
            raise ConfigError(
                f"{path} is the config file; give the directory that holds it and the weights: "
                f"{os.path.dirname(path) or '.'}"
            )
        if config is None:
            raise ConfigError(
                f"{path} is a bare weights file: pass config=SegformerConfig(...) (or a preset), "
                "or give the directory that holds it with its config.json"
            )
        return config, None, checkpoint_io.load_state_dict(path)
    config_path = os.path.join(path, CONFIG_NAME)
    if config is None:
        if not os.path.isfile(config_path):
            raise ConfigError(f"{path} has no {CONFIG_NAME}: is it a Hugging Face / segformer_jax model directory?")
        config = SegformerConfig.from_json_file(config_path)
    arch = None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            arch = (json.load(f).get("architectures") or [None])[0]
    flax_dir = os.path.join(path, FLAX_WEIGHTS_DIR)
    if os.path.isdir(flax_dir):
        try:
            tree = _process_local_checkpointer().restore(os.path.abspath(flax_dir))
        except Exception as e:  # orbax raises many types for damaged checkpoints
            raise checkpoint_io.CheckpointFileError(f"{flax_dir} is not a readable Orbax checkpoint ({e})") from None
        # One checking path for both formats: the Flax tree is named through the same key table.
        return config, arch, flax_to_torch_state(tree)
    return config, arch, checkpoint_io.load_state_dict(checkpoint_io.find_weights_file(path))


def from_pretrained(
    path: str | os.PathLike,
    *,
    architecture: str | None = None,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    reinit: Iterable[str] = (),
    config: SegformerConfig | None = None,
    dtype: Any = jnp.float32,
    seed: int = 0,
    source_format: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    cast_weights: bool = True,
    **config_overrides,
):
    """Load a SegFormer from a Hugging Face Hub id or directory (config.json + model.safetensors or
    pytorch_model.bin, hub or transformers-5 names), a directory saved by `save_pretrained`, or a
    bare weights file with `config=`. Returns (model, variables).

    architecture: 'SegformerForSemanticSegmentation' (default, also for encoder-only and ImageNet
        mit-bX checkpoints, whose decode head is then freshly initialised),
        'SegformerForImageClassification' or 'SegformerModel'.
    num_labels / id2label: a new label set; the classifier is re-initialised (and it says so).
    reinit: regexes on Flax paths ('params/decode_head/...') to re-initialise instead of loading.
    config: use this architecture instead of the directory's config.json (required for bare files).
    source_format: 'hf' or a registered format such as NVlabs originals; detected when None.
    revision / cache_dir / token / local_files_only: for a Hugging Face Hub id given as `path`
        ('nvidia/segformer-b0-finetuned-ade-512-512'; a local path of that name wins), read through
        huggingface_hub's cache (HF_HUB_OFFLINE=1 reads only the cache); see `resolve_source`.
    dtype: the compute dtype, 'float32' (default, exact) or 'bfloat16' (bfloat16 matmuls / convs with
        float32 accumulation; see `models.kernels`).
    cast_weights: with a reduced dtype, store the kernels the model would cast on every call as copies
        in that dtype (`kernels.weights_for_compute`: the same computation, faster, half their memory;
        within bfloat16 rounding of the float32-stored weights' results, not bit-identical). False
        keeps every parameter float32: master weights to fine-tune or save.
    config_overrides: other SegformerConfig fields, e.g. drop_path_rate=0.1, layer_norm_eps=1e-6.
    """
    from weights_convert.convert import torch_state_to_flax

    path = resolve_source(path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    source_config, source_arch, state = _read_source(path, config)

    changes = dict(config_overrides)
    from weights_convert import mapping

    if (source_format or mapping.detect_format(state.keys())) == "nvlabs" and "layer_norm_eps" not in changes:
        # NVlabs mit_bX were trained with LayerNorm eps 1e-6 (HF's modules use torch's 1e-5).
        from segformer_jax.models.config import NVLABS_LAYER_NORM_EPS

        changes["layer_norm_eps"] = NVLABS_LAYER_NORM_EPS
        logger.info(
            "%s: NVlabs checkpoint, using layer_norm_eps=%g (pass layer_norm_eps=... to override)",
            path,
            NVLABS_LAYER_NORM_EPS,
        )
    if id2label is not None:
        changes["id2label"] = {int(k): v for k, v in id2label.items()}
        changes["num_labels"] = len(id2label)
    if num_labels is not None:
        if id2label is not None and num_labels != len(id2label):
            raise ConfigError(f"num_labels={num_labels} but id2label has {len(id2label)} names")
        changes["num_labels"] = num_labels
    try:
        target_config = source_config.replace(**changes) if changes else source_config
    except TypeError as e:
        raise ConfigError(f"from_pretrained: {e}") from None

    architecture = architecture or "SegformerForSemanticSegmentation"
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture={architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[architecture](target_config, dtype=compute_dtype(dtype))

    has_decode_head = any(k.startswith("decode_head.") for k in state)
    has_classifier = any(k.startswith("classifier.") for k in state)
    skip, ignore_unused, allow_missing = list(reinit), [], []
    labels_changed = target_config.num_labels != source_config.num_labels
    if architecture == "SegformerForSemanticSegmentation":
        ignore_unused.append(r"^classifier\.")  # an ImageNet head has no use here
        if not has_decode_head:
            allow_missing.append(r"^(params|batch_stats)/decode_head/")
        elif labels_changed:
            skip.append(r"^params/decode_head/classifier/")
    elif architecture == "SegformerForImageClassification":
        ignore_unused.append(r"^decode_head\.")
        if not has_classifier:
            allow_missing.append(r"^params/classifier/")
        elif labels_changed:
            skip.append(r"^params/classifier/")
    else:
        ignore_unused.append(r"^(decode_head|classifier)\.")

    loaded, report = torch_state_to_flax(
        state,
        variable_shapes(model),
        source_format=source_format,
        skip_targets=skip,
        ignore_unused=ignore_unused,
        allow_missing=allow_missing,
    )
    fresh_paths = report["skipped"] + report["missing"]
    if fresh_paths:
        logger.warning(
            "%s: newly initialised (not in the checkpoint or re-initialised on request), train them "
            "before use:\n    %s",
            path,
            "\n    ".join(fresh_paths),
        )
        fresh = init_variables(model, seed)
        from weights_convert.convert import flatten_variables, unflatten_variables

        flat = flatten_variables(loaded)
        flat_fresh = flatten_variables(fresh)
        for name in fresh_paths:
            collection, _, p = name.partition("/")
            flat[(collection, p)] = flat_fresh[(collection, p)]
        loaded = unflatten_variables(flat)
    if report["unused"]:
        logger.warning(
            "%s: checkpoint tensors not used by %s:\n    %s", path, architecture, "\n    ".join(report["unused"])
        )
    variables = jax.tree_util.tree_map(jnp.asarray, loaded)
    if cast_weights:
        variables = weights_for_compute(variables, model.dtype)
    return model, variables


def _check_fits(model, variables) -> None:
    from weights_convert.convert import ConversionError, flatten_variables

    want = {k: tuple(v.shape) for k, v in flatten_variables(variable_shapes(model)).items()}
    have = {k: tuple(np.shape(v)) for k, v in flatten_variables(variables).items()}
    problems = [f"{'/'.join(k)}: missing" for k in want.keys() - have.keys()]
    problems += [f"{'/'.join(k)}: not a variable of this model" for k in have.keys() - want.keys()]
    problems += [
        f"{'/'.join(k)}: shape {have[k]}, model expects {want[k]}"
        for k in want.keys() & have.keys()
        if have[k] != want[k]
    ]
    if problems:
        raise ConversionError(
            "variables do not fit the model; nothing was written:\n    " + "\n    ".join(sorted(problems))
        )


def hf_preprocessor_config(
    size: tuple[int, int] | None = None,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    reduce_labels: bool = False,
) -> dict:
    """A `preprocessor_config.json` for transformers' SegformerImageProcessor: resize to `size` (h, w)
    (None: keep the image's size), rescale 1/255, normalise with mean / std (0..1 units)."""
    config = {
        "image_processor_type": "SegformerImageProcessor",
        "do_resize": size is not None,
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
        "do_reduce_labels": bool(reduce_labels),
    }
    if size is not None:
        config["size"] = {"height": int(size[0]), "width": int(size[1])}
    return config


def read_preprocessor_config(model_dir: str | os.PathLike) -> dict | None:
    """The directory's `preprocessor_config.json` (None when it has none)."""
    path = os.path.join(os.fspath(model_dir), PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); fix or delete it") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not an image processor config (a JSON object)")
    return config


def save_pretrained(
    model,
    variables: Mapping[str, Any],
    out_dir: str | os.PathLike,
    format: str = "flax",
    *,
    overwrite: bool = False,
    preprocessor: Mapping[str, Any] | None = None,
) -> str:
    """Write `model` + `variables` to `out_dir` atomically (all or nothing).

    format='flax': config.json + an Orbax checkpoint (`flax_variables/`), read back by from_pretrained.
    format='hf': config.json + model.safetensors with hub key names; transformers'
        `SegformerFor*.from_pretrained(out_dir)` loads it.
    preprocessor: the image processor settings to write as preprocessor_config.json (e.g.
        `read_preprocessor_config(source_dir)`, so that a model round-trips with its preprocessing).
        None: for format='hf', `hf_preprocessor_config()` (the image at its own size, ImageNet
        normalisation: what segformer_jax's predict computes by default for such a directory).
    """
    from weights_convert import checkpoint_io
    from weights_convert.convert import flax_to_torch_state

    if format not in ("flax", "hf"):
        raise ValueError(f"format={format!r}; choose 'flax' or 'hf'")
    variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    _check_fits(model, variables)
    arch = architecture_name(model)
    host = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
    if format == "hf" and model.config.layer_norm_eps != HF_LAYER_NORM_EPS:
        logger.warning(
            "%s: this model's LayerNorms use eps %g (NVlabs weights); transformers' SegFormer modules always use "
            "%g (they ignore config.layer_norm_eps), so transformers will compute slightly different outputs from "
            "these weights (typically 1e-5 to 1e-3 in the logits). segformer_jax.from_pretrained on this directory "
            "reads eps %g as well; save with format='flax' to keep %g.",
            out_dir,
            model.config.layer_norm_eps,
            HF_LAYER_NORM_EPS,
            HF_LAYER_NORM_EPS,
            model.config.layer_norm_eps,
        )
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        if format == "hf":
            checkpoint_io.save_safetensors(flax_to_torch_state(host), os.path.join(staging, "model.safetensors"))
            config_text = model.config.to_json_string(arch)
        else:
            checkpointer = _process_local_checkpointer()
            checkpointer.save(os.path.join(staging, FLAX_WEIGHTS_DIR), host)
            checkpointer.wait_until_finished()
            config_text = model.config.to_json_string(arch, with_impl=True)
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            f.write(config_text)
        if preprocessor is None and format == "hf" and arch == "SegformerForSemanticSegmentation":
            preprocessor = hf_preprocessor_config()
        if preprocessor is not None:
            with open(os.path.join(staging, PREPROCESSOR_NAME), "w") as f:
                json.dump(dict(preprocessor), f, indent=2)
                f.write("\n")
    return os.path.abspath(os.fspath(out_dir))


def _process_local_checkpointer():
    """An Orbax checkpointer that reads / writes for the calling process alone. (Orbax's default
    synchronises every process of a multi-host run: save_pretrained called by process 0 only, as
    train.py's final export does, would wait forever for the others.)"""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    )
