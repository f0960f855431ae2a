"""Evaluate a SegFormer on a config's validation split: mIoU, mAcc, aAcc and the per-class table.

    python -m segformer_jax.evaluate --config configs/ade20k.py:b2 --checkpoint runs/ade_b2
    python -m segformer_jax.evaluate --config configs/cityscapes.py:b2 --checkpoint path/to/hf_or_flax_dir \
        --config.eval.mode=slide --output results.json

--checkpoint is either a training workdir (its latest checkpoint, or --step N, or --best by the mIoU
recorded at eval time) or a model directory that `from_pretrained` reads (Hugging Face, our
`save_pretrained` output such as <workdir>/final). The data and eval settings (mode, crop, stride,
batch size) come from --config.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (as for train.py), e.g. configs/ade20k.py:b2; its data and eval fields are used.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, its checkpoints/ dir, or a model dir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: latest).")
_BEST = flags.DEFINE_bool("best", False, "Use the workdir checkpoint with the best recorded mIoU.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results (per-class table included) to this JSON file.")


class EvaluationError(RuntimeError):
    pass


def _checkpoint_dir(path: str) -> str | None:
    from segformer_jax.training import CHECKPOINT_DIR
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.join(path, CHECKPOINT_DIR)
    if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
        return path
    return None


def load_model(path: str, *, step: int | None = None, best: bool = False):
    """-> (model, variables, description) from a workdir checkpoint or a from_pretrained directory."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from segformer_jax.config import SegformerConfig
    from segformer_jax.model import SegformerForSemanticSegmentation

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise EvaluationError(f"{path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")) and _checkpoint_dir(path) is None:
        from segformer_jax.pretrained import from_pretrained
        model, variables = from_pretrained(path)
        return model, variables, path
    ckpt_dir = _checkpoint_dir(path)
    if ckpt_dir is None:
        raise EvaluationError(f"{path} is neither a training workdir (with checkpoints/) nor a model directory "
                              "(with config.json)")
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
    state = restore_state_here(os.path.join(ckpt_dir, str(step)))   # also checkpoints of multi-host runs
    config = SegformerConfig.from_hf_dict(meta["model_config"], source=f"{ckpt_dir}/{step}")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[meta.get("model_dtype", "float32")]
    model = SegformerForSemanticSegmentation(config, dtype=dtype)
    variables = jax.tree_util.tree_map(jnp.asarray, {"params": state["params"], "batch_stats": state["batch_stats"]})
    return model, variables, f"{ckpt_dir}/{step}"


def evaluate_model(config, model, variables) -> dict:
    """Runs the eval split of `config.data` with `config.eval` settings; returns the results dict."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from segformer_jax import training
    from segformer_jax.data import input_pipeline

    info = input_pipeline.get_dataset_info(config.data)
    if model.config.num_labels != info.num_classes:
        raise EvaluationError(f"the model predicts {model.config.num_labels} classes, the dataset "
                              f"{info.name} has {info.num_classes}")
    mesh = training.make_mesh()
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    variables = jax.device_put(variables, replicated)
    eval_step = jax.jit(training.make_eval_step(model, config, info.num_classes, int(info.ignore_index)),
                        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, batch_sharding))
    batches = input_pipeline.make_eval_iterator(config.data, int(config.eval.batch_size) // jax.process_count(),
                                                process_index=jax.process_index(), process_count=jax.process_count())
    results, _ = training.evaluate(variables, batches, eval_step, num_classes=info.num_classes,
                                   class_names=info.class_names, batch_sharding=batch_sharding,
                                   progress=bool(config.progress_bar))
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _CHECKPOINT.value:
        raise app.UsageError("--config and --checkpoint are required")
    from segformer_jax import metrics, training
    logging.set_verbosity(logging.WARNING)
    training.maybe_initialize_distributed(_CONFIG.value)
    model, variables, source = load_model(_CHECKPOINT.value, step=_STEP.value, best=_BEST.value)
    results = evaluate_model(_CONFIG.value, model, variables)
    print(f"{source} on {_CONFIG.value.data.name} ({_CONFIG.value.eval.mode} inference):")
    print(metrics.format_table(results))
    if _OUTPUT.value:
        metrics.save_json({"checkpoint": source, **results}, _OUTPUT.value)
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
