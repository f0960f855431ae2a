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
    checkpoints_unreadable/<step>/  a latest checkpoint that could not be read, moved aside on resume
                         (reported; the previous good one is used). Delete it once looked at.

Integrity: Orbax commits a checkpoint by renaming its temporary directory, so a kill -9 mid-save leaves
no step that `latest_step()` would return. A committed checkpoint damaged later (a truncated file, a
deleted array, bad JSON metadata: Orbax / TensorStore raise ValueError, JSONDecodeError, plain
Exception...) is found by `restore_latest_good`, which tries the newest steps first. A write that fails
for lack of space becomes one `TrainingError` naming the workdir (`write_error`); the previous
checkpoint is untouched (the failed one stays a temporary directory, removed on the next start).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping

import jax
import numpy as np

from segformer_jax.pretrained import WORKDIR_CHECKPOINTS, WORKDIR_FINAL
from segformer_jax.training.state import TrainingError, TrainState, state_to_tree, to_host, tree_to_state

CHECKPOINT_DIR = WORKDIR_CHECKPOINTS  # named in pretrained, which recognises a workdir given as a model
FINAL_DIR = WORKDIR_FINAL
UNREADABLE_DIR = "checkpoints_unreadable"

logger = logging.getLogger("segformer_jax.training")


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

    try:
        stored_meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # a damaged / missing file: restore_latest_good reports it
        raise TrainingError(f"cannot read the metadata of {workdir}/{CHECKPOINT_DIR}/{step} ({e})") from e
    if not isinstance(stored_meta, Mapping):
        raise TrainingError(f"the metadata of {workdir}/{CHECKPOINT_DIR}/{step} is not a JSON object: {stored_meta!r}")
    check_compatible(stored_meta, meta, workdir, step)
    target = state_to_tree(abstract_state)
    step_dir = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    try:  # the arrays' shapes and dtypes first: a mismatch is another optimiser / model, not damage
        stored = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
        stored = getattr(stored, "item_metadata", stored)
        stored_arrays = sorted((tuple(m.shape), str(m.dtype)) for m in jax.tree_util.tree_leaves(stored))
    except Exception as e:  # unreadable _METADATA / _sharding / array metadata
        raise TrainingError(f"cannot read the array metadata of {step_dir} ({type(e).__name__}: {e})") from e
    if not stored_arrays:  # Orbax logs a warning and returns no metadata when it cannot read it
        raise TrainingError(f"cannot read the array metadata of {step_dir} (Orbax found none)")
    wanted = sorted((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(target))
    if stored_arrays != wanted:
        raise TrainingError(
            f"workdir {workdir} holds a checkpoint (step {step}) of a different model/optimiser: "
            f"{len(stored_arrays)} arrays there, {len(wanted)} here (or other shapes / dtypes); "
            "use another --workdir"
        )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # a truncated / missing array file: restore_latest_good reports it
        raise TrainingError(f"cannot read the arrays of {step_dir} ({type(e).__name__}: {e})") from e
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


# ----------------------------------------------------------------------------- integrity


def check_writable(workdir: str) -> None:
    """Refuse a workdir that cannot be written (read-only filesystem, no permission) before anything
    is compiled, instead of failing at the first checkpoint."""
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise TrainingError(
            f"the workdir {workdir} is not writable ({e.strerror or e}); checkpoints, logs and the final "
            "model go there. Pass a --workdir on a writable filesystem."
        ) from None


_NO_SPACE = ("No space left on device", "Disk quota exceeded", "ENOSPC")


def _is_no_space(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _NO_SPACE):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_error(e: BaseException, workdir: str, what: str, previous_step: int | None) -> TrainingError | None:
    """The TrainingError for a write into `workdir` that failed for lack of space (None for other
    errors, which propagate as they are)."""
    if not _is_no_space(e):
        return None
    kept = (
        f"the previous checkpoint (step {previous_step}) is intact and resumes"
        if previous_step is not None
        else "no checkpoint had been written yet"
    )
    return TrainingError(
        f"the disk of the workdir {workdir} is full: writing {what} failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:300] if str(e) else e!r}); {kept}. Free space (or use a --workdir with more) "
        "and rerun the same command."
    )


def _report(message: str) -> None:
    logger.warning(message)
    if jax.process_index() == 0:
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _move_aside(workdir: str, step: int) -> str:
    src = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    dst = os.path.join(workdir, UNREADABLE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"segformer_jax: moved aside unreadable checkpoint {step}")
    return dst


def restore_latest_good(config, abstract_state: TrainState, meta: Mapping, workdir: str):
    """-> (manager, restored TrainState or None when there is no checkpoint). Tries the newest step
    first; one that cannot be read is reported, moved to workdir/checkpoints_unreadable/ and the
    previous one is tried. A checkpoint of a different model is refused (TrainingError), never skipped."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    manager = make_checkpoint_manager(directory, config)
    while True:
        step = manager.latest_step()
        if step is None:
            return manager, None
        problem = None
        try:
            state = restore_checkpoint(manager, step, abstract_state, meta, workdir)
        except TrainingError as e:
            if "different model" in str(e):
                raise
            problem = str(e.__cause__ or e)
        except Exception as e:  # Orbax / TensorStore raise many types for a damaged file
            problem = f"{type(e).__name__}: {e}"
        if jax.process_count() > 1:  # each host reads its own part: all skip the step if one could not
            from jax.experimental import multihost_utils

            failed = multihost_utils.process_allgather(np.int32(problem is not None))
            if problem is None and np.any(failed):
                problem = f"unreadable on process(es) {np.flatnonzero(failed).tolist()}"
        if problem is None:
            return manager, state
        manager.close()
        older = [s for s in manager.all_steps() if s < step]
        moved = _move_aside(workdir, step)
        _report(
            f"checkpoint {directory}/{step} is unreadable ({problem.splitlines()[0][:300]}); moved it to "
            f"{moved} and "
            + (f"resuming from the previous one (step {max(older)})" if older else "starting from scratch")
        )
        manager = make_checkpoint_manager(directory, config)
