"""The training loop: `train_and_evaluate(config, workdir)` trains (resuming from the latest
checkpoint), evaluates, logs and exports `workdir/final`.

    from segformer_jax import training
    training.train_and_evaluate(config, workdir)      # config: see configs/default.py

The data stream is resumed at `start_step`, so with the step's rng folding (steps.py) a resumed run
computes what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from segformer_jax.evaluation import metrics
from segformer_jax.training import losses
from segformer_jax.training.checkpoints import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    checkpoint_meta,
    make_checkpoint_manager,
    restore_checkpoint,
    save_checkpoint,
)
from segformer_jax.training.logs import MetricWriter
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
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2) + "\n")


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
    if not log:
        return results
    writer.scalars(
        step, "eval", {"mIoU": results["mIoU"], "mAcc": results["mAcc"], "aAcc": results["aAcc"], "seconds": seconds}
    )
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the latest checkpoint in `workdir` if any), evaluates every
    `eval.every_steps` and at the end, exports `workdir/final`. Returns the final eval results
    (per-class table included) plus 'step'."""
    from segformer_jax.data import input_pipeline

    _validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    data_config = config.data
    info = input_pipeline.get_dataset_info(data_config)
    model, pretrained = build_model(config, info.class_names)
    ignore_index = int(info.ignore_index)

    accum = max(int(config.optimizer.grad_accum_steps), 1)
    total_steps = int(config.total_steps) * accum  # micro-batches; total_steps counts updates
    setup = build_training(config, model, pretrained, num_classes=info.num_classes, ignore_index=ignore_index)
    replicated, batch_sharding, abstract_state = setup.replicated, setup.batch_sharding, setup.abstract_state
    train_rng = setup.train_rng

    manager = make_checkpoint_manager(os.path.join(workdir, CHECKPOINT_DIR), config)
    meta = checkpoint_meta(model, config)
    latest = manager.latest_step()
    if latest is not None:
        state = restore_checkpoint(manager, latest, abstract_state, meta, workdir)
        logger.info("resumed from %s/%s/%d", workdir, CHECKPOINT_DIR, latest)
        if is_main:
            print(f"Resuming from checkpoint at step {latest} in {workdir}", flush=True)
    else:
        state = setup.init_state()
    if is_main:  # after the compatibility check: a refused resume leaves the workdir untouched
        _write_config(config, workdir)
        names = ", ".join(info.class_names[:8]) + (", ..." if info.num_classes > 8 else "")
        print(
            f"Data: {info.name}, {info.num_train_examples} train / {info.num_eval_examples} eval examples, "
            f"{info.num_classes} classes ({names})",
            flush=True,
        )
    start_step = int(to_host(state.step))
    train_step = setup.train_step
    eval_step = jax.jit(
        make_eval_step(model, config, info.num_classes, ignore_index),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, batch_sharding),
    )
    eval_iter = input_pipeline.make_eval_iterator(
        data_config,
        int(config.eval.batch_size) // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    writer = MetricWriter(workdir, is_main)
    global_batch = int(config.batch_size)
    stop_at = total_steps
    if config.get("max_steps_this_run"):
        stop_at = min(total_steps, start_step + int(config.max_steps_this_run))

    train_iter = None
    if start_step < stop_at:
        train_iter = input_pipeline.make_train_iterator(
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
    window_start, window_steps = time.time(), 0
    pending = []
    for step in range(start_step, stop_at):
        batch = next(train_iter)
        batch = shard_batch({"image": batch["image"], "label": batch["label"]}, batch_sharding)
        state, step_metrics = train_step(state, batch, train_rng)
        pending.append(step_metrics)
        window_steps += 1
        done = step + 1
        if done % log_every == 0 or done == stop_at:
            # One host sync per log interval: average the interval's metrics.
            host = to_host(pending)
            pending = []
            avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
            avg["lr"], avg["lr_head"] = float(host[-1]["lr"]), float(host[-1]["lr_head"])
            elapsed = time.time() - window_start
            avg["images_per_second"] = window_steps * global_batch / max(elapsed, 1e-9)
            window_start, window_steps = time.time(), 0
            if not np.isfinite(avg["loss"]):
                raise TrainingError(
                    f"loss is {avg['loss']} at step {done}; lower the learning rate or enable optimizer.grad_clip_norm"
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
        is_last = done == total_steps
        if (eval_every and done % eval_every == 0) or is_last:
            results = _eval_and_log(
                done, model, state, eval_iter, eval_step, info, config, workdir, writer, batch_sharding, data_config
            )
            if bar is not None:
                bar.write(
                    f"step {done}: mIoU {results['mIoU']:.4f}  mAcc {results['mAcc']:.4f}  aAcc {results['aAcc']:.4f}"
                )
            save_checkpoint(
                manager,
                state,
                {**meta, "mIoU": results["mIoU"]},
                metrics_for_best={"mIoU": float(np.nan_to_num(results["mIoU"], nan=-1.0))},
            )
            window_start = time.time()  # keep eval time out of images/s
        elif (ckpt_every and done % ckpt_every == 0) or done == stop_at:
            save_checkpoint(manager, state, meta)
    if bar is not None:
        bar.close()
    manager.wait_until_finished()

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
    writer.close()
    manager.close()
    return {"step": final_step, **(results or {})}
