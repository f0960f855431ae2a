"""tf.data input pipelines for SegFormer: the NVlabs/mmseg training recipe.

Interface used by the training loop::

    from segformer_jax.data import input_pipeline
    cfg = input_pipeline.default_data_config()          # or dataset_preset('scene_parse150')
    info = input_pipeline.get_dataset_info(cfg)
    #   .num_classes, .class_names, .palette [C,3] uint8, .num_train_examples,
    #   .num_eval_examples, .ignore_index (255), .name
    train_iter = input_pipeline.make_train_iterator(
        cfg, global_batch_size, seed=0, start_step=0, process_index=0, process_count=1)
    #   infinite; dicts {"image": float32 [B_local, crop_h, crop_w, 3] (normalised),
    #                    "label": int32 [B_local, crop_h, crop_w] (255 = ignore)}
    eval_iter = input_pipeline.make_eval_iterator(cfg, batch_size,
                                                  process_index=0, process_count=1)
    #   finite and re-iterable (len() = batches per host); dicts
    #   {"image": float32 [B, H, W, 3], "label": int32 [B, H, W] (255 on padding),
    #    "valid": bool [B] (False = example padded in to fill the last batch),
    #    "image_size": int32 [B, 2] (h, w of the resized image before padding)}
    originals, n = input_pipeline.make_original_eval_dataset(cfg, process_index=0, process_count=1)
    #   unbatched {"image": uint8 [H, W, 3], "label": uint8 [H, W]} at the original size
    #   (scoring at the original resolution, mmseg's test protocol: segformer_jax.evaluate)

Training transforms (per example, in this order, as mmseg's SegFormer configs):

1. ``Resize(img_scale=scale, ratio_range)``: ratio r ~ U(ratio_range), target scale
   ``(int(scale_w*r), int(scale_h*r))``, resize keeping the aspect ratio so the long
   side <= max(target) and the short side <= min(target) (mmcv ``imrescale``; size
   rounded with ``int(x*f + 0.5)``). Image bilinear (rounded to uint8 values), label
   nearest.
2. ``RandomCrop(crop_size, cat_max_ratio)``: up to 10 crop positions are tried until
   one has >= 2 classes and no class covering >= cat_max_ratio of the non-ignored
   pixels; otherwise an 11th position is used as is (mmseg semantics).
3. ``RandomFlip(prob=flip_prob)``: horizontal, image and label together.
4. ``PhotoMetricDistortion``: each with probability 1/2: brightness +U(-32, 32);
   contrast *U(0.5, 1.5) (before or after the colour changes, 1/2 each);
   saturation *U(0.5, 1.5) in HSV; hue + randint(-18, 18) in OpenCV's 0..180 hue
   units; values clipped and truncated to uint8 after each step as mmcv does.
5. ``Normalize``: (x - mean) / std on RGB 0..255.
6. ``Pad`` to crop_size at the bottom/right: image 0 (after normalisation), label 255.

Eval: resize keeping aspect ratio to ``eval_scale`` (mmseg ``Resize(keep_ratio=True)``;
``eval_scale=None`` keeps the original size), shrink further (keeping ratio) only if
the result does not fit ``eval_pad_size``, round the size up to a multiple of
``eval_size_divisor`` if set (NVlabs ``AlignedResize``, one resize to the aligned size
where NVlabs resizes twice), normalise, pad to ``eval_pad_size``
(bottom/right, image 0, label 255). The label is resized with nearest at the same
geometry. For sliding-window inference run the windows over ``image`` (the valid
area is ``image_size``); for whole-image inference use it directly.

Determinism and resuming: all randomness is stateless. The order of epoch ``e`` on a
host is a seeded shuffle (buffer ``shuffle_buffer``) of the host's records, seeded by
(seed, process_index, e); the augmentation of the i-th example of a host's stream is
seeded by (seed, process_index, i). Batch k of a host holds stream positions
[k*B_local, (k+1)*B_local). ``start_step=k`` starts the stream at position
k*B_local by skipping *undecoded* records of the current epoch only, so it yields
exactly batch k, k+1, ... of a run started at 0, cheaply.

Multi-host: host ``process_index`` of ``process_count`` reads every
``process_count``-th record (``Dataset.shard``; records are decoded only by their
host), so hosts see disjoint examples. Pass ``jax.process_index()`` /
``jax.process_count()``; this module does not import jax.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from segformer_jax.data import sources
from segformer_jax.data.config import (  # noqa: F401  (re-exported: the config lives in config.py)
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetInfo,
    cached_source,
    check_eval_batching,
    check_hosts,
    clear_source_cache,
    dataset_preset,
    default_data_config,
    eval_size_divisor,
    local_batch_size,
    source_key,
)
from segformer_jax.data.config import get as _get

_MAX_CROP_TRIES = 10

# The transforms are written with explicit tf.cond / tf.while_loop (Python `if` only on config
# values), so tf.data need not run AutoGraph over them: converting their source took ~2.5 of the
# ~4.6 s a tiny run spent building its two pipelines and reading their first batches (2-core VM).
_graph_function = tf.autograph.experimental.do_not_convert


def get_source(cfg) -> sources.Source:
    """The (cached) :class:`sources.Source` of a data config."""
    return cached_source(cfg, "tf", lambda: sources.get_source(cfg))


def get_dataset_info(data_config) -> DatasetInfo:
    src = get_source(data_config)
    return DatasetInfo(
        name=src.name,
        num_classes=src.num_classes,
        class_names=list(src.class_names),
        palette=np.asarray(src.palette, np.uint8),
        num_train_examples=src.num_examples(src.train_split),
        num_eval_examples=src.num_examples(src.eval_split),
    )


# ------------------------------------------------------------------------ transforms


def _rescale_size(h, w, scale_long, scale_short):
    """mmcv imrescale: new (h, w) keeping aspect ratio within (long, short) bounds."""
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    factor = tf.minimum(
        tf.cast(scale_long, tf.float32) / tf.maximum(hf, wf), tf.cast(scale_short, tf.float32) / tf.minimum(hf, wf)
    )
    nh = tf.cast(tf.floor(hf * factor + 0.5), tf.int32)
    nw = tf.cast(tf.floor(wf * factor + 0.5), tf.int32)
    return tf.maximum(nh, 1), tf.maximum(nw, 1)


def _resize_pair(image, label, nh, nw):
    """Image bilinear (rounded to uint8 values, as cv2 on uint8), label nearest.

    A no-op (but for the float32 cast) when the size does not change.
    """
    image = tf.cast(image, tf.float32)
    same = tf.logical_and(tf.equal(tf.shape(image)[0], nh), tf.equal(tf.shape(image)[1], nw))

    def resize():
        img = tf.image.resize(image, tf.stack([nh, nw]), method="bilinear", antialias=False)
        img = tf.clip_by_value(tf.round(img), 0.0, 255.0)
        lab = tf.image.resize(label[..., None], tf.stack([nh, nw]), method="nearest")[..., 0]
        return img, lab

    image, label = tf.cond(same, lambda: (image, label), resize)
    return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(label, [None, None])


def _uniform(key, minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform([], seed=key, minval=minval, maxval=maxval)


def _coin(key):
    """numpy's random.randint(2) == 1 (probability 1/2)."""
    return _uniform(key) < 0.5


def _crop_ok(label, oy, ox, crop_h, crop_w, cat_max_ratio):
    crop = label[oy : oy + crop_h, ox : ox + crop_w]
    counts = tf.math.bincount(tf.reshape(tf.cast(crop, tf.int32), [-1]), minlength=256, maxlength=256, dtype=tf.int32)
    counts = tf.tensor_scatter_nd_update(counts, [[IGNORE_INDEX]], [0])
    present = tf.math.count_nonzero(counts)
    total = tf.reduce_sum(counts)
    ratio = tf.cast(tf.reduce_max(counts), tf.float32) / tf.cast(tf.maximum(total, 1), tf.float32)
    return tf.logical_and(present > 1, ratio < cat_max_ratio)


def _random_crop(image, label, crop_h, crop_w, cat_max_ratio, key):
    h, w = tf.shape(label)[0], tf.shape(label)[1]
    margin_h = tf.maximum(h - crop_h, 0)
    margin_w = tf.maximum(w - crop_w, 0)

    def offsets(i):
        k = tf.random.fold_in(key, tf.cast(i, tf.int64))
        oy = tf.random.stateless_uniform([], seed=k, minval=0, maxval=margin_h + 1, dtype=tf.int32)
        k2 = tf.random.fold_in(k, 1)
        ox = tf.random.stateless_uniform([], seed=k2, minval=0, maxval=margin_w + 1, dtype=tf.int32)
        return oy, ox

    oy, ox = offsets(0)
    if cat_max_ratio < 1.0:

        def cond(i, oy, ox):
            return tf.logical_and(
                i < _MAX_CROP_TRIES, tf.logical_not(_crop_ok(label, oy, ox, crop_h, crop_w, cat_max_ratio))
            )

        def body(i, oy, ox):
            oy, ox = offsets(i + 1)
            return i + 1, oy, ox

        _, oy, ox = tf.while_loop(cond, body, [tf.constant(0), oy, ox])
    return (image[oy : oy + crop_h, ox : ox + crop_w], label[oy : oy + crop_h, ox : ox + crop_w])


def _convert(img, alpha=1.0, beta=0.0):
    """mmseg PhotoMetricDistortion.convert: x*alpha + beta, clip, truncate to uint8."""
    return tf.floor(tf.clip_by_value(img * alpha + beta, 0.0, 255.0))


def photometric_distortion(image, key, cfg):
    """mmseg PhotoMetricDistortion on float32 RGB 0..255 (integer-valued) images."""
    keys = tf.random.split(key, 10)
    bd = float(_get(cfg, "brightness_delta"))
    c_lo, c_hi = (float(x) for x in _get(cfg, "contrast_range"))
    s_lo, s_hi = (float(x) for x in _get(cfg, "saturation_range"))
    hue_delta = int(_get(cfg, "hue_delta"))

    # brightness
    image = tf.cond(_coin(keys[0]), lambda: _convert(image, beta=_uniform(keys[1], -bd, bd)), lambda: image)
    contrast_first = _coin(keys[2])  # mmseg: mode == 1 -> contrast before colour

    def contrast(img):
        return tf.cond(_coin(keys[3]), lambda: _convert(img, alpha=_uniform(keys[4], c_lo, c_hi)), lambda: img)

    image = tf.cond(contrast_first, lambda: contrast(image), lambda: image)

    def to_hsv(img):
        return tf.image.rgb_to_hsv(img / 255.0)

    def from_hsv(hsv):
        return tf.clip_by_value(tf.round(tf.image.hsv_to_rgb(hsv) * 255.0), 0.0, 255.0)

    def saturation(img):
        hsv = to_hsv(img)
        s = _convert(hsv[..., 1] * 255.0, alpha=_uniform(keys[6], s_lo, s_hi)) / 255.0
        return from_hsv(tf.stack([hsv[..., 0], s, hsv[..., 2]], axis=-1))

    image = tf.cond(_coin(keys[5]), lambda: saturation(image), lambda: image)

    def hue(img):
        hsv = to_hsv(img)
        delta = tf.random.stateless_uniform([], seed=keys[8], minval=-hue_delta, maxval=hue_delta, dtype=tf.int32)
        h = tf.math.floormod(hsv[..., 0] + tf.cast(delta, tf.float32) / 180.0, 1.0)
        return from_hsv(tf.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))

    if hue_delta > 0:
        image = tf.cond(_coin(keys[7]), lambda: hue(image), lambda: image)
    image = tf.cond(contrast_first, lambda: image, lambda: contrast(image))
    return image


def _normalize(image, cfg):
    mean = tf.constant(_get(cfg, "mean"), tf.float32)
    std = tf.constant(_get(cfg, "std"), tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std


def _pad_to(image, label, out_h, out_w):
    h, w = tf.shape(label)[0], tf.shape(label)[1]
    pads = [[0, out_h - h], [0, out_w - w]]
    image = tf.pad(image, pads + [[0, 0]], constant_values=0.0)
    label = tf.pad(label, pads, constant_values=IGNORE_INDEX)
    return tf.ensure_shape(image, [out_h, out_w, 3]), tf.ensure_shape(label, [out_h, out_w])


def train_transform(image, label, key, cfg):
    """The training transforms (module doc) of one example.

    Args: image uint8 [H, W, 3], label uint8 [H, W] (train ids, 255 ignore), key: a
    stateless seed (int64 [2]). Returns {"image": float32 [ch, cw, 3], "label": int32
    [ch, cw]}.
    """
    crop_h, crop_w = (int(x) for x in _get(cfg, "crop_size"))
    keys = tf.random.split(key, 4)
    scale = _get(cfg, "scale")
    if scale:
        scale_w, scale_h = (tf.constant(float(x)) for x in scale)
    else:  # mmseg img_scale=None: the ratio applies to the image's own size
        scale_w = tf.cast(tf.shape(image)[1], tf.float32)
        scale_h = tf.cast(tf.shape(image)[0], tf.float32)
    ratio_range = _get(cfg, "ratio_range")
    if ratio_range:
        r = _uniform(keys[0], float(ratio_range[0]), float(ratio_range[1]))
    else:
        r = tf.constant(1.0)
    # mmseg: scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    sw = tf.floor(scale_w * r)
    sh = tf.floor(scale_h * r)
    nh, nw = _rescale_size(tf.shape(image)[0], tf.shape(image)[1], tf.maximum(sw, sh), tf.minimum(sw, sh))
    image, label = _resize_pair(image, label, nh, nw)
    image, label = _random_crop(image, label, crop_h, crop_w, float(_get(cfg, "cat_max_ratio")), keys[1])
    flip = _uniform(keys[2]) < float(_get(cfg, "flip_prob"))
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    label = tf.cond(flip, lambda: label[:, ::-1], lambda: label)
    if _get(cfg, "photometric"):
        image = photometric_distortion(image, keys[3], cfg)
    image = _normalize(image, cfg)
    image, label = _pad_to(image, label, crop_h, crop_w)
    return {"image": image, "label": tf.cast(label, tf.int32)}


def eval_transform(image, label, cfg):
    """Eval geometry (module doc). Returns image/label/image_size (not batched)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    eval_scale = _get(cfg, "eval_scale")
    pad = _get(cfg, "eval_pad_size")
    if eval_scale:
        sw, sh = (float(x) for x in eval_scale)
        nh, nw = _rescale_size(h, w, max(sw, sh), min(sw, sh))
    else:
        nh, nw = h, w
    if pad:
        ph, pw = (int(x) for x in pad)
        # Shrink (keep ratio) only when the resized image does not fit the pad shape.
        f = tf.minimum(1.0, tf.minimum(ph / tf.cast(nh, tf.float32), pw / tf.cast(nw, tf.float32)))
        nh = tf.where(f < 1.0, tf.minimum(tf.cast(tf.floor(tf.cast(nh, tf.float32) * f + 0.5), tf.int32), ph), nh)
        nw = tf.where(f < 1.0, tf.minimum(tf.cast(tf.floor(tf.cast(nw, tf.float32) * f + 0.5), tf.int32), pw), nw)
    divisor = eval_size_divisor(cfg)
    if divisor:  # NVlabs AlignedResize; fits the pad shape, a multiple of the divisor (checked)
        nh = (nh + divisor - 1) // divisor * divisor
        nw = (nw + divisor - 1) // divisor * divisor
    image, label = _resize_pair(image, label, nh, nw)
    image = _normalize(image, cfg)
    if pad:
        image, label = _pad_to(image, label, ph, pw)
    return {"image": image, "label": tf.cast(label, tf.int32), "image_size": tf.stack([nh, nw])}


# -------------------------------------------------------------------------- datasets


def _num_calls(cfg):
    n = int(_get(cfg, "num_parallel_calls"))
    return tf.data.AUTOTUNE if n < 0 else max(n, 1)


def _options(data_config=None):
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    if data_config is not None:
        # On few cores tf.data's threads compete with XLA's for the same cores (data_config.threads).
        threads = int(_get(data_config, "threads") or 0)
        if threads > 0:
            options.threading.private_threadpool_size = threads
            options.threading.max_intra_op_parallelism = 1
    return options


def _shard_size(n: int, process_index: int, process_count: int) -> int:
    return len(range(process_index, n, process_count))


def make_train_dataset(
    data_config,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """The (infinite, batched) training tf.data.Dataset of this host. See module doc."""
    check_hosts(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, process_count)
    src = get_source(data_config)
    n_total = src.num_examples(src.train_split)
    n = _shard_size(n_total, process_index, process_count)
    if n == 0:
        raise ValueError(
            f"The train split {src.train_split!r} of {src.name!r} has "
            f"{n_total} examples: none for host {process_index}/{process_count}."
        )
    records = src.records(src.train_split).shard(process_count, process_index)
    start_pos = int(start_step) * local_batch
    start_epoch, offset = divmod(start_pos, n)
    base = tf.random.fold_in(tf.constant([int(seed), 0x5E6F], tf.int64), process_index)
    shuffle_key = tf.random.fold_in(base, 1)
    augment_key = tf.random.fold_in(base, 2)
    buffer = min(int(_get(data_config, "shuffle_buffer")), n)

    @_graph_function
    def epoch_records(epoch):
        ds = records
        if buffer > 1:
            epoch_seed = tf.random.stateless_uniform(
                [], seed=tf.random.fold_in(shuffle_key, epoch), minval=1, maxval=2**62, dtype=tf.int64
            )
            ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        return ds.skip(tf.where(epoch == start_epoch, tf.constant(offset, tf.int64), tf.constant(0, tf.int64)))

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)
    ds = ds.enumerate(start=start_pos)

    @_graph_function
    def process(pos, record):
        image, label = src.decode(record)
        return train_transform(image, label, tf.random.fold_in(augment_key, pos), data_config)

    ds = ds.map(process, num_parallel_calls=_num_calls(data_config), deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(int(_get(data_config, "prefetch")))
    return ds.with_options(_options(data_config))


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
    ds = make_train_dataset(
        data_config,
        global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )
    return ds.as_numpy_iterator()


class EvalIterable:
    """Re-iterable, finite eval batches of one host; ``len()`` = number of batches.

    Every host yields the same number of batches (padding with ``valid=False``).
    """

    def __init__(self, dataset: tf.data.Dataset, num_batches: int, num_examples: int):
        self.dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # real examples of this host

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        return self.dataset.as_numpy_iterator()


def make_eval_dataset(
    data_config, batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> tuple[tf.data.Dataset, int, int]:
    """(dataset, num_batches, num_real_examples) of the eval split for one host."""
    check_hosts(process_index, process_count)
    check_eval_batching(data_config, batch_size)
    pad = _get(data_config, "eval_pad_size")
    src = get_source(data_config)
    n_total = src.num_examples(src.eval_split)
    n = _shard_size(n_total, process_index, process_count)
    per_host = -(-n_total // process_count)
    num_batches = -(-per_host // batch_size)
    records = src.records(src.eval_split).shard(process_count, process_index)
    if _get(data_config, "cache_eval_records"):
        records = records.cache()

    @_graph_function
    def process(record):
        image, label = src.decode(record)
        out = eval_transform(image, label, data_config)
        out["valid"] = tf.constant(True)
        return out

    ds = records.map(process, num_parallel_calls=_num_calls(data_config), deterministic=True)
    num_pad = num_batches * batch_size - n
    if num_pad > 0:
        if pad:
            ph, pw = (int(x) for x in pad)
        else:
            ph = pw = 1
        filler = {
            "image": tf.zeros([ph, pw, 3], tf.float32),
            "label": tf.fill([ph, pw], tf.constant(IGNORE_INDEX, tf.int32)),
            "image_size": tf.zeros([2], tf.int32),
            "valid": tf.constant(False),
        }
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(num_pad))
    ds = ds.batch(batch_size, drop_remainder=bool(pad))
    ds = ds.prefetch(int(_get(data_config, "prefetch")))
    return ds.with_options(_options(data_config)), num_batches, n


def make_eval_iterator(data_config, batch_size: int, *, process_index: int = 0, process_count: int = 1) -> EvalIterable:
    """Finite, re-iterable numpy eval batches of this host (module doc)."""
    ds, num_batches, n = make_eval_dataset(
        data_config, batch_size, process_index=process_index, process_count=process_count
    )
    return EvalIterable(ds, num_batches, n)


def make_original_eval_dataset(
    data_config, *, process_index: int = 0, process_count: int = 1
) -> tuple[tf.data.Dataset, int]:
    """(dataset, num_examples of this host): the eval split as decoded, unbatched and at its
    original size: {"image": uint8 [H, W, 3], "label": uint8 [H, W] (train ids, 255 = ignore)}.
    For scoring at the original resolution (mmseg's test protocol: the prediction is resized back
    to the image, the label is never resized). Hosts get disjoint examples as in
    ``make_eval_dataset``; no padding examples are added."""
    check_hosts(process_index, process_count)
    src = get_source(data_config)
    n = _shard_size(src.num_examples(src.eval_split), process_index, process_count)
    records = src.records(src.eval_split).shard(process_count, process_index)

    @_graph_function
    def process(record):
        image, label = src.decode(record)
        return {"image": image, "label": label}

    ds = records.map(process, num_parallel_calls=_num_calls(data_config), deterministic=True)
    ds = ds.prefetch(int(_get(data_config, "prefetch")))
    return ds.with_options(_options(data_config)), n
