"""The training state and the device mesh: TrainState (parameters, optimiser state, BatchNorm
statistics), the 'data' mesh over all devices of all hosts, multi-host initialisation, the model a
config asks for (fresh or from a pretrained checkpoint).

Parallelism: one `jax.sharding.Mesh` over every device of every host with a single 'data' axis. The
batch is sharded along it, parameters / optimiser state / BN statistics are replicated, and the jitted
step is the same program on 1 CPU, a GPU box, a TPU slice or many hosts (XLA inserts the gradient
all-reduce; BatchNorm statistics are over the global batch, i.e. SyncBN, as in the paper's 8-GPU runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding

from segformer_jax.models.config import SegformerConfig
from segformer_jax.models.model import SegformerForSemanticSegmentation
from segformer_jax.pretrained import init_variables

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
    names = {
        "coordinator_address": "SEGFORMER_COORDINATOR",
        "num_processes": "SEGFORMER_NUM_PROCESSES",
        "process_id": "SEGFORMER_PROCESS_ID",
    }
    given = {k: os.environ[v] for k, v in names.items() if os.environ.get(v)}
    if given:
        missing = [names[k] for k in names if k not in given]
        if missing:
            raise TrainingError(
                f"multi-host: {', '.join(missing)} not set (SEGFORMER_COORDINATOR, "
                "SEGFORMER_NUM_PROCESSES and SEGFORMER_PROCESS_ID go together)"
            )
        try:
            explicit = {
                "coordinator_address": given["coordinator_address"],
                "num_processes": int(given["num_processes"]),
                "process_id": int(given["process_id"]),
            }
        except ValueError as e:
            raise TrainingError(
                f"multi-host: SEGFORMER_NUM_PROCESSES / SEGFORMER_PROCESS_ID must be integers ({e})"
            ) from None
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
    keys = (
        "drop_path_rate",
        "classifier_dropout_prob",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "depthwise_conv_impl",
        "decode_head_impl",
        "scan_blocks",
        "remat_blocks",
    )
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

        model, variables = from_pretrained(
            config.model.init_from,
            id2label=id2label,
            dtype=dtype,
            seed=config.seed,
            cast_weights=False,  # float32 master weights
            **_model_overrides(config.model),
        )
        return model, variables
    model_config = SegformerConfig.preset(
        config.model.variant, num_labels=len(class_names), id2label=id2label, **_model_overrides(config.model)
    )
    return SegformerForSemanticSegmentation(model_config, dtype=dtype), None


def init_model_variables(model, rng, image_shape=(64, 64, 3)) -> dict:
    """`model.init`, compiled quickly; same values (see `pretrained.init_variables`)."""
    return init_variables(model, rng, tuple(image_shape[:2]))


def create_train_state(model, tx, rng, image_shape, variables=None) -> TrainState:
    """Fresh (or pretrained, when `variables` is given) parameters + optimiser state at step 0."""
    if variables is None:
        variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )
    # flax's step=0 is a weakly typed int32, a restored checkpoint's a plain one: the train step would
    # compile a second program after every resume, with the persistent compilation cache missing it.
    return state.replace(step=jnp.zeros((), jnp.int32))


def state_to_tree(state: TrainState) -> dict:
    """The checkpointed part of the state (apply_fn / tx are code, rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def tree_to_state(state: TrainState, tree: Mapping) -> TrainState:
    return state.replace(
        step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"], opt_state=tree["opt_state"]
    )
