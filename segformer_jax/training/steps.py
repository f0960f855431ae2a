"""The jitted steps: `train_step(state, batch, rng) -> (state, metrics)` (pure, state donated, rng
folded with the step), `eval_step(variables, batch) -> (confusion, predictions)`, and
`build_training`, which puts the optimiser, the shardings and the compiled step together.

Determinism: the dropout / drop-path key of step t is fold_in(key(seed), t), so a run killed and
restarted from its last checkpoint computes the same parameters, bit for bit on CPU, as one that was
never interrupted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from segformer_jax.evaluation import metrics
from segformer_jax.training import losses, optim
from segformer_jax.training.state import TrainState, create_train_state, make_mesh, shard_batch, to_host
from segformer_jax.xla_options import init_compiler_options, train_compiler_options


def make_train_step(config, num_classes: int, lr_schedule: Callable, ignore_index: int = 255):
    """train_step(state, batch, rng) -> (state, metrics); pure, to be jitted."""
    data_config = config.get("data")
    compute_loss = losses.loss_from_config(  # config.loss.*; raises on a bad one, before any compile
        config.loss,
        num_classes=num_classes,
        ignore_index=ignore_index,
        data_config=data_config,
        crop_size=data_config.get("crop_size") if data_config is not None else None,
    )
    accum = max(int(config.optimizer.grad_accum_steps), 1)
    head_mult = float(config.optimizer.head_lr_mult)

    def train_step(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                batch["image"],
                train=True,
                rngs={"dropout": step_rng},
                mutable=["batch_stats"],
            )
            loss = compute_loss(logits, batch["label"])
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        lr = lr_schedule(state.step // accum)  # lr used by the update this micro-batch belongs to
        out = {"loss": loss, "grad_norm": optim.global_norm(grads), "lr": lr, "lr_head": lr * head_mult}
        return new_state, out

    return train_step


def make_eval_step(model, config, num_classes: int, ignore_index: int = 255):
    """eval_step(variables, batch) -> (confusion matrix (K, K) int32, predictions (B, H, W) int32), pure.
    Logits are upsampled to the label size before the argmax (mmseg / HF post-processing). A binary
    model (one logit channel) predicts foreground (1) where sigmoid(logit) > eval.binary_threshold, and
    its matrix is 2 x 2 (num_classes = 2: background, foreground)."""
    channels = int(model.config.num_labels)
    threshold = float(config.eval.get("binary_threshold", 0.5))
    if channels == 1 and not 0.0 < threshold < 1.0:
        raise ValueError(f"eval.binary_threshold={threshold}; a probability in (0, 1)")
    logit_threshold = math.log(threshold / (1.0 - threshold)) if channels == 1 else 0.0
    mode = config.eval.mode
    crop = tuple(config.eval.crop_size) if config.eval.get("crop_size") else None
    stride = tuple(config.eval.stride) if config.eval.get("stride") else None

    def eval_step(variables, batch):
        def logits_fn(images, valid_size=None):
            return model.apply(variables, images, valid_size=valid_size)

        images, labels = batch["image"], batch["label"]
        # Each image's own size inside the fixed eval shape: its logits are those of the unpadded image.
        # Filler examples of the last batch (valid False, size 0) count as full-size images: no pixel
        # of theirs is scored, and an empty image has no attention keys.
        valid_size = None
        if mode == "whole" and "image_size" in batch:
            full = jnp.asarray(images.shape[1:3], jnp.int32)
            valid_size = jnp.where(batch["valid"][:, None], batch["image_size"].astype(jnp.int32), full)
        logits = metrics.predict(
            logits_fn,
            images,
            mode=mode,
            crop=crop,
            stride=stride,
            num_classes=channels,
            out_size=labels.shape[1:3],
            valid_size=valid_size,
        )
        if channels == 1:
            preds = (logits[..., 0] > logit_threshold).astype(jnp.int32)
        else:
            preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        labels = jnp.where(batch["valid"][:, None, None], labels, ignore_index)  # padded examples
        return metrics.confusion_matrix(labels, preds, num_classes, ignore_index), preds

    return eval_step


def evaluate(
    variables,
    eval_batches,
    eval_step_fn,
    *,
    num_classes,
    class_names,
    batch_sharding,
    num_vis: int = 0,
    progress: bool = False,
):
    """Runs `eval_step_fn` (jitted) over all eval batches. -> (results dict, first-batch visual data)."""
    matrix, vis = confusion_over_batches(
        variables,
        eval_batches,
        eval_step_fn,
        num_classes=num_classes,
        batch_sharding=batch_sharding,
        num_vis=num_vis,
        progress=progress,
    )
    return metrics.segmentation_metrics(matrix, class_names), vis


def confusion_over_batches(
    variables, eval_batches, eval_step_fn, *, num_classes, batch_sharding, num_vis: int = 0, progress: bool = False
):
    """-> ((K, K) int64 confusion matrix over all eval batches, first-batch visual data)."""
    acc = metrics.ConfusionMatrixAccumulator(num_classes)
    vis = None
    it = eval_batches
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        it = tqdm(eval_batches, desc="eval", leave=False, dynamic_ncols=True)
    for batch in it:
        sizes = batch.get("image_size")
        batch = {k: batch[k] for k in ("image", "label", "valid", "image_size") if k in batch}
        global_batch = shard_batch(batch, batch_sharding)
        cm, preds = eval_step_fn(variables, global_batch)
        acc.add(cm, int(np.prod(global_batch["label"].shape)))
        if vis is None and num_vis > 0:
            n = min(num_vis, int(np.sum(batch["valid"])))
            pred = np.array(to_host(preds)[:n])
            for p, (h, w) in zip(pred, sizes[:n] if sizes is not None else ()):
                p[h:], p[:, w:] = -1, -1  # the padding is no image: no class there, left uncoloured
            vis = {"image": batch["image"][:n], "label": batch["label"][:n], "pred": pred}
    return acc.result(), vis


class TrainingSetup(NamedTuple):
    mesh: Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding
    state_sharding: Any
    abstract_state: TrainState  # ShapeDtypeStructs with shardings (restore target)
    init_state: Callable[[], TrainState]  # fresh / pretrained state at step 0, sharded
    train_step: Callable  # jitted train_step(state, batch, rng), state donated
    train_rng: jax.Array
    lr_schedule: Callable


def build_training(
    config,
    model,
    pretrained=None,
    *,
    num_classes: int,
    ignore_index: int = 255,
    devices=None,
    compiler_options: dict | None = None,
) -> TrainingSetup:
    """Optimiser, shardings over a 'data' mesh of `devices` (default: all), and the jitted step.
    compiler_options: XLA options of the train step (None: `xla_options.train_compiler_options()`;
        {}: XLA's defaults), e.g. {"xla_backend_optimization_level": 0} in tests
    (faster compiles on CPU, slower steps)."""
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    image_shape = (64, 64, model.config.num_channels)  # parameters do not depend on the image size
    params_shape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
    tx, lr_schedule = optim.make_optimizer(config.optimizer, int(config.total_steps), params_shape)

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    make_state = functools.partial(create_train_state, model, tx, init_rng, image_shape)
    abstract_state = jax.eval_shape(lambda: make_state(pretrained))
    state_sharding = jax.tree_util.tree_map(lambda _: replicated, abstract_state)
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sharding
    )

    def init_state():
        lowered = jax.jit(make_state, out_shardings=state_sharding).lower(pretrained)
        return lowered.compile(compiler_options=init_compiler_options())(pretrained)

    train_step = jax.jit(
        make_train_step(config, num_classes, lr_schedule, ignore_index),
        in_shardings=(state_sharding, batch_sharding, replicated),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
        compiler_options=train_compiler_options() if compiler_options is None else compiler_options,
    )
    return TrainingSetup(
        mesh, replicated, batch_sharding, state_sharding, abstract_state, init_state, train_step, train_rng, lr_schedule
    )
