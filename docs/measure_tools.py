"""Measurements quoted in the README (Tools section): predict over 200 mixed-size images (compilations, time)
and int8 weight-only quantization (size, speed, pixel agreement, mIoU) on a trained model.

    .venv/bin/python docs/measure_tools.py --model /tmp/learn_run/final [--images 200] [--eval 64]

The model is a `from_pretrained` directory trained on `synthetic_shapes` (ground truth is generated
with the same generator, so mIoU is measured without any dataset download).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

import segformer_jax as sj
from segformer_jax import inference
from segformer_jax import predict as P
from segformer_jax.data.synthetic_shapes import generate_example
from segformer_jax.deploy import quantize as Q


def miou(preds, labels, num_classes):
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for p, t in zip(preds, labels):
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
    valid = union > 0
    return float(np.mean(inter[valid] / union[valid]))


def timeit(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/learn_run/final")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--bucket", type=int, default=64)
    args = ap.parse_args()
    out = {}
    model, variables = sj.from_pretrained(args.model)
    n = model.config.num_labels
    work = tempfile.mkdtemp(prefix="measure-")

    # ---------------------------------------------------------------- predict: 200 mixed sizes
    rng = np.random.default_rng(0)
    img_dir = os.path.join(work, "images")
    os.makedirs(img_dir)
    sizes = []
    for i in range(args.images):
        image, _ = generate_example(rng, 160)
        h, w = int(rng.integers(72, 161)), int(rng.integers(72, 161))
        Image.fromarray(image[:h, :w]).save(os.path.join(img_dir, f"{i:03d}.png"))
        sizes.append((h, w))
    cfg = inference.InferenceConfig("whole", scale=None, bucket=args.bucket)
    forward = inference.TiledForward.from_model(model, variables, batch_size=8)
    t = time.perf_counter()
    result = P.predict([img_dir], model, os.path.join(work, "out"), forward=forward, config=cfg, progress=False)
    total = time.perf_counter() - t
    out["predict"] = {
        "images": args.images,
        "distinct_sizes": len(set(sizes)),
        "buckets": sorted(inference.tile_shapes(sizes, cfg)),
        "compilations": result.compilations,
        "failed": len(result.failed),
        "seconds_total": round(total, 1),
    }
    t = time.perf_counter()
    result2 = P.predict([img_dir], model, os.path.join(work, "out2"), forward=forward, config=cfg, progress=False)
    out["predict"]["seconds_second_run_no_compile"] = round(time.perf_counter() - t, 1)
    out["predict"]["compilations_second_run"] = result2.compilations
    print(json.dumps(out, indent=1), flush=True)

    # ---------------------------------------------------------------- quantization
    f32_dir = sj.save_pretrained(model, variables, os.path.join(work, "f32_hf"), format="hf")
    flax_dir = sj.save_pretrained(model, variables, os.path.join(work, "f32_flax"), format="flax")
    qvars = Q.quantize_variables(variables)
    q_dir = Q.save_quantized(model, qvars, os.path.join(work, "int8"))
    model_q, qvars = Q.load_quantized(q_dir)
    sizes_q = {
        "f32_safetensors_bytes": Q.checkpoint_bytes(os.path.join(f32_dir, "model.safetensors")),
        "f32_orbax_dir_bytes": Q.checkpoint_bytes(os.path.join(flax_dir, "flax_variables")),
        "int8_safetensors_bytes": Q.checkpoint_bytes(os.path.join(q_dir, Q.QUANTIZED_WEIGHTS_NAME)),
    }
    sizes_q["ratio_vs_safetensors"] = round(sizes_q["f32_safetensors_bytes"] / sizes_q["int8_safetensors_bytes"], 2)

    erng = np.random.default_rng(1234)
    examples = [generate_example(erng, 128) for _ in range(args.eval)]
    images = sj.normalize_images(np.stack([e[0] for e in examples]))
    labels = [e[1] for e in examples]
    f32_fn = jax.jit(model.apply)
    q_fn = jax.jit(Q.quantized_apply(model_q))
    from segformer_jax.models.decode_head import upsample_bilinear

    up = jax.jit(lambda logits: upsample_bilinear(logits, (128, 128)).argmax(-1))
    pf, pq = [], []
    for s in range(0, len(images), 8):
        pf += list(np.asarray(up(f32_fn(variables, images[s : s + 8]))))
        pq += list(np.asarray(up(q_fn(qvars, images[s : s + 8]))))
    agreement = float(np.mean([np.mean(a == b) for a, b in zip(pf, pq)]))
    m_f, m_q = miou(pf, labels, n), miou(pq, labels, n)
    batch = images[:8]
    out["quantization"] = {
        **sizes_q,
        "pixel_argmax_agreement": round(agreement, 5),
        "mIoU_f32": round(m_f, 4),
        "mIoU_int8": round(m_q, 4),
        "mIoU_delta_points": round(100 * (m_q - m_f), 3),
        "eval_images": args.eval,
        "ms_per_batch8_128px_f32": round(1000 * timeit(f32_fn, variables, batch), 1),
        "ms_per_batch8_128px_int8": round(1000 * timeit(q_fn, qvars, batch), 1),
    }
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
