"""Orbax checkpoints of a run: the manager (last K + best by mIoU, async saves, half-written ones never
picked up), the metadata that refuses resuming into a different model, save / restore.

Workdir layout:
    config.json          the training config of the run (ConfigDict as JSON)
    checkpoints/<step>/  Orbax checkpoints (`state`: step, params, batch_stats, opt_state; `meta`: JSON
                         with the model config, used to refuse resuming into a different model)
    metrics.jsonl        one JSON object per log / eval event
    tensorboard/         TensorBoard scalars and eval images (tensorboardX)
    images/              eval_<step>.png: validation images | ground truth | prediction
    eval/                eval_<step>.json: per-class IoU / Acc
    final/               the final model, `from_pretrained(workdir/final)` loads it
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax

from segformer_jax.pretrained import WORKDIR_CHECKPOINTS, WORKDIR_FINAL
from segformer_jax.training.state import TrainingError, TrainState, state_to_tree, to_host, tree_to_state

CHECKPOINT_DIR = WORKDIR_CHECKPOINTS  # named in pretrained, which recognises a workdir given as a model
FINAL_DIR = WORKDIR_FINAL


def make_checkpoint_manager(directory: str, config):
    """Keeps the last `checkpoint.keep` checkpoints plus the best one by validation mIoU. Orbax writes
    each checkpoint into a temporary directory and renames it when complete, so a run killed while
    saving leaves no checkpoint that `latest_step()` would pick up (and the leftovers are removed on
    the next start)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm

    policy = cm.AnyPreservationPolicy(
        [
            cm.LatestN(n=int(config.checkpoint.keep)),
            cm.BestN(get_metric_fn=lambda m: m["mIoU"], reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=bool(config.checkpoint.async_save),
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def checkpoint_meta(model, config) -> dict:
    return {
        "model_config": json.loads(model.config.to_json_string(with_impl=True)),
        "model_dtype": config.model.dtype,
        "grad_accum_steps": int(config.optimizer.grad_accum_steps),
    }


def _describe_differences(stored: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _describe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def check_compatible(stored_meta: Mapping, current_meta: Mapping, workdir: str, step: int) -> None:
    """Refuse to resume a checkpoint of another model (architecture, classes, ...)."""
    ignore = ("id2label", "label2id", "depthwise_conv_impl", "decode_head_impl")  # names / speed choices

    def strip(m):
        m = json.loads(json.dumps(m))
        m.pop("mIoU", None)  # recorded with eval checkpoints, not a property of the model
        for k in ignore:
            m.get("model_config", {}).pop(k, None)
            m.get("model_config", {}).get("segformer_jax", {}).pop(k, None)
        return m

    diffs = _describe_differences(strip(stored_meta), strip(current_meta))
    if diffs:
        raise TrainingError(
            f"workdir {workdir} holds a checkpoint (step {step}) of a different model/config:\n    "
            + "\n    ".join(diffs)
            + f"\nUse another --workdir, or delete {os.path.join(workdir, CHECKPOINT_DIR)} to start over."
        )


def save_checkpoint(manager, state: TrainState, meta: Mapping, *, metrics_for_best=None) -> None:
    import orbax.checkpoint as ocp

    step = int(to_host(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)), meta=ocp.args.JsonSave(dict(meta))),
        metrics=metrics_for_best,
        force=True,
    )


def restore_checkpoint(manager, step: int, abstract_state: TrainState, meta: Mapping, workdir: str) -> TrainState:
    import orbax.checkpoint as ocp

    stored_meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_compatible(stored_meta, meta, workdir, step)
    target = state_to_tree(abstract_state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # orbax raises ValueError / KeyError / ... for tree mismatches
        raise TrainingError(
            f"cannot restore {workdir}/{CHECKPOINT_DIR}/{step} into this model/optimiser "
            f"({type(e).__name__}: {e}); use another --workdir"
        ) from e
    return tree_to_state(abstract_state, restored)


def restore_state_here(step_dir: str) -> dict:
    """The `state` tree of the checkpoint in `step_dir` (e.g. workdir/checkpoints/4), on this process's
    first device whatever mesh wrote it: a checkpoint of a multi-host run restores on one machine
    (Orbax refuses without a target: 'topology mismatch'). Resuming training uses
    `restore_checkpoint`, which restores onto the run's own shardings."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(os.path.abspath(step_dir), "state")
    metadata = checkpointer.metadata(path)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), getattr(metadata, "item_metadata", metadata)
    )
    return checkpointer.restore(path, target)
