"""End-to-end training benchmark (issue 17): train.py's own loop on a folder dataset against the
equivalent plain transformers PyTorch eager loop on the same files, float32 and bf16.

The recipe: b0 from scratch, 11 classes, RGB photos of 360x480 (367 train images), random rescale
0.5-2.0 of the image's own size, random 256x256 crop (mmseg cat_max_ratio 0.75, as the folder
config), flip, no photometric distortion, batch 8, HF loss (mean over valid pixels), AdamW 6e-4
(head x10), 100 warmup steps, poly decay.

Rows, each in a fresh subprocess (so its peak RSS is its own; the whole process, as train.py prints):

    torch f32    transformers SegformerForSemanticSegmentation, eager, augmentation in numpy/PIL in the
                 main process (decode, rescale, crop, flip, normalise per step)
    ours f32     segformer_jax.training.train_and_evaluate on configs/folder.py + the recipe's overrides:
                 what `train.py --config configs/folder.py` runs (on the CPU: the python input pipeline,
                 numpy + PIL threads; eval and export at the end)
    ours f32 tf.data input  the same with --config.data.pipeline=tf
    torch bf16   the torch loop under torch.autocast("cpu", dtype=torch.bfloat16)
    ours bf16    ours with --config.model.dtype=bfloat16

Our rows run with the huge-page malloc setting that train.py restarts with (segformer_jax/hugepages.py:
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, where it applies). The torch rows run as a user starts them,
and once more with the same setting ('torch f32 hugepages', 'torch bf16 hugepages'), so that the table
shows what the setting alone gives each loop. `--only "ours f32 no hugepages"` (and bf16) runs ours
without it.

    .venv/bin/python benchmarks/train_e2e.py                                  # 1000 steps, float32 + bf16
    .venv/bin/python benchmarks/train_e2e.py --steps 30 --dtype float32       # a quick look
    .venv/bin/python benchmarks/train_e2e.py --data /path/to/camvid           # real photos (train/ val/)
    .venv/bin/python benchmarks/train_e2e.py --steps 6 --train-images 24 --log-every 2   # smoke test
    .venv/bin/python benchmarks/train_e2e.py --only "ours f32" --set data.threads=2   # a lever, our rows only

s/step is the median over log intervals (`--log-every`, train.py's 50) after the first (compile,
warm-up) of the interval's wall time / its steps: our loop dispatches asynchronously and only
waits for the device at the metrics host sync once per interval, so single steps' wall times would
say how fast steps are queued, not run. Where our time goes, per step: 'input' = blocked in
next(train_iter) (the input pipeline), 'dispatch' = the train_step call returning, 'sync' = the metrics to_host
per interval (it also waits for the queued steps' compute), 'other' = the rest (device_put of the
batch, logging). `--block` adds rows of our loop awaiting every step (block_until_ready): then
'dispatch' is the step's dispatch + compute, and the input wait is no longer overlapped with it.

Without --data, photo-like images are generated once (numpy + PIL, deterministic by --seed) into
--cache (default ~/.cache/segformer_jax/bench_e2e): regions with warped, non-axis-aligned boundaries,
each textured with fractal value noise, stripes and gradients; a class's colour distribution
overlaps the others' (texture tells them apart, not colour); 1-2 px ignore (255) borders.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, fmt_ms, fmt_ratio, run_isolated  # noqa: E402

NUM_CLASSES = 11
CLASS_NAMES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
IMAGE_H, IMAGE_W = 360, 480
CROP = 256
BATCH = 8
LR, HEAD_LR_MULT, WARMUP, WARMUP_RATIO, POLY_POWER, WD = 6e-4, 10.0, 100, 1e-6, 1.0, 0.01
RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO, MAX_CROP_TRIES = 0.75, 10
FLIP_PROB = 0.5
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # ImageNet, 0..255 (the data config's default)
STD = np.array([58.395, 57.12, 57.375], np.float32)
IGNORE = 255


# ------------------------------------------------------------------ photo-like data


def _value_noise(rng, h, w, cell, octaves=3):
    """Fractal value noise in [-1, 1]: random grids upsampled bicubically, halving the cell per octave."""
    import PIL.Image

    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh, gw = max(h // cell, 1) + 2, max(w // cell, 1) + 2
        grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
        up = np.asarray(PIL.Image.fromarray(grid, mode="F").resize((w + 2 * cell, h + 2 * cell), PIL.Image.BICUBIC))
        out += amp * up[cell : cell + h, cell : cell + w]
        total += amp
        amp *= 0.5
        cell = max(cell // 2, 2)
    return out / total


def _class_styles(seed):
    """Per class: a colour mean (weak: mixed with a random colour per region), noise cell size and
    contrast, stripe frequency / angle / strength, gradient strength."""
    rng = np.random.default_rng([seed, 1])
    return [
        dict(
            colour=rng.uniform(60, 200, 3),
            cell=int(rng.choice([4, 8, 16, 32, 64])),
            contrast=float(rng.uniform(0.05, 0.35)),
            stripe_freq=float(rng.choice([0.0, 0.05, 0.1, 0.2, 0.35])),
            stripe_angle=float(rng.uniform(0, np.pi)),
            stripe_amp=float(rng.uniform(0.05, 0.3)),
            gradient=float(rng.uniform(0.0, 0.4)),
        )
        for _ in range(NUM_CLASSES)
    ]


def make_photo(seed, index, styles, h=IMAGE_H, w=IMAGE_W):
    """One (image uint8 [h, w, 3], mask uint8 [h, w]) pair; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, 2, index])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Regions: nearest of K seeds in a domain-warped plane (curved, not axis-aligned boundaries).
    k = int(rng.integers(10, 22))
    seeds = np.stack([rng.uniform(0, h, k), rng.uniform(0, w, k)], 1).astype(np.float32)
    wy = yy + 40 * _value_noise(rng, h, w, 64, 2)
    wx = xx + 40 * _value_noise(rng, h, w, 64, 2)
    d = (wy[..., None] - seeds[:, 0]) ** 2 + (wx[..., None] - seeds[:, 1]) ** 2
    region = np.argmin(d, axis=-1)
    classes = rng.integers(0, NUM_CLASSES, k)
    mask = classes[region].astype(np.uint8)
    image = np.zeros((h, w, 3), np.float32)
    for r in range(k):
        sel = region == r
        if not sel.any():
            continue
        s = styles[classes[r]]
        base = 0.35 * s["colour"] + 0.65 * rng.uniform(30, 225, 3)  # colour overlaps across classes
        ys, xs = np.nonzero(sel)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = y1 - y0, x1 - x0
        tex = s["contrast"] * _value_noise(rng, bh, bw, min(s["cell"], max(min(bh, bw) // 2, 2)))
        if s["stripe_freq"]:
            a = s["stripe_angle"]
            u = np.cos(a) * yy[y0:y1, x0:x1] + np.sin(a) * xx[y0:y1, x0:x1]
            tex += s["stripe_amp"] * np.sin(2 * np.pi * s["stripe_freq"] * u + rng.uniform(0, 2 * np.pi))
        ga = rng.uniform(0, 2 * np.pi)
        g = (
            np.cos(ga) * (yy[y0:y1, x0:x1] - y0) / max(bh, 1) + np.sin(ga) * (xx[y0:y1, x0:x1] - x0) / max(bw, 1)
        ) - 0.5
        tex += s["gradient"] * g
        patch = base[None, None, :] * (1 + tex[..., None]) + rng.normal(0, 4, (bh, bw, 3))
        image[y0:y1, x0:x1][sel[y0:y1, x0:x1]] = patch[sel[y0:y1, x0:x1]]
    # Lighting over the whole picture and sensor noise.
    image *= (1 + 0.25 * _value_noise(rng, h, w, 128, 2))[..., None]
    image += rng.normal(0, 3, image.shape)
    # Ignore borders between regions (CamVid's void): 1-2 px.
    edge = np.zeros((h, w), bool)
    edge[1:] |= region[1:] != region[:-1]
    edge[:, 1:] |= region[:, 1:] != region[:, :-1]
    if rng.uniform() < 0.5:
        edge[1:] |= edge[:-1].copy()
    mask[edge] = IGNORE
    return np.clip(image, 0, 255).astype(np.uint8), mask


def ensure_dataset(cache: str, seed: int, n_train: int, n_val: int) -> str:
    """The generated folder dataset (train/ val/ with images/ masks/, class_names.txt), made once."""
    import PIL.Image

    root = os.path.join(cache, f"photos_{IMAGE_H}x{IMAGE_W}_c{NUM_CLASSES}_s{seed}_{n_train}_{n_val}")
    if os.path.exists(os.path.join(root, "class_names.txt")):
        return root
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache, prefix=".tmp_")
    styles = _class_styles(seed)
    t = time.perf_counter()
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(tmp, split, sub))
        for i in range(n):
            image, mask = make_photo(seed, offset + i, styles)
            PIL.Image.fromarray(image).save(os.path.join(tmp, split, "images", f"{i:05d}.jpg"), quality=92)
            PIL.Image.fromarray(mask).save(os.path.join(tmp, split, "masks", f"{i:05d}.png"))
    with open(os.path.join(tmp, "class_names.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    try:
        os.rename(tmp, root)
    except OSError:  # another process made it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated {n_train} + {n_val} photo-like images in {root} ({time.perf_counter() - t:.0f} s)", flush=True)
    return root


def _pairs(root: str, split: str):
    from segformer_jax.data import folder as folder_lib

    names = sorted(os.listdir(os.path.join(root, split, "images")))
    out = []
    for n in names:
        stem, ext = os.path.splitext(n)
        if ext.lower() in folder_lib.IMAGE_EXTENSIONS:
            out.append((os.path.join(root, split, "images", n), os.path.join(root, split, "masks", stem + ".png")))
    return out


def _eval_pad(root: str):
    """(h, w) covering every val image, rounded up to 32 (the eval's static shape)."""
    import PIL.Image

    h = w = 32
    for img, _ in _pairs(root, "val"):
        with PIL.Image.open(img) as im:
            w, h = max(w, im.width), max(h, im.height)
    return (-(-h // 32) * 32, -(-w // 32) * 32)


# ------------------------------------------------------------------ our loop


def our_config(root: str, steps: int, dtype: str, log_every: int, overrides=()):
    """configs/folder.py's get_config('b0') with the recipe's overrides (the train.py command line:
    --config configs/folder.py --config.data.folder=... --config.total_steps=... and so on)."""
    spec = importlib.util.spec_from_file_location("folder_config", os.path.join(ROOT, "configs", "folder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("b0")
    c.data.folder = root
    c.data.scale = None  # the ratio applies to the image's own size
    c.data.ratio_range = RATIO_RANGE
    c.data.crop_size = (CROP, CROP)
    c.data.cat_max_ratio = CAT_MAX_RATIO
    c.data.flip_prob = FLIP_PROB
    c.data.photometric = False
    c.data.eval_scale = None  # evaluate at the photos' own size
    c.data.eval_pad_size = _eval_pad(root)
    c.batch_size = BATCH
    c.total_steps = steps
    c.model.dtype = dtype
    c.loss.reduction = "valid"  # HF: mean over valid pixels
    c.optimizer.learning_rate = LR
    c.optimizer.head_lr_mult = HEAD_LR_MULT
    c.optimizer.warmup_steps = WARMUP
    c.optimizer.warmup_ratio = WARMUP_RATIO
    c.optimizer.poly_power = POLY_POWER
    c.optimizer.weight_decay = WD
    c.log_every_steps = log_every
    c.eval.every_steps = 0  # evaluate at the end only
    c.eval.batch_size = BATCH
    c.checkpoint.every_steps = 0  # checkpoint at the end only
    c.progress_bar = False
    for item in overrides:  # --set data.threads=1: what --config.data.threads=1 does for train.py
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        current = node[leaf]
        parsed = value if isinstance(current, str) else ast.literal_eval(value)
        node[leaf] = parsed if current is None or isinstance(current, str) else type(current)(parsed)
    return c


def run_ours(args, root: str) -> dict:
    from segformer_jax import training

    config = our_config(root, args.steps, args.dtype_one, args.log_every, args.set)
    timings = {"block": args.block_one}
    workdir = tempfile.mkdtemp(prefix="bench_e2e_")
    try:
        t = time.perf_counter()
        training.train_and_evaluate(config, workdir, timings=timings)
        run_wall = time.perf_counter() - t
        losses = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    train = [m for m in losses if m.get("split") == "train"]
    inputs, steps, syncs = (np.array(timings[k]) for k in ("input", "step", "sync"))
    starts = inputs[:, 0]
    # Interval ends: the end of each host sync (one per log interval, the last at the final step).
    ends = syncs[:, 1]
    bounds = [int(m["step"]) for m in train]  # steps done at each sync
    return dict(
        starts=starts.tolist(),
        interval_ends=ends.tolist(),
        interval_steps=bounds,
        input_s=(inputs[:, 1] - inputs[:, 0]).tolist(),
        step_s=(steps[:, 1] - steps[:, 0]).tolist(),
        sync_s=(syncs[:, 1] - syncs[:, 0]).tolist(),
        loss=float(train[-1]["loss"]),
        run_wall=run_wall,
    )


# ------------------------------------------------------------------ the torch loop


def _rescale_size(h, w, long_side, short_side):
    f = min(long_side / max(h, w), short_side / min(h, w))
    return max(int(np.floor(h * f + 0.5)), 1), max(int(np.floor(w * f + 0.5)), 1)


def augment(rng, image_path, mask_path):
    """The recipe in numpy/PIL: decode, rescale (PIL bilinear / nearest), crop (cat_max_ratio), flip,
    normalise, pad. -> image float32 [crop, crop, 3], label int64 [crop, crop]."""
    import PIL.Image

    with PIL.Image.open(image_path) as im:
        img = im.convert("RGB")
    with PIL.Image.open(mask_path) as m:
        lab = m.copy()
    w, h = img.size
    r = rng.uniform(*RATIO_RANGE)
    sw, sh = int(w * r), int(h * r)
    nh, nw = _rescale_size(h, w, max(sw, sh), min(sw, sh))
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), PIL.Image.BILINEAR)
        lab = lab.resize((nw, nh), PIL.Image.NEAREST)
    img, lab = np.asarray(img), np.asarray(lab)
    mh, mw = max(nh - CROP, 0), max(nw - CROP, 0)
    for _ in range(MAX_CROP_TRIES):
        oy, ox = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        crop = lab[oy : oy + CROP, ox : ox + CROP]
        counts = np.bincount(crop.ravel(), minlength=256)
        counts[IGNORE] = 0
        if np.count_nonzero(counts) > 1 and counts.max() / max(counts.sum(), 1) < CAT_MAX_RATIO:
            break
    img, lab = img[oy : oy + CROP, ox : ox + CROP], lab[oy : oy + CROP, ox : ox + CROP]
    if rng.uniform() < FLIP_PROB:
        img, lab = img[:, ::-1], lab[:, ::-1]
    out_img = np.zeros((CROP, CROP, 3), np.float32)
    out_lab = np.full((CROP, CROP), IGNORE, np.int64)
    ch, cw = lab.shape
    out_img[:ch, :cw] = (img.astype(np.float32) - MEAN) / STD
    out_lab[:ch, :cw] = lab
    return out_img, out_lab


def torch_batches(root: str, seed: int):
    """Infinite batches, a fresh permutation each epoch, augmented in this process."""
    import torch

    pairs = _pairs(root, "train")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(pairs))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            items = [augment(rng, *pairs[j]) for j in order[i : i + BATCH]]
            x = torch.from_numpy(np.stack([a for a, _ in items])).permute(0, 3, 1, 2).contiguous()
            y = torch.from_numpy(np.stack([b for _, b in items]))
            yield x, y


def lr_factor(step: int, total: int) -> float:
    """optim.poly_warmup_schedule / mmcv PolyLrUpdaterHook(warmup='linear') as a multiplier of the peak lr."""
    regular = (1 - min(step, total) / total) ** POLY_POWER
    if step < WARMUP:
        return regular * (WARMUP_RATIO + (1 - WARMUP_RATIO) * step / WARMUP)
    return regular


def run_torch(args, root: str) -> dict:
    import re

    import torch
    import transformers
    from common import HF_VARIANTS

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    cfg = transformers.SegformerConfig(
        num_labels=NUM_CLASSES, drop_path_rate=0.1, classifier_dropout_prob=0.1, **HF_VARIANTS["b0"]
    )
    t_run = time.perf_counter()
    model = transformers.SegformerForSemanticSegmentation(cfg).train()
    groups = {}
    for name, p in model.named_parameters():
        head = name.startswith("decode_head.")
        decay = not re.search(r"layer_norm|batch_norm", name)
        groups.setdefault((head, decay), []).append(p)
    opt = torch.optim.AdamW(
        [
            dict(params=ps, lr=LR * (HEAD_LR_MULT if head else 1.0), weight_decay=WD if decay else 0.0)
            for (head, decay), ps in groups.items()
        ],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
    bf16 = args.dtype_one == "bfloat16"
    batches = torch_batches(root, args.seed)
    starts, input_s, step_s, losses, ends, bounds = [], [], [], [], [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        t2 = time.perf_counter()
        starts.append(t0)
        input_s.append(t1 - t0)
        step_s.append(t2 - t1)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            ends.append(t2)
            bounds.append(step + 1)
    last = (args.steps - 1) // args.log_every * args.log_every
    return dict(
        starts=starts,
        interval_ends=ends,
        interval_steps=bounds,
        input_s=input_s,
        step_s=step_s,
        sync_s=[],
        loss=float(np.mean(losses[last:])),
        run_wall=time.perf_counter() - t_run,
    )


# ------------------------------------------------------------------ the table


def summarise(r: dict) -> dict:
    """s/step: median over log intervals after the first of (interval wall / its steps); with a single
    interval, the median per-step wall after the first half of the steps."""
    starts, ends, bounds = r["starts"], r["interval_ends"], r["interval_steps"]
    n = len(starts)
    per_interval, counted = [], []
    for i in range(1, len(bounds)):
        a, b = bounds[i - 1], bounds[i]
        per_interval.append((ends[i] - ends[i - 1]) / (b - a))
        counted.extend(range(a, b))
    if not per_interval:  # one interval: single steps (exact for torch; dispatch-bound for ours)
        walls = np.diff(np.array(starts + [ends[-1]]))
        counted = list(range(n // 2, n))
        per_interval = list(walls[n // 2 :])
    sps = float(np.median(per_interval))
    first = bounds[0]
    steady = ends[-1] - ends[0] if len(bounds) > 1 else None
    input_s = float(np.mean([r["input_s"][i] for i in counted]))
    step_s = float(np.mean([r["step_s"][i] for i in counted]))
    sync_s = float(np.sum(r["sync_s"][1:]) / max(len(counted), 1)) if r["sync_s"] else 0.0
    return dict(
        s_per_step=sps,
        images_per_s=BATCH / sps,
        loop_wall=ends[-1] - starts[0],
        first_interval=ends[0] - starts[0],
        first_steps=first,
        steady_wall=steady,
        input=input_s,
        dispatch=step_s,
        sync=sync_s,
        other=max(sps - input_s - step_s - sync_s, 0.0),
    )


ROWS = {  # name -> (kind, dtype, block, config overrides of the row, huge-page malloc)
    "torch f32": ("torch", "float32", False, (), False),
    "torch f32 hugepages": ("torch", "float32", False, (), True),
    "ours f32": ("ours", "float32", False, (), True),
    "ours f32 tf.data input": ("ours", "float32", False, ("data.pipeline=tf",), True),
    "ours f32 no hugepages": ("ours", "float32", False, (), False),
    "ours f32 blocked": ("ours", "float32", True, (), True),
    "torch bf16": ("torch", "bfloat16", False, (), False),
    "torch bf16 hugepages": ("torch", "bfloat16", False, (), True),
    "ours bf16": ("ours", "bfloat16", False, (), True),
    "ours bf16 no hugepages": ("ours", "bfloat16", False, (), False),
    "ours bf16 blocked": ("ours", "bfloat16", True, (), True),
}
ONLY_ON_REQUEST = {"ours f32 no hugepages", "ours bf16 no hugepages"}  # ablations: --only


def single(args) -> None:
    kind, args.dtype_one, args.block_one, overrides, _ = ROWS[args.single]
    args.set = [*overrides, *args.set]
    root = args.root
    r = run_torch(args, root) if kind == "torch" else run_ours(args, root)
    from common import peak_rss_mb

    r["peak_rss_mb"] = peak_rss_mb()  # never reset: the whole process, imports and compile included
    print("RESULT " + json.dumps(r), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--dtype", choices=("all", "float32", "bfloat16"), default="all")
    p.add_argument("--data", default="", help="a folder dataset with train/ and val/ (default: generated photos)")
    p.add_argument("--train-images", type=int, default=367, help="generated train images (without --data)")
    p.add_argument("--val-images", type=int, default=24, help="generated val images (our loop evaluates at the end)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/segformer_jax/bench_e2e"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="log interval (configs/folder.py: 50)")
    p.add_argument("--block", action="store_true", help="add rows of our loop awaiting every step")
    p.add_argument("--only", nargs="+", choices=list(ROWS), help="run only these rows")
    p.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides of our rows, e.g. data.threads=1"
    )
    p.add_argument("--single", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        return single(args)

    if args.data:
        root = os.path.abspath(args.data)
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split, "images")):
                p.error(f"--data {root}: no {split}/images (the benchmark needs train/ and val/ folders)")
    else:
        root = ensure_dataset(args.cache, args.seed, args.train_images, args.val_images)
    dtypes = ("float32", "bfloat16") if args.dtype == "all" else (args.dtype,)
    names = [
        n
        for n, (_, dt, blk, _, _) in ROWS.items()
        if dt in dtypes and (n in args.only if args.only else (not blk or args.block) and n not in ONLY_ON_REQUEST)
    ]
    common = ["--steps", str(args.steps), "--seed", str(args.seed), "--log-every", str(args.log_every), "--root", root]
    if args.set:
        common += ["--set", *args.set]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}: b0, {NUM_CLASSES} classes, {len(_pairs(root, 'train'))} train images "
        f"({root}), {CROP}x{CROP} crops, batch {BATCH}, {args.steps} steps, log every {args.log_every}",
        flush=True,
    )
    from segformer_jax import hugepages

    results = {}
    for name in names:
        t = time.perf_counter()
        env = hugepages.environment(enabled=ROWS[name][4])
        r = run_isolated(__file__, ["--single", name, *common], timeout=max(3600, 10 * args.steps), env=env)
        results[name] = {**summarise(r), "loss": r["loss"], "rss": r["peak_rss_mb"], "run_wall": r["run_wall"]}
        s = results[name]
        print(
            f"  {name:18s} {fmt_ms(s['s_per_step'])}/step  {s['images_per_s']:.1f} img/s  loss {s['loss']:.4f}  "
            f"peak RSS {s['rss']:.0f} MB  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )

    def ratio(name, ref):
        return results[name]["s_per_step"] / results[ref]["s_per_step"] if ref in results else None

    print(
        "\n| row | s/step (median) | vs torch f32 | vs torch bf16 | images/s | loop wall (1st interval) | run wall "
        "| peak RSS | vs torch RSS | loss | input | dispatch | sync | other |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        ref_rss = results.get("torch bf16" if "bf16" in name and "torch bf16" in results else "torch f32")
        vs_bf16 = ratio(name, "torch bf16") if "bf16" in name else None
        print(
            f"| {name} | {fmt_ms(s['s_per_step'])} | {fmt_ratio(ratio(name, 'torch f32'))} | {fmt_ratio(vs_bf16)} "
            f"| {s['images_per_s']:.1f} | {s['loop_wall']:.0f} s ({s['first_interval']:.0f} s) | {s['run_wall']:.0f} s "
            f"| {s['rss']:.0f} MB | {fmt_ratio(s['rss'] / ref_rss['rss'] if ref_rss else None)} | {s['loss']:.4f} "
            f"| {fmt_ms(s['input'])} | {fmt_ms(s['dispatch'])} | {fmt_ms(s['sync'])} | {fmt_ms(s['other'])} |"
        )
    print(
        "\ns/step: median over log intervals after the first; input / dispatch / sync / other: mean per step over the "
        "same steps (ours: sync waits for queued compute; 'blocked' rows: dispatch = dispatch + compute; torch, "
        "synchronous: dispatch = the whole step). "
        "loss: mean of the last log interval. run wall: the subprocess's trainer call (ours: compile, eval and export "
        "included)."
    )


if __name__ == "__main__":
    main()
