"""The folder-dataset input pipeline in numpy + PIL, without TensorFlow (``data.pipeline='python'``).

The same interface, recipe and batches as :mod:`segformer_jax.data.input_pipeline` (its module doc
lists the transforms): random rescale, crop with ``cat_max_ratio`` retries, flip, photometric
distortion, normalisation, padding; eval resize / shrink / align / pad. The arithmetic follows the
tf.data transforms (float32, the same bilinear and nearest sampling, the same rounding), so an eval
batch equals tf.data's and a training example differs only by its random draws. Why it exists: not
importing TensorFlow saves ~0.5 GB of resident memory (the issue-17 b0 run at 256x256 peaks at 1.80-1.87
GB instead of 2.35-2.44 GB, at the same step time). It is what ``data.pipeline='auto'`` runs for folders
when training on the CPU (config.pipeline_of); on accelerator hosts tf.data's C++ threads scale where
Python threads share one interpreter lock.

Training samples only the crop window of the rescaled image (the label's nearest-neighbour rescale is
an index lookup, the image's bilinear one is computed for the window's pixels alone), so a 2x rescale
of a photo costs what the crop does.

Determinism and resuming: epoch ``e`` of a host is a full permutation of its records seeded by
(seed, process_index, e); the augmentation of stream position ``i`` is drawn from a generator seeded
by (seed, process_index, i). ``start_step=k`` yields exactly batch k, k+1, ... of a run started at 0
without touching earlier examples. Host ``p`` of ``P`` reads records p, p+P, p+2P, ...
A run resumed with the other pipeline continues with that pipeline's augmentation stream (the
batches of a run started there), not the one it started with.

May import numpy, PIL and this folder's TensorFlow-free modules (config, folder, palettes).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import os
from collections.abc import Callable, Iterator

import numpy as np

from segformer_jax.data import folder as folder_lib
from segformer_jax.data import palettes
from segformer_jax.data.config import (
    DEFAULT_REDUCE_ZERO_LABEL,
    IGNORE_INDEX,
    DatasetInfo,
    cached_source,
    check_eval_batching,
    check_hosts,
    eval_size_divisor,
    get,
    local_batch_size,
)

MAX_CROP_TRIES = 10
_STREAM_TAG = 0x5E6F  # keeps these seeds apart from others drawn from the same config seed
_F32 = np.float32


# ---------------------------------------------------------------------------- source


def scan(cfg) -> folder_lib.FolderDataset:
    """The (cached) scanned folder dataset of a data config (name='folder')."""
    if not cfg.get("folder"):
        raise folder_lib.FolderDatasetError(
            "data.name='folder' needs data.folder: the path of a folder holding images/ "
            "and masks/ (see segformer_jax/data/folder.py)."
        )
    return cached_source(
        cfg,
        "folder scan",
        lambda: folder_lib.scan_folder(
            cfg.folder,
            val_fraction=float(cfg.get("val_fraction", 0.1)),
            split_seed=int(cfg.get("split_seed", 0)),
            class_names_file=cfg.get("class_names_file", "") or "",
            num_classes=int(cfg.get("num_classes", 0) or 0),
            reduce_zero_label=_reduces_zero_label(cfg),
        ),
    )


def _reduces_zero_label(cfg) -> bool:
    rzl = cfg.get("reduce_zero_label", None)
    return DEFAULT_REDUCE_ZERO_LABEL["folder"] if rzl is None else bool(rzl)


def _split(cfg, which: str) -> folder_lib.FolderSplit:
    fd = scan(cfg)
    name = cfg.get(f"{which}_split", "") or ("train" if which == "train" else "val")
    splits = {"train": fd.train, "val": fd.val, "validation": fd.val}
    if name not in splits:
        raise ValueError(f"Folder datasets have splits 'train' and 'val', not {name!r} (data.{which}_split).")
    return splits[name]


def get_dataset_info(cfg) -> DatasetInfo:
    fd = scan(cfg)
    return DatasetInfo(
        name="folder",
        num_classes=fd.num_classes,
        class_names=list(fd.class_names),
        palette=np.asarray(palettes.get_palette("auto", fd.num_classes), np.uint8),
        num_train_examples=len(_split(cfg, "train")),
        num_eval_examples=len(_split(cfg, "eval")),
    )


_ZERO_LABEL_REDUCED = np.concatenate([[IGNORE_INDEX], np.arange(254), [IGNORE_INDEX]]).astype(np.uint8)


def load_label(split: folder_lib.FolderSplit, index: int, reduce_zero_label: bool) -> np.ndarray:
    """label uint8 [H, W] of train ids (255 = ignore) of one record; reduce_zero_label as mmseg:
    0 -> 255, k -> k-1, 255 stays."""
    label = folder_lib.load_mask(split.mask_paths[index])
    return _ZERO_LABEL_REDUCED[label] if reduce_zero_label else label


def load_pair(split: folder_lib.FolderSplit, index: int, reduce_zero_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], label uint8 [H, W]) of one record."""
    return folder_lib.load_image(split.image_paths[index]), load_label(split, index, reduce_zero_label)


def train_label_counts(cfg, num_classes: int) -> np.ndarray:
    """(num_classes,) int64 pixel counts of the training masks, as `losses.class_pixel_counts`."""
    split, rzl = _split(cfg, "train"), _reduces_zero_label(cfg)
    counts = np.zeros(256, np.int64)
    for i in range(len(split)):
        counts += np.bincount(load_label(split, i, rzl).reshape(-1), minlength=256)
    return counts[:num_classes]


# ------------------------------------------------------------------------ transforms


def rescale_size(h: int, w: int, scale_long, scale_short) -> tuple[int, int]:
    """mmcv imrescale: (h, w) keeping the aspect ratio within (long, short) bounds (float32, as tf.data)."""
    hf, wf = _F32(h), _F32(w)
    factor = min(_F32(scale_long) / max(hf, wf), _F32(scale_short) / min(hf, wf))
    nh = int(np.floor(hf * factor + _F32(0.5)))
    nw = int(np.floor(wf * factor + _F32(0.5)))
    return max(nh, 1), max(nw, 1)


def _source_coords(in_size: int, out_size: int, start: int, stop: int):
    """tf.image.resize bilinear (half-pixel centres, no antialias) along one axis for output
    positions start..stop-1: (lower index, upper index, float32 fraction)."""
    scale = _F32(in_size) / _F32(out_size)
    pos = (np.arange(start, stop, dtype=_F32) + _F32(0.5)) * scale - _F32(0.5)
    low = np.floor(pos)
    frac = (pos - low).astype(_F32)
    low = low.astype(np.int64)
    return np.clip(low, 0, in_size - 1), np.clip(low + 1, 0, in_size - 1), frac


def _nearest_coords(in_size: int, out_size: int, start: int, stop: int) -> np.ndarray:
    """tf.image.resize nearest (half-pixel centres) source indices of output positions start..stop-1."""
    scale = _F32(in_size) / _F32(out_size)
    pos = (np.arange(start, stop, dtype=_F32) + _F32(0.5)) * scale
    return np.minimum(np.floor(pos).astype(np.int64), in_size - 1)


def resize_window(image: np.ndarray, label: np.ndarray, nh: int, nw: int, window=None):
    """The window (y0, x0, h, w) of the image resized to (nh, nw) bilinear, rounded to integer values
    (float32), and of the label resized nearest (uint8), computed for the window's pixels only.
    window None = the whole resized image. The same values tf.data's full resize then slice gives."""
    h, w = label.shape
    y0, x0, wh, ww = window or (0, 0, nh, nw)
    lab = _label_window(label, nh, nw, y0, x0, wh, ww)
    if (nh, nw) == (h, w):
        return image[y0 : y0 + wh, x0 : x0 + ww].astype(_F32), lab
    ylo, yhi, yf = _source_coords(h, nh, y0, y0 + wh)
    xlo, xhi, xf = _source_coords(w, nw, x0, x0 + ww)
    xf = xf[None, :, None]

    def along_width(rows):  # tf's order: across the row first, then between the two rows
        rows = image[rows]
        left = np.take(rows, xlo, axis=1).astype(_F32)
        right = np.take(rows, xhi, axis=1).astype(_F32)
        right -= left
        right *= xf
        right += left
        return right

    out = along_width(ylo)
    bottom = along_width(yhi)
    bottom -= out
    bottom *= yf[:, None, None]
    out += bottom
    np.round(out, out=out)
    np.clip(out, 0.0, 255.0, out=out)
    return out, lab


def crop_ok(label: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg RandomCrop's test: >= 2 classes and none covering >= cat_max_ratio of the valid pixels."""
    counts = np.bincount(label.reshape(-1), minlength=256)
    counts[IGNORE_INDEX] = 0
    total = max(int(counts.sum()), 1)
    return np.count_nonzero(counts) > 1 and counts.max() / total < cat_max_ratio


def _label_window(label, nh, nw, oy, ox, ch, cw):
    """The window (oy, ox, ch, cw) of the label resized nearest to (nh, nw), for its pixels only."""
    h, w = label.shape
    if (nh, nw) == (h, w):
        return label[oy : oy + ch, ox : ox + cw]
    return label[_nearest_coords(h, nh, oy, oy + ch)][:, _nearest_coords(w, nw, ox, ox + cw)]


def _convert(img, alpha=1.0, beta=0.0):
    return np.floor(np.clip(img * _F32(alpha) + _F32(beta), 0.0, 255.0)).astype(_F32)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """tf.image.rgb_to_hsv on float32 RGB in [0, 1]: hue in [0, 1)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    chroma = value - rgb.min(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(value > 0, chroma / value, _F32(0))
        norm = _F32(1) / (_F32(6) * chroma)
        hue = np.where(
            r == value,
            norm * (g - b),
            np.where(g == value, norm * (b - r) + _F32(2 / 6), norm * (r - g) + _F32(4 / 6)),
        )
    hue = np.where(chroma > 0, hue, _F32(0))
    hue = np.where(hue < 0, hue + _F32(1), hue)
    return np.stack([hue, saturation, value], -1).astype(_F32)


# Per hue sector (0..5, and 6 for TF's out-of-range case), which of (c, x, 0) each of r, g, b takes.
_SECTOR_CHANNELS = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 2, 2]], np.intp)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """tf.image.hsv_to_rgb (float32)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    c = s * v
    dh = h * _F32(6)
    x = c * (_F32(1) - np.abs(np.fmod(dh, _F32(2)) - _F32(1)))
    sector = dh.astype(np.int64)
    sector[(sector < 0) | (sector > 5)] = 6
    choices = np.stack([c, x, np.zeros_like(c)], -1)
    rgb = np.take_along_axis(choices, _SECTOR_CHANNELS[sector], -1)
    rgb += (v - c)[..., None]
    return rgb


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, cfg) -> np.ndarray:
    """mmseg PhotoMetricDistortion on float32 RGB 0..255 integer-valued images (as tf.data's)."""
    bd = float(get(cfg, "brightness_delta"))
    c_lo, c_hi = (float(x) for x in get(cfg, "contrast_range"))
    s_lo, s_hi = (float(x) for x in get(cfg, "saturation_range"))
    hue_delta = int(get(cfg, "hue_delta"))
    u = rng.random(10)  # every draw is made, used or not: one example's draws never shift another's

    def between(k, lo, hi):
        return lo + (hi - lo) * u[k]

    if u[0] < 0.5:
        image = _convert(image, beta=between(1, -bd, bd))
    contrast_first = u[2] < 0.5

    def contrast(img):
        return _convert(img, alpha=between(4, c_lo, c_hi)) if u[3] < 0.5 else img

    def from_hsv(hsv):
        return np.clip(np.round(hsv_to_rgb(hsv) * _F32(255)), 0.0, 255.0).astype(_F32)

    if contrast_first:
        image = contrast(image)
    if u[5] < 0.5:
        hsv = rgb_to_hsv(image / _F32(255))
        hsv[..., 1] = _convert(hsv[..., 1] * _F32(255), alpha=between(6, s_lo, s_hi)) / _F32(255)
        image = from_hsv(hsv)
    if hue_delta > 0 and u[7] < 0.5:
        hsv = rgb_to_hsv(image / _F32(255))
        delta = int(np.floor(between(8, -hue_delta, hue_delta)))
        hsv[..., 0] = np.mod(hsv[..., 0] + _F32(delta / 180.0), _F32(1))
        image = from_hsv(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def _normalize(image: np.ndarray, cfg) -> np.ndarray:
    mean = np.asarray(get(cfg, "mean"), _F32)
    std = np.asarray(get(cfg, "std"), _F32)
    return (image - mean) / std


def _pad_to(image, label, out_h, out_w):
    h, w = label.shape
    pads = ((0, out_h - h), (0, out_w - w))
    image = np.pad(image, pads + ((0, 0),), constant_values=0.0)
    label = np.pad(label, pads, constant_values=IGNORE_INDEX)
    return image, label


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, cfg) -> dict:
    """The training transforms (input_pipeline's module doc) of one example:
    {"image": float32 [ch, cw, 3], "label": int32 [ch, cw]}."""
    crop_h, crop_w = (int(x) for x in get(cfg, "crop_size"))
    h, w = label.shape
    scale = get(cfg, "scale")
    scale_w, scale_h = (_F32(x) for x in scale) if scale else (_F32(w), _F32(h))
    ratio_range = get(cfg, "ratio_range")
    r = _F32(rng.uniform(*(float(x) for x in ratio_range))) if ratio_range else _F32(1)
    sw, sh = np.floor(scale_w * r), np.floor(scale_h * r)
    nh, nw = rescale_size(h, w, max(sw, sh), min(sw, sh))

    ch, cw = min(crop_h, nh), min(crop_w, nw)
    offsets = rng.integers(0, [nh - ch + 1, nw - cw + 1], size=(MAX_CROP_TRIES + 1, 2))
    oy, ox = offsets[0]
    cat_max_ratio = float(get(cfg, "cat_max_ratio"))
    if cat_max_ratio < 1.0:
        for oy, ox in offsets:  # the last one is used even if it fails the test, as mmseg's
            if crop_ok(_label_window(label, nh, nw, oy, ox, ch, cw), cat_max_ratio):
                break
    image, label = resize_window(image, label, nh, nw, (int(oy), int(ox), ch, cw))
    if rng.random() < float(get(cfg, "flip_prob")):
        image, label = image[:, ::-1], label[:, ::-1]
    if get(cfg, "photometric"):
        image = photometric_distortion(image, rng, cfg)
    image, label = _pad_to(_normalize(image, cfg), label, crop_h, crop_w)
    return {"image": np.ascontiguousarray(image, _F32), "label": label.astype(np.int32)}


def eval_transform(image: np.ndarray, label: np.ndarray, cfg) -> dict:
    """Eval geometry (input_pipeline's module doc): image / label / image_size, not batched."""
    h, w = label.shape
    eval_scale = get(cfg, "eval_scale")
    pad = get(cfg, "eval_pad_size")
    if eval_scale:
        sw, sh = (float(x) for x in eval_scale)
        nh, nw = rescale_size(h, w, max(sw, sh), min(sw, sh))
    else:
        nh, nw = h, w
    if pad:
        ph, pw = (int(x) for x in pad)
        f = min(_F32(1), _F32(ph) / _F32(nh), _F32(pw) / _F32(nw))
        if f < 1:  # shrink (keeping the ratio) only when the resized image does not fit the pad shape
            nh = min(int(np.floor(_F32(nh) * f + _F32(0.5))), ph)
            nw = min(int(np.floor(_F32(nw) * f + _F32(0.5))), pw)
    divisor = eval_size_divisor(cfg)
    if divisor:
        nh = -(-nh // divisor) * divisor
        nw = -(-nw // divisor) * divisor
    image, label = resize_window(image, label, nh, nw)
    image = _normalize(image, cfg)
    if pad:
        image, label = _pad_to(image, label, ph, pw)
    return {
        "image": np.ascontiguousarray(image, _F32),
        "label": label.astype(np.int32),
        "image_size": np.array([nh, nw], np.int32),
    }


# -------------------------------------------------------------------------- iterators


def _workers(cfg) -> int:
    n = int(get(cfg, "threads") or 0)
    return n if n > 0 else max(1, min(os.cpu_count() or 1, 4))


class _Prefetched:
    """Batches of ``make(item)`` over the items of ``items`` (drawn in the caller's thread), ``batch``
    items each, every batch made and stacked by one worker of a thread pool, up to ``ahead`` batches in
    flight, yielded in order. A worker's exception surfaces at its batch. Whole batches per task: the
    consuming (training) thread waits on one future a batch, not on one per example."""

    def __init__(self, make: Callable[..., dict], items: Iterator, batch: int, workers: int, ahead: int):
        self._pending: collections.deque = collections.deque()
        self._make, self._items, self._batch = make, items, batch
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="segformer-data")
        self._ahead = max(ahead, workers)
        self._fill()

    def _make_batch(self, chunk: list) -> dict:
        examples = [self._make(item) for item in chunk]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def _fill(self):
        while len(self._pending) < self._ahead:
            chunk = list(itertools.islice(self._items, self._batch))
            if not chunk:
                return
            self._pending.append(self._pool.submit(self._make_batch, chunk))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._pending:
            self.close()
            raise StopIteration
        batch = self._pending.popleft().result()
        self._fill()
        return batch

    def close(self):
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit concurrent.futures may already be torn down
            pass


def _host_records(n: int, process_index: int, process_count: int) -> np.ndarray:
    return np.arange(process_index, n, process_count)


def _reading(split, index: int, rzl: bool):
    try:
        return load_pair(split, index, rzl)
    except folder_lib.FolderDatasetError:
        raise
    except Exception as e:  # a truncated or corrupt file found only now: say which
        raise folder_lib.FolderDatasetError(
            f"cannot read {split.image_paths[index]!r} / {split.mask_paths[index]!r}: {type(e).__name__}: {e}. "
            "Fix or remove that pair."
        ) from e


def make_train_iterator(
    data_config,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Infinite iterator of numpy training batches of this host (module doc)."""
    check_hosts(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, process_count)
    split, rzl = _split(data_config, "train"), _reduces_zero_label(data_config)
    records = _host_records(len(split), process_index, process_count)
    n = len(records)
    if n == 0:
        raise ValueError(
            f"The train split of folder {data_config.folder!r} has {len(split)} examples: "
            f"none for host {process_index}/{process_count}."
        )
    shuffle = int(get(data_config, "shuffle_buffer")) > 1
    base = [int(seed), _STREAM_TAG, int(process_index)]

    def stream():  # (stream position, record), epoch by epoch
        epoch, offset = divmod(int(start_step) * local_batch, n)
        while True:
            order = np.random.default_rng(base + [1, epoch]).permutation(n) if shuffle else np.arange(n)
            for k in range(offset, n):
                yield epoch * n + k, int(records[order[k]])
            epoch, offset = epoch + 1, 0

    def make(item) -> dict:
        pos, record = item
        image, label = _reading(split, record, rzl)
        return train_transform(image, label, np.random.default_rng(base + [2, pos]), data_config)

    ahead = int(get(data_config, "prefetch")) + 1  # batches in flight
    return _Prefetched(make, stream(), local_batch, _workers(data_config), ahead)


class EvalIterable:
    """Re-iterable, finite eval batches of one host; ``len()`` = number of batches. Every host yields
    the same number of batches (padding examples have ``valid=False``)."""

    def __init__(self, data_config, batch_size: int, process_index: int, process_count: int):
        self._cfg, self._batch = data_config, batch_size
        split = _split(data_config, "eval")
        self._split, self._rzl = split, _reduces_zero_label(data_config)
        self._records = _host_records(len(split), process_index, process_count)
        per_host = -(-len(split) // process_count)
        self.num_batches = -(-per_host // batch_size)
        self.num_examples = len(self._records)
        pad = get(data_config, "eval_pad_size")
        self._filler_shape = tuple(int(x) for x in pad) if pad else (1, 1)

    def __len__(self) -> int:
        return self.num_batches

    def _make(self, i: int) -> dict:
        if i >= self.num_examples:
            ph, pw = self._filler_shape
            return {
                "image": np.zeros((ph, pw, 3), _F32),
                "label": np.full((ph, pw), IGNORE_INDEX, np.int32),
                "image_size": np.zeros(2, np.int32),
                "valid": np.bool_(False),
            }
        image, label = _reading(self._split, int(self._records[i]), self._rzl)
        return {**eval_transform(image, label, self._cfg), "valid": np.bool_(True)}

    def __iter__(self) -> Iterator[dict]:
        total = self.num_batches * self._batch  # the host's examples, then padding examples
        ahead = int(get(self._cfg, "prefetch")) + 1
        return _Prefetched(self._make, iter(range(total)), self._batch, _workers(self._cfg), ahead)


def make_eval_iterator(data_config, batch_size: int, *, process_index: int = 0, process_count: int = 1) -> EvalIterable:
    """Finite, re-iterable numpy eval batches of this host (input_pipeline's module doc)."""
    check_hosts(process_index, process_count)
    check_eval_batching(data_config, batch_size)
    return EvalIterable(data_config, batch_size, process_index, process_count)
