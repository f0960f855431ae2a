"""Training: everything between a config and a trained model.

    state.py        TrainState, the 'data' device mesh, multi-host setup, the model a config asks for
    steps.py        train_step(state, batch, rng) -> (state, metrics), eval_step, build_training
    checkpoints.py  Orbax checkpoints: keep-last-K + best, resume checks, restore anywhere
    logs.py         metrics.jsonl and TensorBoard
    loop.py         train_and_evaluate(config, workdir): the loop train.py runs
    preemption.py   SIGTERM / SIGINT: stop at the same step on every host, checkpoint, exit codes
    optim.py        AdamW with the paper's schedule (warmup + poly), head lr x10, clipping, accumulation
    losses.py       the segmentation loss (logits upsampled to the labels, ignore index 255)
    recipes.py      the shared pieces of configs/*.py

May import: models, data, evaluation, inference (eval settings, pictures), pretrained, fileio, xla_options.
Never imported by models, data, inference or pretrained.

The names below are the documented API (`from segformer_jax import training; training.build_training`).
"""

from segformer_jax.training.checkpoints import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    check_compatible,
    checkpoint_meta,
    make_checkpoint_manager,
    restore_checkpoint,
    restore_state_here,
    save_checkpoint,
)
from segformer_jax.training.logs import MetricWriter
from segformer_jax.training.loop import read_config, train_and_evaluate
from segformer_jax.training.preemption import EXIT_ABORTED, EXIT_PREEMPTED
from segformer_jax.training.state import (
    TrainingError,
    TrainState,
    build_model,
    create_train_state,
    init_model_variables,
    make_mesh,
    maybe_initialize_distributed,
    shard_batch,
    state_to_tree,
    to_host,
    tree_to_state,
)
from segformer_jax.training.steps import (
    TrainingSetup,
    build_training,
    confusion_over_batches,
    evaluate,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "CHECKPOINT_DIR",
    "FINAL_DIR",
    "check_compatible",
    "checkpoint_meta",
    "make_checkpoint_manager",
    "restore_checkpoint",
    "restore_state_here",
    "save_checkpoint",
    "MetricWriter",
    "EXIT_ABORTED",
    "EXIT_PREEMPTED",
    "read_config",
    "train_and_evaluate",
    "TrainingError",
    "TrainState",
    "build_model",
    "create_train_state",
    "init_model_variables",
    "make_mesh",
    "maybe_initialize_distributed",
    "shard_batch",
    "state_to_tree",
    "to_host",
    "tree_to_state",
    "TrainingSetup",
    "build_training",
    "confusion_over_batches",
    "evaluate",
    "make_eval_step",
    "make_train_step",
]
