"""SegFormer training: the NVlabs/mmseg recipe with optax, data parallel over all devices, Orbax
checkpoints with auto-resume, evaluation, TensorBoard / metrics.jsonl / PNG logging.

    from segformer_jax import training
    training.train_and_evaluate(config, workdir)      # config: see configs/default.py

Parallelism: one `jax.sharding.Mesh` over every device of every host with a single 'data' axis. The
batch is sharded along it, parameters / optimiser state / BN statistics are replicated, and the jitted
step is the same program on 1 CPU, a GPU box, a TPU slice or many hosts (XLA inserts the gradient
all-reduce; BatchNorm statistics are over the global batch, i.e. SyncBN, as in the paper's 8-GPU runs).

Determinism: the dropout / drop-path key of step t is fold_in(key(seed), t) and the data stream is
resumed at `start_step`, so a run killed and restarted from its last checkpoint computes the same
parameters, bit for bit on CPU, as one that was never interrupted.

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

import functools
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from segformer_jax import losses, metrics, optim
from segformer_jax.config import SegformerConfig
from segformer_jax.model import SegformerForSemanticSegmentation
from segformer_jax.pretrained import WORKDIR_CHECKPOINTS, WORKDIR_FINAL, init_variables
from segformer_jax.xla_options import init_compiler_options, train_compiler_options

logger = logging.getLogger("segformer_jax.training")

CHECKPOINT_DIR = WORKDIR_CHECKPOINTS   # named in pretrained, which recognises a workdir given as a model
FINAL_DIR = WORKDIR_FINAL
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
    """A run that cannot start or resume as configured; the message says why and what to do."""


class TrainState(train_state.TrainState):
    """flax TrainState (step, params, opt_state, apply_fn, tx) + BatchNorm running statistics.
    `step` counts micro-batches (train_step calls); with gradient accumulation the optimiser
    updates every `grad_accum_steps` of them."""

    batch_stats: Any = None


# ----------------------------------------------------------------------------- distributed


def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` when the config asks for it or SEGFORMER_MULTI_HOST=1; a no-op for
    single-host runs. The coordinator is auto-detected on TPU pods / SLURM / GKE; elsewhere (plain
    multi-node GPU machines, several processes on one CPU host) set SEGFORMER_COORDINATOR=host:port,
    SEGFORMER_NUM_PROCESSES and SEGFORMER_PROCESS_ID in every process. CPU processes exchange
    gradients through gloo."""
    wanted = bool(config.get("multi_host", False)) or os.environ.get("SEGFORMER_MULTI_HOST", "") not in ("", "0")
    if not wanted or jax.distributed.is_initialized():
        return
    explicit = {}
    names = {"coordinator_address": "SEGFORMER_COORDINATOR", "num_processes": "SEGFORMER_NUM_PROCESSES",
             "process_id": "SEGFORMER_PROCESS_ID"}
    given = {k: os.environ[v] for k, v in names.items() if os.environ.get(v)}
    if given:
        missing = [names[k] for k in names if k not in given]
        if missing:
            raise TrainingError(f"multi-host: {', '.join(missing)} not set (SEGFORMER_COORDINATOR, "
                                "SEGFORMER_NUM_PROCESSES and SEGFORMER_PROCESS_ID go together)")
        try:
            explicit = {"coordinator_address": given["coordinator_address"],
                        "num_processes": int(given["num_processes"]), "process_id": int(given["process_id"])}
        except ValueError as e:
            raise TrainingError(f"multi-host: SEGFORMER_NUM_PROCESSES / SEGFORMER_PROCESS_ID must be integers ({e})")
    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION") is None:
        # XLA:CPU has no cross-process collectives by default; on accelerators this setting is unused.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)


def make_mesh(devices=None) -> Mesh:
    """A 1-D 'data' mesh over `devices` (default: every device of every host)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded along 'data' (each host passes its part)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def to_host(tree):
    """Device -> numpy. Replicated arrays are read from one local shard, which also works when they
    are not fully addressable (multi-host)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            shards = sorted(x.addressable_shards, key=lambda s: tuple(i.start or 0 for i in s.index))
            return np.concatenate([np.asarray(s.data) for s in shards], axis=0)
        return np.asarray(x)
    return jax.tree_util.tree_map(get, tree)


# ----------------------------------------------------------------------------- model and state


def _model_overrides(model_config) -> dict:
    """SegformerConfig fields set from config.model (regularisation and implementation choices)."""
    keys = ("drop_path_rate", "classifier_dropout_prob", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "depthwise_conv_impl", "decode_head_impl", "scan_blocks", "remat_blocks")
    out = {k: model_config[k] for k in keys if k in model_config and model_config[k] is not None}
    overrides = model_config.get("overrides") or {}
    out.update({k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(overrides).items()})
    return out


def build_model(config, class_names) -> tuple[SegformerForSemanticSegmentation, dict | None]:
    """-> (model, pretrained variables or None). `config.model.init_from` is a Hugging Face / Flax
    SegFormer directory or an ImageNet MiT (encoder-only) checkpoint; otherwise a fresh `variant`."""
    dtype = _DTYPES.get(config.model.dtype)
    if dtype is None:
        raise TrainingError(f"config.model.dtype={config.model.dtype!r}; choose one of {sorted(_DTYPES)}")
    id2label = {i: str(n) for i, n in enumerate(class_names)}
    if config.model.init_from:
        from segformer_jax.pretrained import from_pretrained
        model, variables = from_pretrained(config.model.init_from, id2label=id2label, dtype=dtype,
                                           seed=config.seed, **_model_overrides(config.model))
        return model, variables
    model_config = SegformerConfig.preset(config.model.variant, num_labels=len(class_names), id2label=id2label,
                                          **_model_overrides(config.model))
    return SegformerForSemanticSegmentation(model_config, dtype=dtype), None


def init_model_variables(model, rng, image_shape=(64, 64, 3)) -> dict:
    """`model.init`, compiled quickly; same values (see `pretrained.init_variables`)."""
    return init_variables(model, rng, tuple(image_shape[:2]))


def create_train_state(model, tx, rng, image_shape, variables=None) -> TrainState:
    """Fresh (or pretrained, when `variables` is given) parameters + optimiser state at step 0."""
    if variables is None:
        variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])


def state_to_tree(state: TrainState) -> dict:
    """The checkpointed part of the state (apply_fn / tx are code, rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state}


def tree_to_state(state: TrainState, tree: Mapping) -> TrainState:
    return state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                         opt_state=tree["opt_state"])


# ----------------------------------------------------------------------------- steps


def make_train_step(config, num_classes: int, lr_schedule: Callable, ignore_index: int = 255):
    """train_step(state, batch, rng) -> (state, metrics); pure, to be jitted."""
    reduction = config.loss.reduction
    accum = max(int(config.optimizer.grad_accum_steps), 1)
    head_mult = float(config.optimizer.head_lr_mult)
    del num_classes

    def train_step(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                             train=True, rngs={"dropout": step_rng}, mutable=["batch_stats"])
            loss = losses.semantic_segmentation_loss(logits, batch["label"], ignore_index=ignore_index,
                                                     reduction=reduction)
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        lr = lr_schedule(state.step // accum)   # lr used by the update this micro-batch belongs to
        out = {"loss": loss, "grad_norm": optim.global_norm(grads), "lr": lr, "lr_head": lr * head_mult}
        return new_state, out

    return train_step


def make_eval_step(model, config, num_classes: int, ignore_index: int = 255):
    """eval_step(variables, batch) -> (confusion matrix (K, K) int32, predictions (B, H, W) int32), pure.
    Logits are upsampled to the label size before the argmax (mmseg / HF post-processing)."""
    mode = config.eval.mode
    crop = tuple(config.eval.crop_size) if config.eval.get("crop_size") else None
    stride = tuple(config.eval.stride) if config.eval.get("stride") else None

    def eval_step(variables, batch):
        def logits_fn(images):
            return model.apply(variables, images)
        images, labels = batch["image"], batch["label"]
        logits = metrics.predict(logits_fn, images, mode=mode, crop=crop, stride=stride, num_classes=num_classes,
                                 out_size=labels.shape[1:3])
        preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        labels = jnp.where(batch["valid"][:, None, None], labels, ignore_index)   # padded examples
        return metrics.confusion_matrix(labels, preds, num_classes, ignore_index), preds

    return eval_step


def evaluate(variables, eval_batches, eval_step_fn, *, num_classes, class_names, batch_sharding,
             num_vis: int = 0, progress: bool = False):
    """Runs `eval_step_fn` (jitted) over all eval batches. -> (results dict, first-batch visual data)."""
    matrix, vis = confusion_over_batches(variables, eval_batches, eval_step_fn, num_classes=num_classes,
                                         batch_sharding=batch_sharding, num_vis=num_vis, progress=progress)
    return metrics.segmentation_metrics(matrix, class_names), vis


def confusion_over_batches(variables, eval_batches, eval_step_fn, *, num_classes, batch_sharding,
                           num_vis: int = 0, progress: bool = False):
    """-> ((K, K) int64 confusion matrix over all eval batches, first-batch visual data)."""
    acc = metrics.ConfusionMatrixAccumulator(num_classes)
    vis = None
    it = eval_batches
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        it = tqdm(eval_batches, desc="eval", leave=False, dynamic_ncols=True)
    for batch in it:
        sizes = batch.get("image_size")
        batch = {k: batch[k] for k in ("image", "label", "valid")}
        global_batch = shard_batch(batch, batch_sharding)
        cm, preds = eval_step_fn(variables, global_batch)
        acc.add(cm, int(np.prod(global_batch["label"].shape)))
        if vis is None and num_vis > 0:
            n = min(num_vis, int(np.sum(batch["valid"])))
            pred = np.array(to_host(preds)[:n])
            for p, (h, w) in zip(pred, sizes[:n] if sizes is not None else ()):
                p[h:], p[:, w:] = -1, -1   # the padding is no image: no class there, left uncoloured
            vis = {"image": batch["image"][:n], "label": batch["label"][:n], "pred": pred}
    return acc.result(), vis


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoint_manager(directory: str, config):
    """Keeps the last `checkpoint.keep` checkpoints plus the best one by validation mIoU. Orbax writes
    each checkpoint into a temporary directory and renames it when complete, so a run killed while
    saving leaves no checkpoint that `latest_step()` would pick up (and the leftovers are removed on
    the next start)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm

    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=int(config.checkpoint.keep)),
        cm.BestN(get_metric_fn=lambda m: m["mIoU"], reverse=False, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=bool(config.checkpoint.async_save),
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def checkpoint_meta(model, config) -> dict:
    return {"model_config": json.loads(model.config.to_json_string(with_impl=True)),
            "model_dtype": config.model.dtype,
            "grad_accum_steps": int(config.optimizer.grad_accum_steps)}


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
        m.pop("mIoU", None)   # recorded with eval checkpoints, not a property of the model
        for k in ignore:
            m.get("model_config", {}).pop(k, None)
            m.get("model_config", {}).get("segformer_jax", {}).pop(k, None)
        return m
    diffs = _describe_differences(strip(stored_meta), strip(current_meta))
    if diffs:
        raise TrainingError(
            f"workdir {workdir} holds a checkpoint (step {step}) of a different model/config:\n    "
            + "\n    ".join(diffs)
            + f"\nUse another --workdir, or delete {os.path.join(workdir, CHECKPOINT_DIR)} to start over.")


def save_checkpoint(manager, state: TrainState, meta: Mapping, *, metrics_for_best=None) -> None:
    import orbax.checkpoint as ocp
    step = int(to_host(state.step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_to_tree(state)),
                                               meta=ocp.args.JsonSave(dict(meta))),
                 metrics=metrics_for_best, force=True)


def restore_checkpoint(manager, step: int, abstract_state: TrainState, meta: Mapping, workdir: str) -> TrainState:
    import orbax.checkpoint as ocp
    stored_meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    check_compatible(stored_meta, meta, workdir, step)
    target = state_to_tree(abstract_state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # orbax raises ValueError / KeyError / ... for tree mismatches
        raise TrainingError(f"cannot restore {workdir}/{CHECKPOINT_DIR}/{step} into this model/optimiser "
                            f"({type(e).__name__}: {e}); use another --workdir") from e
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
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                                    getattr(metadata, "item_metadata", metadata))
    return checkpointer.restore(path, target)


# ----------------------------------------------------------------------------- logging


class MetricWriter:
    """metrics.jsonl + TensorBoard scalars/images; writes only on process 0."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._tb = None
        if enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is optional
                logger.warning("tensorboardX is not installed: no TensorBoard logs")

    def scalars(self, step: int, split: str, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "split": split, **clean}, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{split}/{k}", v, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class TrainingSetup(NamedTuple):
    mesh: Mesh
    replicated: NamedSharding
    batch_sharding: NamedSharding
    state_sharding: Any
    abstract_state: TrainState          # ShapeDtypeStructs with shardings (restore target)
    init_state: Callable[[], TrainState]  # fresh / pretrained state at step 0, sharded
    train_step: Callable                # jitted train_step(state, batch, rng), state donated
    train_rng: jax.Array
    lr_schedule: Callable


def build_training(config, model, pretrained=None, *, num_classes: int, ignore_index: int = 255,
                   devices=None, compiler_options: dict | None = None) -> TrainingSetup:
    """Optimiser, shardings over a 'data' mesh of `devices` (default: all), and the jitted step.
    compiler_options: XLA options of the train step (None: `xla_options.train_compiler_options()`;
        {}: XLA's defaults), e.g. {"xla_backend_optimization_level": 0} in tests
    (faster compiles on CPU, slower steps)."""
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    image_shape = (64, 64, model.config.num_channels)   # parameters do not depend on the image size
    params_shape = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
    tx, lr_schedule = optim.make_optimizer(config.optimizer, int(config.total_steps), params_shape)

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    make_state = functools.partial(create_train_state, model, tx, init_rng, image_shape)
    abstract_state = jax.eval_shape(lambda: make_state(pretrained))
    state_sharding = jax.tree_util.tree_map(lambda _: replicated, abstract_state)
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sharding)

    def init_state():
        lowered = jax.jit(make_state, out_shardings=state_sharding).lower(pretrained)
        return lowered.compile(compiler_options=init_compiler_options())(pretrained)

    train_step = jax.jit(make_train_step(config, num_classes, lr_schedule, ignore_index),
                         in_shardings=(state_sharding, batch_sharding, replicated),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,),
                         compiler_options=train_compiler_options() if compiler_options is None else compiler_options)
    return TrainingSetup(mesh, replicated, batch_sharding, state_sharding, abstract_state, init_state, train_step,
                         train_rng, lr_schedule)


# ----------------------------------------------------------------------------- the loop


def _validate(config) -> None:
    problems = []
    if config.total_steps <= 0:
        problems.append(f"total_steps={config.total_steps} must be > 0")
    if config.batch_size % jax.device_count():
        problems.append(f"batch_size={config.batch_size} is not divisible by the {jax.device_count()} devices")
    if config.eval.batch_size % jax.device_count():
        problems.append(f"eval.batch_size={config.eval.batch_size} (global) is not divisible by the "
                        f"{jax.device_count()} devices")
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
        raise TrainingError(f"cannot read the training config {path} ({e}); is {workdir} a train.py workdir? "
                            "Otherwise pass the config file (--config configs/x.py:variant)") from None
    if not isinstance(saved, dict) or not {"data", "eval", "model"} <= saved.keys():
        raise TrainingError(f"{path} is not a train.py config (a model directory's config.json?); pass the "
                            "config file (--config configs/x.py:variant)")

    def tuples(x):   # JSON turned the config's tuples into lists
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return ml_collections.ConfigDict(tuples(saved))


def _eval_and_log(step, model, state, eval_iter, eval_step_fn, info, config, workdir, writer, batch_sharding,
                  data_config, *, log: bool = True):
    """Evaluate; with `log`, add the results to the metric logs and eval/, images/ (off when a finished
    run is reopened: its last evaluation is already recorded)."""
    from segformer_jax import visualize
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    t0 = time.time()
    results, vis = evaluate(variables, eval_iter, eval_step_fn, num_classes=info.num_classes,
                            class_names=info.class_names, batch_sharding=batch_sharding,
                            num_vis=int(config.eval.num_vis), progress=config.progress_bar)
    seconds = time.time() - t0
    if not log:
        return results
    writer.scalars(step, "eval", {"mIoU": results["mIoU"], "mAcc": results["mAcc"], "aAcc": results["aAcc"],
                                  "seconds": seconds})
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        metrics.save_json({"step": step, **results}, os.path.join(workdir, "eval", f"eval_{step}.json"))
        if vis is not None and len(vis["image"]):
            grid = visualize.comparison_grid(vis["image"], vis["label"], vis["pred"], info.palette,
                                             mean=data_config.mean, std=data_config.std)
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
    total_steps = int(config.total_steps) * accum          # micro-batches; total_steps counts updates
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
    if is_main:   # after the compatibility check: a refused resume leaves the workdir untouched
        _write_config(config, workdir)
        names = ", ".join(info.class_names[:8]) + (", ..." if info.num_classes > 8 else "")
        print(f"Data: {info.name}, {info.num_train_examples} train / {info.num_eval_examples} eval examples, "
              f"{info.num_classes} classes ({names})", flush=True)
    start_step = int(to_host(state.step))
    train_step = setup.train_step
    eval_step = jax.jit(make_eval_step(model, config, info.num_classes, ignore_index),
                        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, batch_sharding))
    eval_iter = input_pipeline.make_eval_iterator(data_config, int(config.eval.batch_size) // jax.process_count(),
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count())
    writer = MetricWriter(workdir, is_main)
    global_batch = int(config.batch_size)
    stop_at = total_steps
    if config.get("max_steps_this_run"):
        stop_at = min(total_steps, start_step + int(config.max_steps_this_run))

    train_iter = None
    if start_step < stop_at:
        train_iter = input_pipeline.make_train_iterator(data_config, global_batch, seed=config.seed,
                                                        start_step=start_step, process_index=jax.process_index(),
                                                        process_count=jax.process_count())
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
                raise TrainingError(f"loss is {avg['loss']} at step {done}; lower the learning rate or enable "
                                    "optimizer.grad_clip_norm")
            writer.scalars(done, "train", avg)
            if bar is not None:
                bar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{avg['lr']:.2e}",
                                img_s=f"{avg['images_per_second']:.1f}", refresh=False)
        if bar is not None:
            bar.update(1)
        is_last = done == total_steps
        if (eval_every and done % eval_every == 0) or is_last:
            results = _eval_and_log(done, model, state, eval_iter, eval_step, info, config, workdir, writer,
                                    batch_sharding, data_config)
            if bar is not None:
                bar.write(f"step {done}: mIoU {results['mIoU']:.4f}  mAcc {results['mAcc']:.4f}  "
                          f"aAcc {results['aAcc']:.4f}")
            save_checkpoint(manager, state, {**meta, "mIoU": results["mIoU"]},
                            metrics_for_best={"mIoU": float(np.nan_to_num(results["mIoU"], nan=-1.0))})
            window_start = time.time()   # keep eval time out of images/s
        elif (ckpt_every and done % ckpt_every == 0) or done == stop_at:
            save_checkpoint(manager, state, meta)
    if bar is not None:
        bar.close()
    manager.wait_until_finished()

    final_step = int(to_host(state.step))
    if final_step >= total_steps:
        if results is None:   # resumed a finished run: evaluate the restored state again (for the export)
            results = _eval_and_log(final_step, model, state, eval_iter, eval_step, info, config, workdir,
                                    writer, batch_sharding, data_config, log=False)
        if is_main:
            from segformer_jax.pretrained import save_pretrained
            variables = to_host({"params": state.params, "batch_stats": state.batch_stats})
            final_dir = save_pretrained(model, variables, os.path.join(workdir, FINAL_DIR), format="flax",
                                        overwrite=True)
            from segformer_jax import inference
            try:   # predict's defaults for this model; the model itself is saved whatever happens here
                inference.save_settings(inference.config_from_training(config), final_dir)
            except (ValueError, OSError) as e:
                logger.warning("could not record the eval settings in %s (%s); predict will use its defaults",
                               final_dir, e)
            metrics.save_json({"step": final_step, **results}, os.path.join(workdir, "eval_results.json"))
            print(f"\nFinal evaluation at step {final_step} ({info.name}, {info.num_eval_examples} images):\n"
                  + metrics.format_table(results), flush=True)
            print(f"mIoU {results['mIoU']:.4f}; final model in {os.path.join(workdir, FINAL_DIR)}", flush=True)
    elif is_main:
        print(f"Stopped at step {final_step // accum} of {int(config.total_steps)} (max_steps_this_run); "
              f"rerun the same command to resume from {workdir}", flush=True)
    writer.close()
    manager.close()
    return {"step": final_step, **(results or {})}
