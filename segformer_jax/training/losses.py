"""Training losses, kept outside the model (as in HF, where the loss lives in `forward(labels=...)`).

Every loss sees the logits (B, H/4, W/4, K) upsampled bilinearly (torch `align_corners=False`) to the
label size; pixels labelled `ignore_index` contribute nothing. Two reductions exist in the reference
code bases:

* ``"valid"``: mean over non-ignored pixels. Hugging Face (`nn.CrossEntropyLoss(ignore_index=255)`)
  and mmseg with ``avg_non_ignore=True``.
* ``"all"``: sum over pixels / number of all pixels, ignored ones included. mmseg's default
  (``avg_non_ignore=False``), i.e. what the NVlabs SegFormer configs were trained with; it down-weights
  images with many ignored pixels.

Binary segmentation (one logit channel, HF's ``num_labels=1``): the channel x is read as the logits
(0, x) of (background, foreground). softmax((0, x)) = (1 - sigmoid(x), sigmoid(x)) and the softmax
cross-entropy of (0, x) is BCE-with-logits(x, y) exactly, so every loss below has its sigmoid form
for free, and labels are 0 (background), 1 (foreground) or `ignore_index`.

The losses selectable from the config (`loss.terms`, a list of (name, weight) pairs summed, like mmseg's
`loss_decode` list; see `loss_from_config`):

* ``cross_entropy``: torch `F.cross_entropy(weight=class_weight, label_smoothing=...)`. Without class
  weights and smoothing it is the banded kernel (`models.kernels.upsampled_cross_entropy_banded`).
* ``ohem_cross_entropy``: mmseg `OHEMPixelSampler(thresh, min_kept)` + CrossEntropyLoss.
* ``dice``: mmseg 0.x `DiceLoss` (smooth, exponent), per image and class.
* ``lovasz_softmax``: Berman et al.'s `lovasz_softmax(classes='present', per_image=False)` (mmseg
  `LovaszLoss` defaults).
* ``focal``: softmax focal loss -alpha_y (1 - p_y)^gamma log p_y (Lin et al.; alpha = class_weight).

All but Lovasz work band by band over the image (a lax.scan over rows, each band recomputed in the
backward pass), so none keeps a full-resolution (B, H, W, K) buffer; Lovasz sorts every pixel's error
for every class, which needs the whole (B*H*W, K) array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segformer_jax.models import kernels

REDUCTIONS = ("valid", "all")
LOSS_NAMES = ("cross_entropy", "ohem_cross_entropy", "dice", "lovasz_softmax", "focal")
CLASS_WEIGHT_MODES = ("inverse_sqrt_frequency",)


def _check(logits, labels, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction={reduction!r}; choose one of {REDUCTIONS}")
    if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (B, h, w, K) and labels (B, H, W); got {logits.shape} and {labels.shape}")


def as_two_class(logits):
    """One binary logit channel x -> the softmax logits (0, x) of (background, foreground)."""
    if logits.shape[-1] != 1:
        return logits
    return jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)


def _class_weight_array(class_weight, num_classes):
    if class_weight is None:
        return None
    w = jnp.asarray(class_weight, jnp.float32)
    if w.shape != (num_classes,):
        raise ValueError(f"class_weight has {w.shape} entries for {num_classes} classes")
    return w


def _reduce(numerator, valid_denominator, num_pixels, reduction):
    denominator = valid_denominator if reduction == "valid" else jnp.float32(num_pixels)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


# ----------------------------------------------------------------------------- banded map-reduce


def _divisor_at_most(n: int, want: int) -> int:
    for r in range(min(want, n), 0, -1):
        if n % r == 0:
            return r
    return 1


def _upsample_band_rows(src, s: int, rows: int):
    """src (B, rows + 2, w, K): low-res rows with one (edge-replicated) halo row each side -> the
    band's rows upsampled by the integer factor s (torch bilinear, align_corners=False)."""
    out = []
    for k in range(rows):
        for r in range(s):
            d = (r + 0.5) / s - 0.5
            if d < 0:
                out.append(src[:, k + 1] * (1.0 + d) + src[:, k] * (-d))
            else:
                out.append(src[:, k + 1] * (1.0 - d) + src[:, k + 2] * d)
    return jnp.stack(out, axis=1)


def banded_reduce(logits, labels, pixel_fn: Callable, extras: Sequence = (), band_rows: int = 2):
    """Map-reduce over the upsampled logits without a full-resolution (B, H, W, K) buffer.

    pixel_fn(up (B, r, W, K) float32, labels (B, r, W), *extras (B, r, W)) -> (sums, per_pixel): `sums`
    a pytree of arrays summed over the bands, `per_pixel` a pytree of (B, r, W) arrays (or None)
    assembled to (B, H, W). The image is walked in bands of `band_rows` low-res rows (lax.scan), each
    band's body rematerialised in the backward pass. When H is not an integer multiple of h the whole
    image is one band (one full-resolution buffer)."""
    b, h, w, _ = logits.shape
    H, W = labels.shape[1:]
    logits = logits.astype(jnp.float32)
    if H % h or H < h or W < w:
        return pixel_fn(kernels.resize_bilinear(logits, (H, W)), labels, *extras)
    s = H // h
    rows = _divisor_at_most(h, max(1, band_rows))
    padded = jnp.concatenate([logits[:, :1], logits, logits[:, -1:]], axis=1)

    def band(t):
        src = jax.lax.dynamic_slice_in_dim(padded, t * rows, rows + 2, axis=1)
        up = kernels.resize_bilinear(_upsample_band_rows(src, s, rows), (rows * s, W))
        cut = [jax.lax.dynamic_slice_in_dim(x, t * rows * s, rows * s, axis=1) for x in (labels, *extras)]
        return pixel_fn(up, *cut)

    @jax.checkpoint
    def body(total, t):
        sums, per_pixel = band(t)
        return jax.tree_util.tree_map(jnp.add, total, sums), per_pixel

    sums_shape = jax.eval_shape(lambda: band(0)[0])
    init = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape)
    total, per_pixel = jax.lax.scan(body, init, jnp.arange(h // rows))
    per_pixel = jax.tree_util.tree_map(lambda y: jnp.moveaxis(y, 0, 1).reshape(b, H, W), per_pixel)
    return total, per_pixel


def _log_softmax_parts(up, labels, ignore_index):
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    logp = up - jax.nn.logsumexp(up, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return valid, safe, logp, picked


# ----------------------------------------------------------------------------- losses


def semantic_segmentation_loss(logits, labels, *, ignore_index: int = 255, reduction: str = "valid", class_weight=None):
    """Scalar float32 loss. logits: (B, h, w, K) NHWC float; labels: (B, H, W) int, H >= h, W >= w.

    K >= 2: softmax cross-entropy; K == 1: HF's binary loss, BCE-with-logits on the valid pixels
    (``"all"``: HF's mean over all pixels with ignored ones weighted 0; ``"valid"``: mean over valid).
    class_weight: (K,) (two for binary: background, foreground), torch `F.cross_entropy(weight=...)`:
    ``"valid"`` is the weighted mean sum(w_y nll) / sum(w_y) over valid pixels; ``"all"`` is
    sum(w_y nll) / all pixels (mmseg's class_weight with avg_non_ignore=False).

    Without class weights it is `kernels.upsampled_cross_entropy_banded` (upsample + CE in bands of
    rows, same value and gradient as the plain jax.image.resize + log_softmax form, no full-resolution
    buffer: b0 training peak memory 1.06x transformers' instead of 1.40x with the whole-image fused
    form, same speed); it falls back to the whole-image `kernels.upsampled_cross_entropy` when the
    label size is not an integer multiple of the logits'."""
    _check(logits, labels, reduction)
    if class_weight is not None:
        return cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction, class_weight=class_weight)
    logits = as_two_class(logits)
    labels = labels.astype(jnp.int32)
    mean_over_valid = kernels.upsampled_cross_entropy_banded(logits, labels, ignore_index)
    if reduction == "valid":
        return mean_over_valid
    # sum / all pixels = (sum / valid) * valid / all; valid/all is a constant w.r.t. the logits.
    num_valid = jnp.maximum(jnp.sum(labels != ignore_index), 1).astype(jnp.float32)
    return mean_over_valid * num_valid / labels.size


def cross_entropy(
    logits,
    labels,
    *,
    ignore_index: int = 255,
    reduction: str = "valid",
    class_weight=None,
    label_smoothing: float = 0.0,
    pixel_weight=None,
    band_rows: int = 2,
):
    """torch `F.cross_entropy(up, labels, weight=class_weight, ignore_index=..., label_smoothing=...)`
    on the upsampled logits: per valid pixel (1 - eps) w_y nll + eps / K sum_k w_k (-log p_k);
    ``"valid"`` divides the sum by sum(w_y) over valid pixels (torch), ``"all"`` by all pixels.
    pixel_weight (B, H, W), optional: multiplies each pixel's term (OHEM's kept mask); the
    denominators do not change (mmseg's `weight=`)."""
    _check(logits, labels, reduction)
    logits = as_two_class(logits)
    k = logits.shape[-1]
    weights = _class_weight_array(class_weight, k)
    labels = labels.astype(jnp.int32)
    eps = float(label_smoothing)
    extras = () if pixel_weight is None else (pixel_weight.astype(jnp.float32),)

    def pixel_fn(up, lab, *extra):
        valid, safe, logp, picked = _log_softmax_parts(up, lab, ignore_index)
        w_y = jnp.ones(lab.shape, jnp.float32) if weights is None else weights[safe]
        term = -(1.0 - eps) * w_y * picked
        if eps:
            smooth = -(logp if weights is None else logp * weights).sum(-1)
            term = term + eps / k * smooth
        if extra:
            term = term * extra[0]
        return (jnp.sum(jnp.where(valid, term, 0.0)), jnp.sum(jnp.where(valid, w_y, 0.0))), None

    (numerator, weight_sum), _ = banded_reduce(logits, labels, pixel_fn, extras, band_rows)
    if pixel_weight is not None:  # mmseg: weight= rescales pixels, the average stays over pixel counts
        weight_sum = jnp.sum(labels != ignore_index).astype(jnp.float32)
    return _reduce(numerator, weight_sum, labels.size, reduction)


def ohem_kept_mask(logits, labels, *, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100_000):
    """mmseg `OHEMPixelSampler.sample` with a threshold: the valid pixels whose true-class probability is
    below max(thresh, the (min_kept * B)-th smallest such probability) -> float (B, H, W) of 0 / 1."""
    b, H, W = labels.shape
    if min_kept > H * W:
        raise ValueError(
            f"loss.ohem_min_kept={min_kept} is more than the {H}x{W} = {H * W} pixels of an image; "
            "lower it (mmseg's default 100000 is for 512x512 crops)"
        )
    labels = labels.astype(jnp.int32)

    def pixel_fn(up, lab):
        valid, _, _, picked = _log_softmax_parts(up, lab, ignore_index)
        return (), jnp.where(valid, jnp.exp(picked), jnp.inf)

    _, prob = banded_reduce(jax.lax.stop_gradient(as_two_class(logits)), labels, pixel_fn)
    valid = labels != ignore_index
    n_valid = jnp.sum(valid)
    ordered = jnp.sort(prob.reshape(-1))
    index = jnp.clip(jnp.minimum(min_kept * b, n_valid - 1), 0, ordered.size - 1)
    min_threshold = jnp.where(n_valid > 0, ordered[index], 0.0)
    threshold = jnp.maximum(min_threshold, thresh)
    return (valid & (prob < threshold)).astype(jnp.float32)


def ohem_cross_entropy(
    logits,
    labels,
    *,
    ignore_index: int = 255,
    reduction: str = "valid",
    thresh: float = 0.7,
    min_kept: int = 100_000,
    class_weight=None,
):
    """mmseg OHEM (`OHEMPixelSampler(thresh, min_kept)` + CrossEntropyLoss): cross-entropy on the kept
    pixels only (`ohem_kept_mask`); ``"valid"`` divides by the valid pixels (avg_non_ignore=True),
    ``"all"`` by all pixels (mmseg's default)."""
    _check(logits, labels, reduction)
    keep = ohem_kept_mask(logits, labels, ignore_index=ignore_index, thresh=thresh, min_kept=min_kept)
    return cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction=reduction, class_weight=class_weight, pixel_weight=keep
    )


def dice_loss(
    logits, labels, *, ignore_index: int = 255, smooth: float = 1.0, exponent: float = 2.0, class_weight=None
):
    """mmseg 0.x `DiceLoss`: per image b and class c over the valid pixels,
    dice = (2 sum p t + smooth) / (sum p^e + sum t^e + smooth) with p the softmax and t the one-hot
    label; loss = sum_c w_c mean_b (1 - dice) / K. (mmseg also counts the ignored pixels, as the last
    class, in the denominator; here they count nowhere.) No reduction applies: it is a ratio."""
    _check(logits, labels, "valid")
    logits = as_two_class(logits)
    k = logits.shape[-1]
    weights = _class_weight_array(class_weight, k)
    labels = labels.astype(jnp.int32)

    def pixel_fn(up, lab):
        valid = (lab != ignore_index)[..., None]
        p = jax.nn.softmax(up, axis=-1)
        t = (lab[..., None] == jnp.arange(k)).astype(jnp.float32)
        inter = jnp.sum(jnp.where(valid, p * t, 0.0), axis=(1, 2))
        p_pow = jnp.sum(jnp.where(valid, p**exponent, 0.0), axis=(1, 2))
        t_pow = jnp.sum(jnp.where(valid, t, 0.0), axis=(1, 2))  # t^e = t for a one-hot t
        return (inter, p_pow, t_pow), None

    (inter, p_pow, t_pow), _ = banded_reduce(logits, labels, pixel_fn)
    per_class = jnp.mean(1.0 - (2.0 * inter + smooth) / (p_pow + t_pow + smooth), axis=0)  # (K,)
    if weights is not None:
        per_class = per_class * weights
    return jnp.sum(per_class) / k


def lovasz_softmax(logits, labels, *, ignore_index: int = 255):
    """Berman et al.'s Lovasz-softmax (`lovasz_softmax(probas, labels, classes='present',
    per_image=False, ignore=ignore_index)`, mmseg `LovaszLoss` defaults): for every class present in the
    batch's valid labels, the Lovasz extension of the Jaccard loss on the sorted errors |1[y=c] - p_c|;
    the mean over those classes (0 when none). Needs the full-resolution (B*H*W, K) errors."""
    _check(logits, labels, "valid")
    logits = as_two_class(logits)
    k = logits.shape[-1]
    up = kernels.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:])
    labels = labels.astype(jnp.int32).reshape(-1)
    probs = jax.nn.softmax(up, axis=-1).reshape(-1, k)
    valid = (labels != ignore_index)[:, None]
    fg = ((labels[:, None] == jnp.arange(k)) & valid).astype(jnp.float32)
    errors = jnp.where(valid, jnp.abs(fg - probs), -1.0)  # ignored pixels sort last
    order = jnp.argsort(-jax.lax.stop_gradient(errors), axis=0)
    errors_sorted = jnp.take_along_axis(errors, order, axis=0)
    fg_sorted = jnp.take_along_axis(fg, order, axis=0)
    valid_sorted = jnp.take_along_axis(jnp.broadcast_to(valid, errors.shape), order, axis=0)
    gts = fg_sorted.sum(axis=0)
    intersection = gts - jnp.cumsum(fg_sorted, axis=0)
    union = gts + jnp.cumsum(1.0 - fg_sorted, axis=0)
    jaccard = 1.0 - intersection / union
    grad = jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)
    per_class = jnp.sum(jnp.where(valid_sorted, errors_sorted, 0.0) * jax.lax.stop_gradient(grad), axis=0)
    present = gts > 0
    n_present = jnp.sum(present)
    return jnp.where(n_present > 0, jnp.sum(jnp.where(present, per_class, 0.0)) / jnp.maximum(n_present, 1), 0.0)


def focal_loss(
    logits, labels, *, ignore_index: int = 255, reduction: str = "valid", gamma: float = 2.0, class_weight=None
):
    """Softmax focal loss (Lin et al.): per valid pixel -alpha_y (1 - p_y)^gamma log p_y with alpha =
    class_weight (1 when None); ``"valid"``: mean over valid pixels, ``"all"``: over all pixels. For one
    logit channel it is the sigmoid focal loss of torchvision (alpha as (background, foreground))."""
    _check(logits, labels, reduction)
    logits = as_two_class(logits)
    weights = _class_weight_array(class_weight, logits.shape[-1])
    labels = labels.astype(jnp.int32)

    def pixel_fn(up, lab):
        valid, safe, _, picked = _log_softmax_parts(up, lab, ignore_index)
        term = -((1.0 - jnp.exp(picked)) ** gamma) * picked
        if weights is not None:
            term = term * weights[safe]
        return (jnp.sum(jnp.where(valid, term, 0.0)), jnp.sum(valid).astype(jnp.float32)), None

    (numerator, num_valid), _ = banded_reduce(logits, labels, pixel_fn)
    return _reduce(numerator, num_valid, labels.size, reduction)


# ----------------------------------------------------------------------------- from the config


def parse_terms(terms) -> list[tuple[str, float]]:
    """`loss.terms` -> [(name, weight)]: pairs (name, weight), or a bare name (weight 1)."""
    if isinstance(terms, str):
        terms = [terms]
    out = []
    for term in terms or ():
        if isinstance(term, str):
            name, weight = term, 1.0
        elif isinstance(term, (list, tuple)) and len(term) == 2 and isinstance(term[0], str):
            name, weight = term
        else:
            raise ValueError(f"loss.terms: {term!r} is not a (name, weight) pair, e.g. ('cross_entropy', 1.0)")
        if name not in LOSS_NAMES:
            raise ValueError(f"loss.terms: unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"loss.terms: the weight of {name!r} is {weight!r}, not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"loss.terms: the weight of {name!r} is {weight}")
        out.append((name, weight))
    if not out:
        raise ValueError("loss.terms is empty; e.g. (('cross_entropy', 1.0),)")
    return out


def class_pixel_counts(data_config, num_classes: int) -> np.ndarray:
    """(num_classes,) int64 pixel counts of the training split's labels (decoded, before augmentation;
    255 / out-of-range ids are not counted). Reads every training mask once."""
    from segformer_jax.data.config import pipeline_of

    if pipeline_of(data_config) == "python":
        from segformer_jax.data import python_pipeline

        return python_pipeline.train_label_counts(data_config, num_classes)
    import tensorflow as tf

    from segformer_jax.data import input_pipeline

    src = input_pipeline.get_source(data_config)
    ds = src.records(src.train_split).map(lambda r: src.decode(r)[1], num_parallel_calls=tf.data.AUTOTUNE)
    counts = np.zeros(256, np.int64)
    for label in ds.as_numpy_iterator():
        counts += np.bincount(np.asarray(label, np.uint8).reshape(-1), minlength=256)
    return counts[:num_classes]


def inverse_sqrt_frequency_weights(counts, class_names=None) -> np.ndarray:
    """w_c = 1 / sqrt(f_c), f_c the pixel frequency of class c, scaled so that the average weight of a
    training pixel, sum_c f_c w_c, is 1 (the loss keeps the unweighted loss's scale)."""
    counts = np.asarray(counts, np.float64)
    absent = [int(c) for c in np.flatnonzero(counts <= 0)]
    if absent:
        names = [class_names[c] if class_names is not None else str(c) for c in absent]
        raise ValueError(
            f"loss.class_weight='inverse_sqrt_frequency': {len(absent)} class(es) occur in no training "
            f"mask ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}): their weight would be "
            "infinite; give loss.class_weight as an explicit list, or fix the dataset's classes"
        )
    freq = counts / counts.sum()
    weights = 1.0 / np.sqrt(freq)
    return weights / np.sum(freq * weights)


def resolve_class_weight(class_weight, num_classes: int, data_config=None, class_names=None):
    """`loss.class_weight` -> None or a (num_classes,) float32 array; a mode string is computed from
    the training masks of `data_config`."""
    if class_weight is None or (isinstance(class_weight, (list, tuple)) and len(class_weight) == 0):
        return None
    if isinstance(class_weight, str):
        if class_weight not in CLASS_WEIGHT_MODES:
            raise ValueError(
                f"loss.class_weight={class_weight!r}; give a list of {num_classes} numbers "
                f"or one of {CLASS_WEIGHT_MODES}"
            )
        if data_config is None:
            raise ValueError(f"loss.class_weight={class_weight!r} needs the data config to count pixels")
        counts = class_pixel_counts(data_config, num_classes)
        return inverse_sqrt_frequency_weights(counts, class_names).astype(np.float32)
    weights = np.asarray(class_weight, np.float64)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"loss.class_weight has {weights.size} entries but the dataset has {num_classes} classes"
            f"{' (binary: background, foreground)' if num_classes == 2 else ''}; give one weight per class"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError(f"loss.class_weight={list(class_weight)}: weights must be finite, >= 0, not all 0")
    return weights.astype(np.float32)


def loss_from_config(
    loss_config, *, num_classes: int, ignore_index: int = 255, data_config=None, class_names=None, crop_size=None
) -> Callable:
    """The training loss `loss_fn(logits, labels) -> scalar` from `config.loss`:

    * terms: (name, weight) pairs summed (names: LOSS_NAMES); default (('cross_entropy', 1.0),)
    * reduction: 'valid' | 'all' (cross_entropy, ohem_cross_entropy, focal)
    * class_weight: None, a list of num_classes weights, or 'inverse_sqrt_frequency' (from the training
      masks); used by cross_entropy, ohem_cross_entropy (torch weight=), focal (alpha) and dice
    * label_smoothing (cross_entropy), ohem_thresh / ohem_min_kept, dice_smooth / dice_exponent,
      focal_gamma.

    num_classes: the dataset's classes (2 for a binary model with one logit channel).
    Raises ValueError, naming the field, on a bad config (before anything is compiled)."""
    get = loss_config.get
    reduction = get("reduction", "valid")
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss.reduction={reduction!r}; choose one of {REDUCTIONS}")
    terms = parse_terms(get("terms", (("cross_entropy", 1.0),)))
    weights = resolve_class_weight(get("class_weight"), num_classes, data_config, class_names)
    smoothing = float(get("label_smoothing", 0.0) or 0.0)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"loss.label_smoothing={smoothing}; it must be in [0, 1)")
    thresh = float(get("ohem_thresh", 0.7))
    min_kept = int(get("ohem_min_kept", 100_000))
    names = [n for n, _ in terms]
    if "ohem_cross_entropy" in names:
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"loss.ohem_thresh={thresh}; a probability in (0, 1]")
        if min_kept < 0:
            raise ValueError(f"loss.ohem_min_kept={min_kept} must be >= 0")
        if crop_size and min_kept > int(np.prod(crop_size)):
            raise ValueError(
                f"loss.ohem_min_kept={min_kept} is more than the {crop_size[0]}x{crop_size[1]} = "
                f"{int(np.prod(crop_size))} pixels of a training crop (data.crop_size); lower it"
            )
    gamma = float(get("focal_gamma", 2.0))
    dice_smooth, dice_exponent = float(get("dice_smooth", 1.0)), float(get("dice_exponent", 2.0))
    cw = None if weights is None else jnp.asarray(weights)
    common = dict(ignore_index=ignore_index)

    def one(name, logits, labels):
        if name == "cross_entropy":
            if smoothing == 0.0:
                return semantic_segmentation_loss(logits, labels, reduction=reduction, class_weight=cw, **common)
            return cross_entropy(
                logits, labels, reduction=reduction, class_weight=cw, label_smoothing=smoothing, **common
            )
        if name == "ohem_cross_entropy":
            return ohem_cross_entropy(
                logits, labels, reduction=reduction, thresh=thresh, min_kept=min_kept, class_weight=cw, **common
            )
        if name == "dice":
            return dice_loss(logits, labels, smooth=dice_smooth, exponent=dice_exponent, class_weight=cw, **common)
        if name == "lovasz_softmax":
            return lovasz_softmax(logits, labels, **common)
        return focal_loss(logits, labels, reduction=reduction, gamma=gamma, class_weight=cw, **common)

    def loss_fn(logits, labels):
        channels = logits.shape[-1]
        if (2 if channels == 1 else channels) != num_classes:
            raise ValueError(f"the model has {channels} logit channel(s) for a dataset of {num_classes} classes")
        total = None
        for name, weight in terms:
            value = one(name, logits, labels)
            value = value if weight == 1.0 else weight * value
            total = value if total is None else total + value
        return total

    return loss_fn
