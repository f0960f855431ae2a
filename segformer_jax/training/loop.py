"""The training loop: `train_and_evaluate(config, workdir)` trains (resuming from the latest
checkpoint), evaluates, logs and exports `workdir/final`.

    from segformer_jax import training
    training.train_and_evaluate(config, workdir)      # config: see configs/default.py

The data stream is resumed at `start_step`, so with the step's rng folding (steps.py) a resumed run
computes what an uninterrupted one would.

SIGTERM / SIGINT (preemption.py): the current step finishes, a checkpoint of it is written (waiting for
async saves in flight), and the result carries 'preempted' (train.py exits with EXIT_PREEMPTED). A
signal before the first step of this run finishes writes nothing (the latest checkpoint stays the one
to resume from). On a single host an evaluation in progress is abandoned; the rerun evaluates that step
first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable

import jax
import ml_collections
import numpy as np

from segformer_jax import fileio
from segformer_jax.evaluation import metrics
from segformer_jax.training import losses
from segformer_jax.training.checkpoints import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    check_writable,
    checkpoint_meta,
    restore_latest_good,
    save_checkpoint,
    write_error,
)
from segformer_jax.training.logs import MetricWriter
from segformer_jax.training.preemption import StoppedDuringSetup, StopRequest
from segformer_jax.training.state import TrainingError, build_model, shard_batch, to_host
from segformer_jax.training.steps import build_training, evaluate, make_eval_step

logger = logging.getLogger("segformer_jax.training")


def _validate(config) -> None:
    problems = []
    if config.total_steps <= 0:
        problems.append(f"total_steps={config.total_steps} must be > 0")
    if config.batch_size % jax.device_count():
        problems.append(f"batch_size={config.batch_size} is not divisible by the {jax.device_count()} devices")
    if config.eval.batch_size % jax.device_count():
        problems.append(
            f"eval.batch_size={config.eval.batch_size} (global) is not divisible by the {jax.device_count()} devices"
        )
    if config.loss.reduction not in losses.REDUCTIONS:
        problems.append(f"loss.reduction={config.loss.reduction!r}; choose one of {losses.REDUCTIONS}")
    if config.eval.mode not in ("whole", "slide"):
        problems.append(f"eval.mode={config.eval.mode!r}; choose 'whole' or 'slide'")
    if problems:
        raise TrainingError("invalid config: " + "; ".join(problems))


def _write_config(config, workdir: str) -> None:
    fileio.atomic_write_bytes(
        (config.to_json_best_effort(indent=2) + "\n").encode(), os.path.join(workdir, "config.json")
    )


class _EvalInterrupted(Exception):
    """A stop signal arrived during an evaluation (single host)."""


class _StoppableBatches:
    """The eval batches, ending the evaluation early (by raising) once a stop signal has arrived."""

    def __init__(self, batches: Iterable, stop: StopRequest):
        self._batches, self._stop = batches, stop

    def __len__(self):
        return len(self._batches)

    def __iter__(self):
        for batch in self._batches:
            if self._stop.requested_here:
                raise _EvalInterrupted
            yield batch


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a train.py `workdir` was trained with (its config.json, overrides included)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(
            f"cannot read the training config {path} ({e}); is {workdir} a train.py workdir? "
            "Otherwise pass the config file (--config configs/x.py:variant)"
        ) from None
    if not isinstance(saved, dict) or not {"data", "eval", "model"} <= saved.keys():
        raise TrainingError(
            f"{path} is not a train.py config (a model directory's config.json?); pass the "
            "config file (--config configs/x.py:variant)"
        )

    def tuples(x):  # JSON turned the config's tuples into lists
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return ml_collections.ConfigDict(tuples(saved))


def _eval_and_log(
    step,
    model,
    state,
    eval_iter,
    eval_step_fn,
    info,
    config,
    workdir,
    writer,
    batch_sharding,
    data_config,
    *,
    log: bool = True,
):
    """Evaluate; with `log`, add the results to the metric logs and eval/, images/ (off when a finished
    run is reopened: its last evaluation is already recorded)."""
    from segformer_jax.inference import visualize

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    t0 = time.time()
    results, vis = evaluate(
        variables,
        eval_iter,
        eval_step_fn,
        num_classes=info.num_classes,
        class_names=info.class_names,
        batch_sharding=batch_sharding,
        num_vis=int(config.eval.num_vis),
        progress=config.progress_bar,
    )
    seconds = time.time() - t0
    release_freed_memory()  # the eval program's compilation, before training resumes
    if not log:
        return results
    writer.scalars(step, "eval", {**{k: results[k] for k in metrics.SUMMARY_METRICS}, "seconds": seconds})
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        metrics.save_json({"step": step, **results}, os.path.join(workdir, "eval", f"eval_{step}.json"))
        if vis is not None and len(vis["image"]):
            grid = visualize.comparison_grid(
                vis["image"], vis["label"], vis["pred"], info.palette, mean=data_config.mean, std=data_config.std
            )
            os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
            visualize.save_png(grid, os.path.join(workdir, "images", f"eval_{step}.png"))
            writer.image(step, "eval/image_gt_pred", grid)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, timings: dict | None = None) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir` if any), evaluates every
    `eval.every_steps` and at the end, exports `workdir/final`. Returns the final eval results
    (per-class table included) plus 'step'; stopped by SIGTERM / SIGINT, {'step', 'preempted': signal name}
    with the checkpoint of that step written. `timings` (a dict; off when None): filled with the
    per-call times of the loop's input wait, step and host syncs (`_timed_loop`; benchmarks/train_e2e.py)."""
    _validate(config)
    workdir = os.path.abspath(workdir)
    check_writable(workdir)
    with StopRequest() as stop:
        try:
            return _train_and_evaluate(config, workdir, stop, timings)
        except StoppedDuringSetup:
            latest = _committed_step(workdir)
            accum = max(int(config.optimizer.grad_accum_steps), 1)
            if jax.process_index() == 0:
                print(
                    f"Stopped by {stop.signal_name} at step {(latest or 0) // accum} while setting up, before any "
                    "step of this run: nothing written; "
                    + (
                        f"the latest checkpoint is {os.path.join(workdir, CHECKPOINT_DIR, str(latest))}"
                        if latest is not None
                        else "no checkpoint yet"
                    )
                    + f". Rerun the same command to resume from {workdir}.",
                    flush=True,
                )
            return {"step": latest or 0, "preempted": stop.signal_name}
        except Exception as e:
            what = getattr(e, "filename", None) or "a checkpoint"
            error = write_error(e, workdir, what, _committed_step(workdir))
            if error is not None:
                raise error from None
            raise


def _train_and_evaluate(config, workdir: str, stop: StopRequest, timings: dict | None = None) -> dict:
    from segformer_jax.data.pipelines import pipeline_module

    is_main = jax.process_index() == 0

    data_config = config.data
    pipeline = pipeline_module(data_config)  # tf.data, or numpy + PIL threads (folders, no TensorFlow)
    binary = bool(config.model.get("binary", False))
    if binary and data_config.get("name") == "folder" and data_config.get("folder"):
        from segformer_jax.data import folder as folder_lib

        folder_lib.check_binary_masks(data_config.folder, field="model.binary")
    info = pipeline.get_dataset_info(data_config)
    if binary and info.num_classes != 2:
        raise TrainingError(
            f"model.binary=True (one sigmoid logit) needs a dataset of 2 classes (0 background, 1 foreground, "
            f"255 ignore); {info.name} has {info.num_classes} ({', '.join(map(str, info.class_names[:8]))})"
        )
    # A binary model's one channel is the foreground; it is evaluated on both classes.
    model, pretrained = build_model(config, info.class_names[1:] if binary else info.class_names)
    ignore_index = int(info.ignore_index)

    accum = max(int(config.optimizer.grad_accum_steps), 1)
    total_steps = int(config.total_steps) * accum  # micro-batches; total_steps counts updates
    setup = build_training(config, model, pretrained, num_classes=info.num_classes, ignore_index=ignore_index)
    replicated, batch_sharding, abstract_state = setup.replicated, setup.batch_sharding, setup.abstract_state
    train_rng = setup.train_rng

    meta = checkpoint_meta(model, config)
    manager, state = restore_latest_good(config, abstract_state, meta, workdir)
    if state is not None:
        latest = int(to_host(state.step))
        logger.info("resumed from %s/%s/%d", workdir, CHECKPOINT_DIR, latest)
        if is_main:
            print(f"Resuming from checkpoint at step {latest} in {workdir}", flush=True)
    else:
        state = setup.init_state()
    release_tracing_caches()
    release_freed_memory()  # the init program's compilation
    if is_main:  # after the compatibility check: a refused resume leaves the workdir untouched
        _write_config(config, workdir)
        names = ", ".join(info.class_names[:8]) + (", ..." if info.num_classes > 8 else "")
        print(
            f"Data: {info.name}, {info.num_train_examples} train / {info.num_eval_examples} eval examples, "
            f"{info.num_classes} classes ({names})",
            flush=True,
        )
    start_step = int(to_host(state.step))
    train_step = compile_then_release(setup.train_step)
    eval_step = jax.jit(
        make_eval_step(model, config, info.num_classes, ignore_index),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, batch_sharding),
    )
    eval_iter = pipeline.make_eval_iterator(
        data_config,
        int(config.eval.batch_size) // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if jax.process_count() == 1:  # several hosts evaluate to the end (they must agree on the batches)
        eval_iter = _StoppableBatches(eval_iter, stop)
    writer = MetricWriter(workdir, is_main)
    global_batch = int(config.batch_size)
    stop_at = total_steps
    if config.get("max_steps_this_run"):
        stop_at = min(total_steps, start_step + int(config.max_steps_this_run))

    train_iter = None
    if start_step < stop_at:
        train_iter = pipeline.make_train_iterator(
            data_config,
            global_batch,
            seed=config.seed,
            start_step=start_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    bar = None
    if is_main and config.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    eval_every = int(config.eval.every_steps) * accum if config.eval.every_steps else 0
    ckpt_every = int(config.checkpoint.every_steps) * accum if config.checkpoint.every_steps else 0
    log_every = max(int(config.log_every_steps), 1)
    results = None
    saved = [start_step] if start_step else []  # committed (or in flight) checkpoint steps

    def save(step_done, **kw):
        save_checkpoint(manager, state, kw.pop("meta", meta), **kw)
        saved.append(step_done)

    def eval_due(step_done):
        return (eval_every and step_done % eval_every == 0) or step_done == total_steps

    def eval_and_save(step_done):
        """-> the eval results, or None when a stop signal ended the evaluation (state saved without them)."""
        try:
            res = _eval_and_log(
                step_done,
                model,
                state,
                eval_iter,
                eval_step,
                info,
                config,
                workdir,
                writer,
                batch_sharding,
                data_config,
            )
        except _EvalInterrupted:
            if step_done not in saved:
                save(step_done)
            return None
        if bar is not None:
            bar.write(f"step {step_done}: mIoU {res['mIoU']:.4f}  mAcc {res['mAcc']:.4f}  aAcc {res['aAcc']:.4f}")
        if step_done not in saved:
            save(
                step_done,
                meta={**meta, "mIoU": res["mIoU"]},
                metrics_for_best={"mIoU": float(np.nan_to_num(res["mIoU"], nan=-1.0))},
            )
        return res

    sync_metrics = to_host
    if timings is not None:  # benchmarks/train_e2e.py: where the loop's time goes
        train_iter, train_step, sync_metrics = _timed_loop(timings, train_iter, train_step)
    window_start, window_steps = time.time(), 0
    pending = []
    preempted = False
    done = start_step
    if (
        start_step
        and jax.process_count() == 1
        and eval_due(start_step)
        and not os.path.exists(os.path.join(workdir, "eval", f"eval_{start_step}.json"))
    ):  # the evaluation of this step was cut short by a stop signal: do it now
        results = eval_and_save(start_step)
        preempted = results is None
    for step in range(start_step, stop_at):
        if preempted or stop.should_stop(step):
            preempted = True
            break
        batch = next(train_iter)
        batch = shard_batch({"image": batch["image"], "label": batch["label"]}, batch_sharding)
        state, step_metrics = train_step(state, batch, train_rng)
        pending.append(step_metrics)
        window_steps += 1
        done = step + 1
        if done % log_every == 0 or done == stop_at:
            # One host sync per log interval: average the interval's metrics.
            host = sync_metrics(pending)
            pending = []
            avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            avg["lr"], avg["lr_head"] = float(host[-1]["lr"]), float(host[-1]["lr_head"])
            elapsed = time.time() - window_start
            avg["images_per_second"] = window_steps * global_batch / max(elapsed, 1e-9)
            window_start, window_steps = time.time(), 0
            if not np.isfinite(avg["loss"]):
                last = manager.latest_step()
                resume = (
                    f"the last good checkpoint is step {last} in {os.path.join(workdir, CHECKPOINT_DIR)}"
                    if last is not None
                    else "no checkpoint was written yet"
                )
                precision = (
                    "train in float32 (--config.model.dtype=float32), " if str(config.model.dtype) != "float32" else ""
                )
                raise TrainingError(
                    f"loss is {avg['loss']} at step {done} ({config.model.dtype}); {resume}. Try: {precision}a lower "
                    "learning rate (--config.optimizer.learning_rate), or gradient clipping "
                    "(--config.optimizer.grad_clip_norm=1.0)"
                )
            writer.scalars(done, "train", avg)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{avg['loss']:.4f}",
                    lr=f"{avg['lr']:.2e}",
                    img_s=f"{avg['images_per_second']:.1f}",
                    refresh=False,
                )
        if bar is not None:
            bar.update(1)
        if eval_due(done):
            results = eval_and_save(done)
            if results is None:
                preempted = True
                break
            window_start = time.time()  # keep eval time out of images/s
        elif (ckpt_every and done % ckpt_every == 0) or done == stop_at:
            save(done)
    if preempted and done > start_step and done not in saved:
        save(done)  # the step the signal interrupted (every host stops at the same one)
    if bar is not None:
        bar.close()
    manager.wait_until_finished()
    if preempted:
        result = _stopped(stop, done, start_step, saved, workdir, accum, config)
    else:
        try:
            result = _finish(
                config, workdir, model, state, results, eval_iter, eval_step, info, writer, batch_sharding, data_config
            )
        except _EvalInterrupted:  # reopened a finished run and was stopped re-evaluating it: nothing lost
            result = _stopped(stop, done, start_step, saved, workdir, accum, config)
    writer.close()
    manager.close()
    return result


def release_tracing_caches() -> None:
    """Drop jax's staging caches (jaxprs, lowerings): tracing the model for the state's init and
    shapes leaves ~120 MB there that nothing uses again (the issue-17 run with python input: peak RSS
    1647 / 1653 MB instead of 1744 / 1738). Compiled programs stay cached: jit's C++ executable caches
    are kept, unlike `jax.clear_caches()`, so other jitted functions of the process do not recompile.
    A private jax function; where it is missing, nothing is released."""
    try:
        from jax._src import util

        util.clear_all_caches()
    except (ImportError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand memory freed on the C heap back to the OS (glibc `malloc_trim`; elsewhere nothing). XLA
    compiles on the heap and frees it after, but glibc keeps those pages resident, and each run of a
    compiled program takes fresh memory for its scratch beside them."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def compile_then_release(jitted):
    """`jitted`, compiled ahead of its first call with each new batch shape, with the compiler's freed
    memory released (`release_freed_memory`) before the program first runs; later calls reuse the
    compiled program. b0, 11 classes, batch 8 at 256x256: peak RSS after the first steps 2.04 GB
    instead of 2.49 GB. The state's shapes never change, so only the other arguments key the cache."""
    compiled = {}

    def call(state, *args):
        key = tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree_util.tree_leaves(args))
        if key not in compiled:
            compiled[key] = jitted.lower(state, *args).compile()
            release_freed_memory()
        return compiled[key](state, *args)

    return call


def _timed_loop(timings: dict, train_iter, train_step):
    """The loop's (train_iter, train_step, metrics host sync), recording (start, end) `time.perf_counter()`
    pairs of every call in timings['input'] (waiting in next(train_iter)), timings['step'] (the step's
    dispatch; with timings['block'] true, also its compute: the result is awaited) and timings['sync']
    (the metrics to_host per log interval, which waits for the steps in flight)."""
    for name in ("input", "step", "sync"):
        timings.setdefault(name, [])
    block = bool(timings.get("block"))

    def batches():
        while True:
            t = time.perf_counter()
            batch = next(train_iter)
            timings["input"].append((t, time.perf_counter()))
            yield batch

    def step(*args):
        t = time.perf_counter()
        out = train_step(*args)
        if block:
            jax.block_until_ready(out)
        timings["step"].append((t, time.perf_counter()))
        return out

    def sync(tree):
        t = time.perf_counter()
        out = to_host(tree)
        timings["sync"].append((t, time.perf_counter()))
        return out

    return (None if train_iter is None else batches()), step, sync


def _committed_step(workdir: str) -> int | None:
    """The newest complete checkpoint on disk (Orbax renames a checkpoint to its step when committed)."""
    try:
        steps = [int(n) for n in os.listdir(os.path.join(workdir, CHECKPOINT_DIR)) if n.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)


def _stopped(stop: StopRequest, done: int, start_step: int, saved: list, workdir: str, accum: int, config) -> dict:
    # (several hosts: JAX's C++ handler caught the SIGTERM, this process only learnt of it at the sync point)
    timing = f"; {time.time() - stop.received_at:.1f} s after the signal" if stop.received_at else ""
    if jax.process_index() == 0:
        where = os.path.join(workdir, CHECKPOINT_DIR, str(done))
        if done > start_step:
            what = f"checkpoint of step {done // accum} written to {where}"
        elif saved:
            latest = os.path.join(workdir, CHECKPOINT_DIR, str(saved[-1]))
            what = f"no step done in this run, nothing written; the latest checkpoint is {latest}"
        else:
            what = "no step done yet: nothing saved"
        print(
            f"Stopped by {stop.signal_name} at step {done // accum} of {int(config.total_steps)} "
            f"({what}{timing}). Rerun the same command to resume from {workdir}.",
            flush=True,
        )
    return {"step": done, "preempted": stop.signal_name}


def _finish(config, workdir, model, state, results, eval_iter, eval_step, info, writer, batch_sharding, data_config):
    """After the loop: the final export (a finished run) or the note of where it stopped."""
    is_main = jax.process_index() == 0
    accum = max(int(config.optimizer.grad_accum_steps), 1)
    total_steps = int(config.total_steps) * accum
    final_step = int(to_host(state.step))
    if final_step >= total_steps:
        if results is None:  # resumed a finished run: evaluate the restored state again (for the export)
            results = _eval_and_log(
                final_step,
                model,
                state,
                eval_iter,
                eval_step,
                info,
                config,
                workdir,
                writer,
                batch_sharding,
                data_config,
                log=False,
            )
        if is_main:
            from segformer_jax.pretrained import save_pretrained

            variables = to_host({"params": state.params, "batch_stats": state.batch_stats})
            final_dir = save_pretrained(
                model, variables, os.path.join(workdir, FINAL_DIR), format="flax", overwrite=True
            )
            from segformer_jax import inference

            try:  # predict's defaults for this model; the model itself is saved whatever happens here
                inference.save_settings(inference.config_from_training(config), final_dir)
            except (ValueError, OSError) as e:
                logger.warning(
                    "could not record the eval settings in %s (%s); predict will use its defaults", final_dir, e
                )
            metrics.save_json({"step": final_step, **results}, os.path.join(workdir, "eval_results.json"))
            print(
                f"\nFinal evaluation at step {final_step} ({info.name}, {info.num_eval_examples} images):\n"
                + metrics.format_table(results),
                flush=True,
            )
            print(f"mIoU {results['mIoU']:.4f}; final model in {os.path.join(workdir, FINAL_DIR)}", flush=True)
    elif is_main:
        print(
            f"Stopped at step {final_step // accum} of {int(config.total_steps)} (max_steps_this_run); "
            f"rerun the same command to resume from {workdir}",
            flush=True,
        )
    return {"step": final_step, **(results or {})}
