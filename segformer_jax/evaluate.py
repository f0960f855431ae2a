"""Evaluate a SegFormer on a config's validation split: mIoU, mAcc, aAcc and the per-class table.

    python -m segformer_jax.evaluate --config configs/ade20k.py:b2 --checkpoint runs/ade_b2
    python -m segformer_jax.evaluate --config configs/ade20k.py:b2 --checkpoint runs/ade_b2 \
        --ratios 0.5,0.75,1,1.25,1.5,1.75 --flip                     # the paper's multi-scale + flip
    python -m segformer_jax.evaluate --config configs/cityscapes.py:b2 --checkpoint path/to/hf_or_flax_dir \
        --config.eval.mode=slide --output results.json

--checkpoint is either a training workdir (its latest checkpoint, or --step N, or --best by the mIoU
recorded at eval time) or a model directory that `from_pretrained` reads (Hugging Face, our
`save_pretrained` output such as <workdir>/final). The data and eval settings (eval scale, mode, crop,
stride, batch size) come from --config; for a training workdir --config may be left out, and the
config it was trained with (its config.json, command-line overrides included) is used:

    python -m segformer_jax.evaluate --checkpoint runs/my_folder_b1 --flip

Two protocols (--protocol):
* `original` (default): mmseg's test procedure, the one papers report. Each validation image is
  resized to the eval scale, segmented (whole or sliding window, optional multi-scale / flip TTA) by
  `segformer_jax.inference`, the logits are resized back to the image's original size and scored
  against the label as stored: the label is never resized.
* `resized`: what train.py's periodic evaluation computes, on device in fixed-shape batches: the
  label is resized (nearest) with the image to the eval scale and scored there. Fast, and exactly
  the number recorded with the checkpoints, but not the published protocol when the eval scale
  changes the image size (ADE20K: short side 512).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from segformer_jax.xla_options import DEFAULT_COMPILATION_CACHE, enable_compilation_cache

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (as for train.py), e.g. configs/ade20k.py:b2; its data and eval fields are used. "
    "Default for a training workdir: the config it was trained with (<workdir>/config.json).",
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ dir, or a model dir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Compute dtype (default: a checkpoint's training dtype, else float32; float32 is exact to transformers).",
)
_BEST = flags.DEFINE_bool("best", False, "Use the workdir checkpoint with the best recorded mIoU.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results (per-class table included) to this JSON file.")
_PROTOCOL = flags.DEFINE_enum(
    "protocol",
    "original",
    ["original", "resized"],
    "original: mmseg's test procedure, scored at each image's original size; resized: "
    "train.py's on-device evaluation at the eval scale.",
)
_RATIOS = flags.DEFINE_list(
    "ratios", ["1"], "Multi-scale test ratios (protocol original), e.g. 0.5,0.75,1,1.25,1.5,1.75."
)
_FLIP = flags.DEFINE_bool("flip", False, "Also segment the mirrored images (protocol original).")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    DEFAULT_COMPILATION_CACHE,
    "Persistent XLA compilation cache ('' = off): a rerun with the same model and sizes skips compiling.",
)


class EvaluationError(RuntimeError):
    pass


def _checkpoint_dir(path: str) -> str | None:
    from segformer_jax.training import CHECKPOINT_DIR

    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.join(path, CHECKPOINT_DIR)
    if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
        return path
    return None


def use_model_normalisation(config, model_dir: str) -> str | None:
    """A model directory evaluated with `--config`: the images are normalised as the model's own
    `preprocessor_config.json` says (its mean / std), not as the config's data section does, when the
    two differ; -> what was changed, or None. Resizing stays the config's eval protocol."""
    import numpy as np

    from segformer_jax.inference.tiling import settings_from_preprocessor
    from segformer_jax.pretrained import read_preprocessor_config

    if _checkpoint_dir(os.path.abspath(model_dir)) is not None or not os.path.isdir(model_dir):
        return None
    processor = read_preprocessor_config(model_dir)
    if processor is None:
        return None
    settings = settings_from_preprocessor(processor, os.path.join(model_dir, "preprocessor_config.json"))
    mean, std = tuple(settings["mean"]), tuple(settings["std"])
    if np.allclose(mean, config.data.mean, atol=1e-4) and np.allclose(std, config.data.std, atol=1e-4):
        return None
    old = (tuple(config.data.mean), tuple(config.data.std))
    config.data.mean, config.data.std = mean, std
    fmt = lambda v: "(" + ", ".join(f"{x:.3f}" for x in v) + ")"  # noqa: E731
    return (
        f"normalising with {model_dir}/preprocessor_config.json: mean {fmt(mean)}, std {fmt(std)} "
        f"(the config's: mean {fmt(old[0])}, std {fmt(old[1])})"
    )


def load_model(path: str, *, step: int | None = None, best: bool = False, dtype: str | None = None):
    """-> (model, variables, description) from a workdir checkpoint or a from_pretrained directory.
    dtype: compute dtype ('float32' / 'bfloat16'); None: a checkpoint's training dtype, else float32."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from segformer_jax.models.config import SegformerConfig
    from segformer_jax.models.model import SegformerForSemanticSegmentation

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise EvaluationError(f"{path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")) and _checkpoint_dir(path) is None:
        from segformer_jax.pretrained import from_pretrained

        model, variables = from_pretrained(path, dtype=dtype or "float32")
        return model, variables, path
    ckpt_dir = _checkpoint_dir(path)
    if ckpt_dir is None:
        raise EvaluationError(
            f"{path} is neither a training workdir (with checkpoints/) nor a model directory (with config.json)"
        )
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise EvaluationError(f"{ckpt_dir} holds no complete checkpoint")
        metas = {}
        if best:
            for s in steps:
                meta = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if meta.get("mIoU") is not None:
                    metas[s] = meta["mIoU"]
            if not metas:
                raise EvaluationError(f"no checkpoint in {ckpt_dir} has a recorded mIoU; use --step")
            step = max(metas, key=metas.get)
        elif step is None:
            step = steps[-1]
        elif step not in steps:
            raise EvaluationError(f"no checkpoint at step {step} in {ckpt_dir}; available: {steps}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    from segformer_jax.training import restore_state_here

    state = restore_state_here(os.path.join(ckpt_dir, str(step)))  # also checkpoints of multi-host runs
    config = SegformerConfig.from_hf_dict(meta["model_config"], source=f"{ckpt_dir}/{step}")
    from segformer_jax.models.kernels import compute_dtype, weights_for_compute

    model = SegformerForSemanticSegmentation(config, dtype=compute_dtype(dtype or meta.get("model_dtype", "float32")))
    variables = jax.tree_util.tree_map(jnp.asarray, {"params": state["params"], "batch_stats": state["batch_stats"]})
    variables = weights_for_compute(variables, model.dtype)
    return model, variables, f"{ckpt_dir}/{step}"


def evaluate_model(config, model, variables, *, protocol: str = "original", ratios=(1.0,), flip: bool = False) -> dict:
    """Runs the eval split of `config.data` with `config.eval` settings; returns the results dict:
    `segformer_jax.evaluation.metrics.segmentation_metrics`, "protocol", and "confusion_matrix" (K x K pixel counts,
    rows = ground truth, columns = prediction)."""
    from segformer_jax.data import input_pipeline
    from segformer_jax.evaluation import metrics

    info = input_pipeline.get_dataset_info(config.data)
    if model.config.num_labels != info.num_classes:
        raise EvaluationError(
            f"the model predicts {model.config.num_labels} classes, the dataset {info.name} has {info.num_classes}"
        )
    if protocol == "original":
        matrix = confusion_at_original_size(config, model, variables, info, ratios=ratios, flip=flip)
    elif protocol == "resized":
        if tuple(float(r) for r in ratios) != (1.0,) or flip:
            raise EvaluationError(
                "multi-scale / flip test-time augmentation (--ratios, --flip) needs --protocol original"
            )
        matrix = confusion_at_resized_size(config, model, variables, info)
    else:
        raise EvaluationError(f"protocol={protocol!r}; choose 'original' or 'resized'")
    return {
        "protocol": protocol,
        **metrics.segmentation_metrics(matrix, info.class_names),
        "confusion_matrix": matrix.tolist(),
    }


def confusion_at_resized_size(config, model, variables, info):
    """train.py's evaluation: fixed-shape batches on device, scored at the eval scale. -> (K, K) int64."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from segformer_jax import training
    from segformer_jax.data import input_pipeline

    mesh = training.make_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    # Every process holds the whole model: its local copy becomes the replicated global array (a
    # device_put of a local array onto a multi-process mesh would be a cross-host transfer).
    variables = jax.tree_util.tree_map(
        lambda v: jax.make_array_from_process_local_data(replicated, np.asarray(v)), variables
    )
    eval_step = jax.jit(
        training.make_eval_step(model, config, info.num_classes, int(info.ignore_index)),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, batch_sharding),
    )
    batches = input_pipeline.make_eval_iterator(
        config.data,
        int(config.eval.batch_size) // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    matrix, _ = training.confusion_over_batches(
        variables,
        batches,
        eval_step,
        num_classes=info.num_classes,
        batch_sharding=batch_sharding,
        progress=bool(config.progress_bar),
    )
    return matrix


def inference_config(config, *, ratios=(1.0,), flip: bool = False):
    """`segformer_jax.inference.config_from_training`, with its errors as EvaluationError."""
    from segformer_jax.inference import config_from_training

    try:
        return config_from_training(config, ratios=ratios, flip=flip)
    except ValueError as err:
        raise EvaluationError(f"eval settings: {err}") from None


def confusion_at_original_size(config, model, variables, info, *, ratios=(1.0,), flip: bool = False):
    """mmseg's test protocol (module doc) -> (K, K) int64. Each process segments its shard of the
    validation images (`config.eval.batch_size` images at a time through one `TiledForward`); the
    matrices of all processes are summed."""
    import jax
    import numpy as np

    from segformer_jax import inference
    from segformer_jax.data import input_pipeline

    cfg = inference_config(config, ratios=ratios, flip=flip)
    group = max(1, int(config.eval.batch_size) // jax.process_count())
    forward = inference.TiledForward.from_model(model, variables, batch_size=group)
    examples, n = input_pipeline.make_original_eval_dataset(
        config.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    k, ignore = info.num_classes, int(info.ignore_index)
    matrix = np.zeros((k, k), np.int64)
    bar = None
    if config.progress_bar and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="eval", leave=False, dynamic_ncols=True)

    def score(images, labels):
        nonlocal matrix
        for image, label in zip(images, labels):
            if label.shape != image.shape[:2]:
                raise EvaluationError(
                    f"{info.name}: a validation label of {label.shape[0]}x{label.shape[1]} pixels "
                    f"belongs to an image of {image.shape[0]}x{image.shape[1]}; image and mask "
                    "must have the same size"
                )
        for prediction, label in zip(inference.segment_batch(forward, images, cfg, labels=True), labels):
            matrix += label_confusion(label, prediction, k, ignore)
        if bar is not None:
            bar.update(len(images))

    images, labels = [], []
    for example in examples.as_numpy_iterator():
        images.append(example["image"])
        labels.append(example["label"])
        if len(images) == group:
            score(images, labels)
            images, labels = [], []
    if images:
        score(images, labels)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        matrix = _sum_over_processes(matrix)
    return matrix


def _sum_over_processes(matrix):
    """Sum of an int64 matrix over all processes. JAX arrays are 32-bit here (x64 off) and a dataset can
    count more than 2^31 pixels (Cityscapes val does), so it travels as two 31-bit halves."""
    import numpy as np
    from jax.experimental import multihost_utils

    low, high = (matrix & (2**31 - 1)).astype(np.int32), (matrix >> 31).astype(np.int32)
    low, high = (np.asarray(multihost_utils.process_allgather(x), np.int64).sum(axis=0) for x in (low, high))
    return (high << 31) + low


def label_confusion(label, prediction, num_classes: int, ignore_index: int = 255):
    """(K, K) int64 counts of one label map against a prediction of the same shape, rows = ground truth;
    pixels labelled ignore_index or outside [0, K) are not counted. The numpy twin of
    `metrics.confusion_matrix`, for label maps of every size (a jitted one would compile per size)."""
    import numpy as np

    label = np.asarray(label).astype(np.int64).reshape(-1)
    prediction = np.asarray(prediction).astype(np.int64).reshape(-1)
    if label.shape != prediction.shape:
        raise ValueError(f"label of {label.size} pixels against a prediction of {prediction.size}")
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    index = label[valid] * num_classes + np.clip(prediction[valid], 0, num_classes - 1)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _CHECKPOINT.value:
        raise app.UsageError("--checkpoint is required (a train.py workdir or a model directory)")
    try:
        ratios = tuple(float(r) for r in _RATIOS.value)
    except ValueError:
        raise app.UsageError(f"--ratios={','.join(_RATIOS.value)}: give numbers, e.g. 0.75,1,1.25") from None
    if _PROTOCOL.value == "resized" and (ratios != (1.0,) or _FLIP.value):
        raise app.UsageError("--ratios and --flip (test-time augmentation) need --protocol original")
    import jax

    from segformer_jax import training
    from segformer_jax.data.sources import DataNotFoundError
    from segformer_jax.evaluation import metrics

    config = _CONFIG.value
    if config is None:
        ckpt_dir = _checkpoint_dir(os.path.abspath(_CHECKPOINT.value))
        if ckpt_dir is None:
            raise app.UsageError(
                f"--checkpoint={_CHECKPOINT.value} is not a train.py workdir: pass --config "
                "(e.g. configs/ade20k.py:b2) for the data and eval settings"
            )
        try:
            config = training.read_config(os.path.dirname(ckpt_dir))  # the workdir holding checkpoints/
        except training.TrainingError as err:
            raise app.UsageError(str(err)) from None
    else:
        note = use_model_normalisation(config, _CHECKPOINT.value)
        if note:
            print(note)
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache(_CACHE.value)
    training.maybe_initialize_distributed(config)
    try:
        model, variables, source = load_model(_CHECKPOINT.value, step=_STEP.value, best=_BEST.value, dtype=_DTYPE.value)
        results = evaluate_model(config, model, variables, protocol=_PROTOCOL.value, ratios=ratios, flip=_FLIP.value)
    except (EvaluationError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() != 0:  # every process computed the same results; one reports them
        return
    tta = (
        f", ratios {','.join(f'{r:g}' for r in ratios)}{' + flip' if _FLIP.value else ''}"
        if _PROTOCOL.value == "original"
        else ""
    )
    print(f"{source} on {config.data.name} ({config.eval.mode} inference, scored at the {_PROTOCOL.value} size{tta}):")
    print(metrics.format_table(results))
    if _OUTPUT.value:
        metrics.save_json({"checkpoint": source, **results}, _OUTPUT.value)
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    from segformer_jax import hugepages

    hugepages.reexec_with_hugepages()  # faster steps on CPU (segformer_jax/hugepages.py)
    app.run(main)
