"""Accuracy of the reduced-precision inference paths on a trained model: bf16 compute and int8
weight-only against float32, on the validation split of the training config (train.py's evaluation:
eval_transform geometry, fixed-shape batches, logits upsampled to the label size, argmax).

Per path: pixel argmax agreement with float32 (every pixel inside the images, padding excluded), mIoU
and its difference from float32 in points (100 x mIoU), max-abs logit difference from float32 (the
label-size logits that the argmax reads, inside the images). Prints a markdown table.

    .venv/bin/python train.py                                   # ~1-5 min on a CPU: runs/default/final
    .venv/bin/python scripts/precision_report.py                # that model, configs/default.py's eval data
    .venv/bin/python scripts/precision_report.py --model /tmp/run/final --config configs/default.py

--model: a model directory (save_pretrained: config.json + weights, e.g. WORKDIR/final) or a training
workdir (its latest checkpoint). Exit status 2 when there is no model there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_MODEL = os.path.join(ROOT, "runs", "default", "final")  # what `python train.py` leaves
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")
PATHS = ("float32", "bfloat16", "int8")


def load_config(spec: str):
    """'path/to/config.py[:arg]' -> get_config(arg), as train.py's --config reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("precision_report_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def has_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) or os.path.isdir(os.path.join(path, "checkpoints"))


def label_size_logits_fn(model, config, apply):
    """jit(variables, images, image_size) -> float32 logits at the label size (train.py's eval_step
    without the argmax and the confusion matrix)."""
    import jax
    import jax.numpy as jnp

    from segformer_jax.evaluation import metrics

    mode = config.eval.mode
    crop = tuple(config.eval.crop_size) if config.eval.get("crop_size") else None
    stride = tuple(config.eval.stride) if config.eval.get("stride") else None

    def fn(variables, images, image_size):
        def logits_fn(x, valid_size=None):
            return apply(variables, x, valid_size=valid_size)

        logits = metrics.predict(
            logits_fn,
            images,
            mode=mode,
            crop=crop,
            stride=stride,
            num_classes=int(model.config.num_labels),
            out_size=images.shape[1:3],
            valid_size=image_size if mode == "whole" else None,
        )
        return logits.astype(jnp.float32)

    return jax.jit(fn)


def report(model_path: str, config) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from segformer_jax.data import input_pipeline
    from segformer_jax.deploy import quantize
    from segformer_jax.evaluate import label_confusion, load_model
    from segformer_jax.evaluation import metrics

    info = input_pipeline.get_dataset_info(config.data)
    model, variables, source = load_model(model_path, dtype="float32")
    if model.config.num_labels != info.num_classes:
        raise SystemExit(
            f"error: the model at {model_path} predicts {model.config.num_labels} classes, the config's dataset "
            f"{info.name} has {info.num_classes}: pass the training config with --config"
        )
    bf16_model, bf16_variables, _ = load_model(model_path, dtype="bfloat16")
    qvariables = jax.tree_util.tree_map(jnp.asarray, quantize.quantize_variables(variables))
    paths = {
        "float32": (label_size_logits_fn(model, config, model.apply), variables),
        "bfloat16": (label_size_logits_fn(bf16_model, config, bf16_model.apply), bf16_variables),
        "int8": (label_size_logits_fn(model, config, quantize.quantized_apply(model)), qvariables),
    }
    k, ignore = info.num_classes, int(info.ignore_index)
    matrices = {p: np.zeros((k, k), np.int64) for p in PATHS}
    agree = {p: 0 for p in PATHS}
    max_abs = {p: 0.0 for p in PATHS}
    pixels = 0
    batches = input_pipeline.make_eval_iterator(config.data, int(config.eval.batch_size))
    print(f"{source}: {info.name} validation, {batches.num_examples} images in {len(batches)} batches", file=sys.stderr)
    t = time.perf_counter()
    for batch in batches:
        images, sizes = jnp.asarray(batch["image"]), jnp.asarray(batch["image_size"])
        logits = {p: np.asarray(fn(v, images, sizes)) for p, (fn, v) in paths.items()}
        preds = {p: x.argmax(axis=-1) for p, x in logits.items()}
        for i in np.flatnonzero(batch["valid"]):
            h, w = (int(s) for s in batch["image_size"][i])
            label = batch["label"][i, :h, :w]
            reference = logits["float32"][i, :h, :w]
            pixels += h * w
            for p in PATHS:
                pred = preds[p][i, :h, :w]
                matrices[p] += label_confusion(label, pred, k, ignore)
                agree[p] += int(np.sum(pred == preds["float32"][i, :h, :w]))
                max_abs[p] = max(max_abs[p], float(np.abs(logits[p][i, :h, :w] - reference).max()))
    print(f"evaluated in {time.perf_counter() - t:.0f} s (compiles included)", file=sys.stderr)
    miou = {p: metrics.segmentation_metrics(matrices[p], info.class_names)["mIoU"] for p in PATHS}
    return [
        dict(
            path=p,
            mIoU=miou[p],
            delta_points=100 * (miou[p] - miou["float32"]),
            argmax_agreement=agree[p] / pixels,
            max_abs=max_abs[p],
            pixels=pixels,
        )
        for p in PATHS
    ]


NAMES = {
    "float32": "float32",
    "bfloat16": "bf16 (from_pretrained(dtype='bfloat16'))",
    "int8": "int8 weight-only (quantize_variables + quantized_apply)",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory or training workdir (default: %(default)s)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="training config[:arg] whose eval data is used")
    args = p.parse_args(argv)
    if not has_model(args.model):
        print(
            f"error: no trained model at {args.model}. Make one with `python train.py` (~1-5 min on a CPU; it "
            f"leaves runs/default/final), or pass --model DIR (a model directory or a training workdir).",
            file=sys.stderr,
        )
        return 2
    config = load_config(args.config)
    rows = report(args.model, config)
    print(f"\n{args.model}, {rows[0]['pixels']} validation pixels:\n")
    print("| inference | mIoU | mIoU delta vs float32 | argmax agreement vs float32 | max-abs logit diff vs float32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        reference = r["path"] == "float32"
        print(
            f"| {NAMES[r['path']]} | {100 * r['mIoU']:.2f} | "
            + ("(reference)" if reference else f"{r['delta_points']:+.2f} points")
            + " | "
            + ("-" if reference else f"{100 * r['argmax_agreement']:.3f}%")
            + " | "
            + ("-" if reference else f"{r['max_abs']:.2e}")
            + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
