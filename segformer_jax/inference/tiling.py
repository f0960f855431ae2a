"""Whole-image and sliding-window inference with multi-scale / flip test-time augmentation, as the
NVlabs/mmseg test procedure (`EncoderDecoder.whole_inference`, `slide_inference`, `aug_test`).

Pipeline for one image of H0 x W0 pixels (0..255 RGB) and one augmentation (ratio r, flip f):

1. resize (bilinear, torch `align_corners=False`, no antialias, like cv2/mmcv) to the keep-ratio
   size of mmcv `Resize(img_scale=scale*r, keep_ratio=True)`; optionally rounded up to a multiple
   of `size_divisor` (NVlabs `AlignedResize`); ImageNet-normalise; mirror if f;
2. mode 'whole': the image is one tile. mode 'slide': windows of `crop` every `stride` pixels
   (mmseg grid: the last window is shifted back inside the image);
3. each tile is padded with zeros (after normalisation) at the bottom/right to a multiple of `bucket`
   pixels, so that images of similar size share one compiled function. The tile's valid size goes in
   with it (a runtime input: `model.apply(..., valid_size=)`), and the network computes each tile's
   logits as if it were unpadded (convs read zeros past its border, attention ignores the padded
   keys, the decode head's upsampling uses its own sizes' weights); they are upsampled bilinearly to
   the valid size. So the result equals the network on the unpadded tile (what transformers computes),
   whatever the bucket. Windows of exactly `crop` size are never padded, so sliding-window results
   equal mmseg's; bucket=None disables padding (one compilation per size). Sides under 32 pixels (the
   network's minimum) are padded to 32 and that padding is part of the input;
4. overlapping window logits are summed and divided by the window count; mirrored back; resized
   to H0 x W0 (bilinear).

With one augmentation the result is those logits; with several (TTA), the mean of their softmax
probabilities (mmseg `aug_test`). The label map is the argmax over the last axis.

The network runs in `TiledForward`, a jitted function of a fixed batch of tiles: it compiles once per
tile shape (and counts its compilations). Planning (resizing, normalising, padding the image) runs in
numpy. With a `TiledForward` the rest stays on its device: upsampling to the tile, cropping, resizing
to the image (steps 2-4 as index/weight vectors of `_axis_weights`, torch's formula), the TTA mean and
the argmax are one small program per (tile shape, output size rounded up to 32), and only the result
comes back; with any other callable `forward` the same steps run in numpy (`resize_bilinear`).
Sliding-window averaging is done on the host either way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from segformer_jax.fileio import atomic_write_bytes
from segformer_jax.models.preprocess import normalize_images


# ------------------------------------------------------------------------------------ geometry
def keep_ratio_size(
    height: int, width: int, scale: tuple[int, int] | None, ratio: float = 1.0, size_divisor: int | None = None
) -> tuple[int, int]:
    """Output (h, w) of mmcv `Resize(img_scale=scale, keep_ratio=True)` after mmseg's multi-scale ratio
    (the scale becomes (int(s0 * ratio), int(s1 * ratio))); scale=None resizes by `ratio` alone.
    size_divisor rounds up to a multiple (NVlabs AlignedResize)."""
    if scale is None:
        factor = float(ratio)
    else:
        s = (int(scale[0] * ratio), int(scale[1] * ratio))
        factor = min(max(s) / max(height, width), min(s) / min(height, width))
    h, w = int(height * factor + 0.5), int(width * factor + 0.5)
    if size_divisor:
        h = int(math.ceil(h / size_divisor)) * size_divisor
        w = int(math.ceil(w / size_divisor)) * size_divisor
    return max(h, 1), max(w, 1)


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) windows of mmseg `slide_inference`: a grid every `stride`, the last row/column
    shifted back to end at the border; windows are min(crop, image) in size."""
    (ch, cw), (sh, sw) = crop, stride
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop {crop} and stride {stride} must be positive")
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else int(math.ceil(n / multiple)) * multiple


def _axis_weights(n_in: int, n_out: int):
    # torch upsample_bilinear2d, align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped at 0.
    # Computed in float32 like torch's CPU kernel, so the weights agree to the last bit or so.
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (1.0 - w1).astype(np.float32), w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W[, C]) array to `size`, equal to torch
    `F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing, also when shrinking)."""
    x = np.asarray(x, np.float32)
    (h_in, w_in), (h, w) = x.shape[:2], size
    if (h_in, w_in) == (h, w):
        return x
    squeeze = x.ndim == 2
    if squeeze:
        x = x[..., None]
    x = _resample_rows_cols(x, _axis_weights(h_in, h), _axis_weights(w_in, w))
    return x[..., 0] if squeeze else x


def _resample_rows_cols(x, rows, cols):
    """Separable 2-tap bilinear resampling of (H, W, C) by `_axis_weights` vectors; numpy or jax arrays
    (the device assembly runs it jitted)."""
    i0, i1, a, b = rows
    x = x[i0] * a[:, None, None] + x[i1] * b[:, None, None]
    j0, j1, c, d = cols
    return x[:, j0] * c[None, :, None] + x[:, j1] * d[None, :, None]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------------------------ settings
def _pair(name: str, value) -> tuple[int, int]:
    """(h, w) of positive ints, with a message naming the field for anything else."""
    try:
        if isinstance(value, (str, bytes)):  # "64" would iterate as (6, 4)
            raise TypeError
        pair = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: give two positive integers (h, w)") from None
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name}={value!r}: give two positive integers (h, w)")
    return pair


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How to segment an image.

    mode: 'whole' (one pass over the resized image) or 'slide' (windows of `crop` every `stride`).
    scale: mmcv keep-ratio scale (long, short), e.g. (2048, 512) for ADE20K, (2048, 1024) for
        Cityscapes; None keeps the image size (times the ratio).
    ratios: multi-scale TTA ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75); (1.0,) for none.
    flip: also run the mirrored image (TTA).
    crop, stride: sliding-window size and step (h, w), e.g. (1024, 1024), (768, 768).
    size_divisor: round the resized size up to a multiple (NVlabs AlignedResize); None: no rounding.
    bucket: pad tiles to multiples of this many pixels so that similar sizes share a compilation
        (each tile's logits are still those of its unpadded self); None: never pad (one compilation
        per distinct size).
    size: resize every image to exactly (h, w) instead (transformers' SegformerImageProcessor with
        do_resize: what a model directory's preprocessor_config.json asks for); None: `scale`.
    mean, std: per-channel normalisation on 0..255 pixels; None: ImageNet's (the SegFormer default).
    """

    mode: str = "whole"
    scale: tuple[int, int] | None = (2048, 512)
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    size_divisor: int | None = None
    bucket: int | None = 32
    size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode={self.mode!r}; choose 'whole' or 'slide'")
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise ValueError(f"ratios={self.ratios}: give one or more positive ratios")
        if self.bucket is not None and self.bucket < 1:
            raise ValueError(f"bucket={self.bucket} must be >= 1 (or None)")
        if self.size_divisor is not None and self.size_divisor < 0:
            raise ValueError(f"size_divisor={self.size_divisor} must be a positive multiple (0 or None: no rounding)")
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "crop", _pair("crop", self.crop))
        object.__setattr__(self, "stride", _pair("stride", self.stride))
        if self.mode == "slide" and any(s > c for s, c in zip(self.stride, self.crop)):
            # mmseg asserts it too: windows further apart than their size leave pixels with no logits.
            raise ValueError(
                f"stride={self.stride} is larger than crop={self.crop}: the windows would leave "
                "pixels uncovered; use a stride <= the crop (e.g. 2/3 of it)"
            )
        if self.scale is not None:
            object.__setattr__(self, "scale", _pair("scale", self.scale))
        if self.size is not None:
            object.__setattr__(self, "size", _pair("size", self.size))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 3 or (name == "std" and min(value) <= 0):
                    raise ValueError(f"{name}={value}: give three per-channel values (std > 0), on 0..255 pixels")
                object.__setattr__(self, name, value)

    @property
    def augmentations(self) -> list[tuple[float, bool]]:
        return [(r, f) for r in self.ratios for f in ((False, True) if self.flip else (False,))]


def config_from_training(config, *, ratios=(1.0,), flip: bool = False) -> InferenceConfig:
    """The InferenceConfig of a training config's eval settings (what `segformer_jax.evaluate` runs):
    keep-ratio resize to `data.eval_scale` (None: original size) rounded up to `data.eval_size_divisor`,
    `eval.mode`, and for 'slide' its crop and stride. Tiles are padded to multiples of 32 (one
    compilation per padded size); with a divisor of 32 (ADE20K) nothing is padded, as in NVlabs' test
    pipeline."""
    from segformer_jax.data.config import eval_size_divisor

    kwargs = {}
    if config.eval.mode == "slide":
        if not config.eval.get("crop_size") or not config.eval.get("stride"):
            raise ValueError("eval.mode='slide' needs eval.crop_size and eval.stride")
        kwargs = {"crop": tuple(config.eval.crop_size), "stride": tuple(config.eval.stride)}
    scale = config.data.get("eval_scale")
    return InferenceConfig(
        mode=config.eval.mode,
        scale=tuple(scale) if scale else None,
        ratios=tuple(float(r) for r in ratios),
        flip=bool(flip),
        size_divisor=eval_size_divisor(config.data),
        **kwargs,
    )


SETTINGS_NAME = "inference.json"  # beside a model's config.json: the settings it was evaluated with
_SAVED_FIELDS = ("mode", "scale", "crop", "stride", "size_divisor")


def settings_from_preprocessor(processor: dict, source: str = "preprocessor_config.json") -> dict:
    """InferenceConfig fields for transformers' SegformerImageProcessor settings: the whole image,
    resized to `size` if do_resize (else at its own size), normalised with its mean / std."""
    out: dict = {"mode": "whole", "scale": None}
    if processor.get("do_resize", True):
        size = processor.get("size", {"height": 512, "width": 512})  # the processor's own default
        if not (isinstance(size, dict) and {"height", "width"} <= set(size)):
            raise ValueError(f"{source}: size={size!r}; segformer_jax follows {{'height': h, 'width': w}} only")
        out["size"] = (int(size["height"]), int(size["width"]))
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    if processor.get("do_normalize", True):
        mean = processor.get("image_mean", [0.485, 0.456, 0.406])
        std = processor.get("image_std", [0.229, 0.224, 0.225])
        out["mean"] = tuple(float(m) / rescale for m in mean)  # on 0..255 pixels
        out["std"] = tuple(float(s) / rescale for s in std)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0 / rescale,) * 3
    return out


def save_settings(config: InferenceConfig, model_dir: str | os.PathLike) -> str:
    """Record how a model was evaluated (train.py writes it into <workdir>/final), so that
    `segformer_jax.predict` segments new images the same way by default."""
    path = os.path.join(os.fspath(model_dir), SETTINGS_NAME)
    settings = {k: getattr(config, k) for k in _SAVED_FIELDS}
    text = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, indent=2)
    atomic_write_bytes((text + "\n").encode(), path)
    return path


def load_settings(model_dir: str | os.PathLike) -> dict:
    """The fields recorded by `save_settings`, or else those of the directory's transformers
    preprocessor_config.json ({} when it has neither), for InferenceConfig(**...)."""
    from segformer_jax.pretrained import PREPROCESSOR_NAME, read_preprocessor_config

    path = os.path.join(os.fspath(model_dir), SETTINGS_NAME)
    if not os.path.isfile(path):
        processor = read_preprocessor_config(model_dir)
        if processor is None:
            return {}
        return settings_from_preprocessor(processor, os.path.join(os.fspath(model_dir), PREPROCESSOR_NAME))
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); delete it to use the default settings") from None
    return {k: saved[k] for k in _SAVED_FIELDS if k in saved}


# ------------------------------------------------------------------------------------ the network
class TiledForward:
    """`forward(tiles)`: float32 (N, H, W, 3) ImageNet-normalised tiles -> logits upsampled to
    (N, H, W, num_labels), computed by a jitted `apply_fn(variables, batch)` over fixed batches of
    `batch_size` (the last batch is padded with zero tiles): one compilation of the network per tile
    shape. `compilations` counts them (the Python body runs once per trace). `on_device(tiles,
    valid_sizes)` keeps the network's (1/4 resolution) logits on the device for `segment_batch` to
    finish there.

    exact (default): `apply_fn` takes `valid_size=` (the model's apply does), and each tile's valid
    (h, w) travels with it as a runtime input, so a tile padded to its bucket gets the logits of its
    unpadded self (the top-left ceil(h/4) x ceil(w/4) of the output) and one compilation still serves
    the bucket. exact=False: the padded tile is the network's input (the padding changes the logits;
    for an `apply_fn` without `valid_size`)."""

    def __init__(
        self,
        apply_fn: Callable[[Any, Any], Any],
        variables: Any,
        batch_size: int = 4,
        compiler_options: dict | None = None,
        exact: bool = True,
    ):
        import jax

        from segformer_jax.models.decode_head import upsample_bilinear

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size = int(batch_size)
        self.variables = variables
        self.compilations = 0
        self.shapes: list[tuple[int, int]] = []
        self.exact = bool(exact)

        def run(variables, tiles, valid_sizes):
            self.compilations += 1  # trace time only
            self.shapes.append(tuple(tiles.shape[1:3]))
            if self.exact:
                return apply_fn(variables, tiles, valid_size=valid_sizes)
            return apply_fn(variables, tiles)

        self._jitted = jax.jit(run)
        self._upsample = jax.jit(upsample_bilinear, static_argnums=1)
        self._compiled: dict[tuple[int, ...], Any] = {}
        # e.g. {"xla_backend_optimization_level": 0}: ~2x faster compilation on CPU, slower runs.
        self.compiler_options = compiler_options

    @classmethod
    def from_model(
        cls, model, variables, batch_size: int = 4, compiler_options: dict | None = None, exact: bool = True
    ) -> TiledForward:
        return cls(model.apply, variables, batch_size, compiler_options, exact)

    def _run(self, variables, chunk, valid_sizes):
        compiled = self._compiled.get(chunk.shape)
        if compiled is None:
            lowered = self._jitted.lower(variables, chunk, valid_sizes)
            compiled = lowered.compile(compiler_options=self.compiler_options)
            self._compiled[chunk.shape] = compiled
        return compiled(variables, chunk, valid_sizes)

    def _batches(self, tiles: np.ndarray, valid_sizes=None):
        """(network logits of a full batch on the device, how many of its tiles are real), batch by batch."""
        tiles = np.asarray(tiles, np.float32)
        n, b = len(tiles), self.batch_size
        full = np.tile(np.asarray(tiles.shape[1:3], np.int32), (n, 1))
        valid_sizes = full if valid_sizes is None else np.asarray(valid_sizes, np.int32).reshape(n, 2)
        for start in range(0, n, b):
            chunk, valid = tiles[start : start + b], valid_sizes[start : start + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk),) + chunk.shape[1:], np.float32)])
                valid = np.concatenate([valid, np.tile(np.asarray(chunk.shape[1:3], np.int32), (b - len(valid), 1))])
            yield self._run(self.variables, chunk, valid), min(b, n - start)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        size = tuple(np.shape(tiles)[1:3])
        outs = [np.asarray(self._upsample(out, size))[:real] for out, real in self._batches(tiles)]
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def on_device(self, tiles: np.ndarray, valid_sizes=None) -> list:
        """The network's logits, not upsampled, left on the device: one (H/4, W/4, num_labels) jax.Array
        per tile. valid_sizes (N, 2): each tile's image part (top left; default: all of it); with
        `exact`, the logits of tile i are those of that part alone, in their top-left corner."""
        return [out[i] for out, real in self._batches(tiles, valid_sizes) for i in range(real)]


# ------------------------------------------------------------------------------------ planning
@dataclasses.dataclass
class _Aug:
    size: tuple[int, int]  # resized (h, w)
    flip: bool
    windows: list[tuple[int, int, int, int]]
    tiles: list[np.ndarray]  # padded, normalised
    logits: list[Any]  # per tile: upsampled numpy logits, or the network's on the device
    tile_sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # padded (h, w)
    # per tile: the part the network sees as the image: the window, or per axis the padded tile
    # where the window is under MIN_TILE (the network cannot take it unpadded)
    valid_sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)


MIN_TILE = 32  # the network needs >= 32 pixels a side (stage 4 is 1/32 with a spatial reduction of 1)


def _tile_shape(window_hw: tuple[int, int], crop: tuple[int, int] | None, bucket: int | None) -> tuple[int, int]:
    out = []
    for i, n in enumerate(window_hw):
        if crop is not None and n == crop[i]:
            padded = n  # full windows: never padded
        else:
            padded = _round_up(n, bucket)
            padded = min(padded, crop[i]) if crop is not None else padded
        out.append(max(padded, MIN_TILE))  # tiny tiles are padded up to MIN_TILE
    return tuple(out)


def _resized_size(h0: int, w0: int, cfg: InferenceConfig, ratio: float) -> tuple[int, int]:
    if cfg.size is not None:
        return max(1, int(cfg.size[0] * ratio + 0.5)), max(1, int(cfg.size[1] * ratio + 0.5))
    return keep_ratio_size(h0, w0, cfg.scale, ratio, cfg.size_divisor)


def _plan(image: np.ndarray, cfg: InferenceConfig) -> list[_Aug]:
    h0, w0 = image.shape[:2]
    augs = []
    for ratio, flip in cfg.augmentations:
        size = _resized_size(h0, w0, cfg, ratio)
        x = resize_bilinear(image, size)
        x = normalize_images(x, cfg.mean, cfg.std)
        if flip:
            x = x[:, ::-1]
        if cfg.mode == "whole":
            windows, crop = [(0, size[0], 0, size[1])], None
        else:
            windows, crop = slide_windows(size[0], size[1], cfg.crop, cfg.stride), cfg.crop
        tiles, valid = [], []
        for y1, y2, x1, x2 in windows:
            th, tw = _tile_shape((y2 - y1, x2 - x1), crop, cfg.bucket)
            tile = np.zeros((th, tw, 3), np.float32)
            tile[: y2 - y1, : x2 - x1] = x[y1:y2, x1:x2]
            tiles.append(tile)
            valid.append(tuple(n if n >= MIN_TILE else p for n, p in ((y2 - y1, th), (x2 - x1, tw))))
        augs.append(_Aug(size, flip, windows, tiles, [None] * len(windows), [t.shape[:2] for t in tiles], valid))
    return augs


def _average_windows(aug: _Aug, window_logits: Sequence[np.ndarray]) -> np.ndarray:
    """mmseg slide_inference: overlapping windows' logits summed and divided by the window count."""
    h, w = aug.size
    preds = np.zeros((h, w, window_logits[0].shape[-1]), np.float32)
    count = np.zeros((h, w, 1), np.float32)
    for (y1, y2, x1, x2), tile_logits in zip(aug.windows, window_logits):
        preds[y1:y2, x1:x2] += tile_logits[: y2 - y1, : x2 - x1]
        count[y1:y2, x1:x2] += 1
    return preds / count


def _assemble(augs: list[_Aug], out_size: tuple[int, int]) -> np.ndarray:
    results = []
    for aug in augs:
        if len(aug.windows) == 1:
            y1, y2, x1, x2 = aug.windows[0]
            logits = aug.logits[0][: y2 - y1, : x2 - x1]
        else:
            logits = _average_windows(aug, aug.logits)
        if aug.flip:
            logits = logits[:, ::-1]
        results.append(resize_bilinear(np.ascontiguousarray(logits), out_size))
    if len(results) == 1:
        return results[0]
    return np.mean([softmax(r) for r in results], axis=0, dtype=np.float32).astype(np.float32)


OUTPUT_BUCKET = 32  # device-side resizing pads output sizes to multiples of this: fewer compilations


def _tile_then_image(x, tile_axes, image_axes):
    """Network logits -> upsampled to the tile (mmseg: to the padded input) -> cropped and resized to the
    image by `image_axes` (whose indices stay inside the tile's valid area)."""
    return _resample_rows_cols(_resample_rows_cols(x, *tile_axes), *image_axes)


_DEVICE_PROGRAMS = None


def _device_programs():
    """Jitted programs of the device assembly, compiled per shape (tile, padded output size)."""
    global _DEVICE_PROGRAMS
    if _DEVICE_PROGRAMS is None:
        import jax
        import jax.numpy as jnp

        _DEVICE_PROGRAMS = {
            "tile": jax.jit(_resample_rows_cols),
            "logits": jax.jit(_tile_then_image),
            "probs": jax.jit(
                lambda x, tile_axes, image_axes: jax.nn.softmax(_tile_then_image(x, tile_axes, image_axes), axis=-1)
            ),
            "labels": jax.jit(
                lambda x, tile_axes, image_axes: jnp.argmax(_tile_then_image(x, tile_axes, image_axes), axis=-1).astype(
                    jnp.int32
                )
            ),
            "argmax": jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)),
        }
    return _DEVICE_PROGRAMS


def _padded_axis(n_in: int, n_out: int, flip: bool = False):
    """`_axis_weights` padded to a multiple of OUTPUT_BUCKET outputs (the extra ones are cropped off);
    with flip, read the input mirrored (the logits of a flipped image)."""
    i0, i1, a, b = _axis_weights(n_in, n_out)
    if flip:
        i0, i1 = n_in - 1 - i0, n_in - 1 - i1
    pad = _round_up(n_out, OUTPUT_BUCKET) - n_out
    return (
        np.pad(i0, (0, pad)).astype(np.int32),
        np.pad(i1, (0, pad)).astype(np.int32),
        np.pad(a, (0, pad)),
        np.pad(b, (0, pad)),
    )


def logits_size(n):
    """The network's logits size for n input pixels (stage 1: kernel 7, stride 4, padding 3): ceil(n/4)."""
    return (n - 1) // 4 + 1


def _tile_axes(logits, tile_size, valid_size, exact: bool):
    """Axis vectors upsampling network logits to their tile's size (mmseg `resize` to the input): with
    `exact`, the tile's valid part's logits to the valid part (the padding takes no part), otherwise
    the padded tile's logits to the padded tile."""
    if exact:
        return tuple(_axis_weights(logits_size(n), n) for n in valid_size)
    return tuple(_axis_weights(n_in, n_out) for n_in, n_out in zip(logits.shape[:2], tile_size))


def _assemble_on_device(augs: list[_Aug], out_size: tuple[int, int], labels: bool, exact: bool) -> np.ndarray:
    """`_assemble` on the device, from the network's logits: the same steps with torch's bilinear weights
    (equal to the numpy path within float rounding, tested), without moving (H, W, num_labels) arrays
    to the host and resizing them there with numpy's slow gathers."""
    import jax

    programs = _device_programs()
    h0, w0 = out_size
    single = len(augs) == 1
    total = None
    for aug in augs:
        h, w = aug.size
        if len(aug.windows) == 1:
            logits = aug.logits[0]  # network logits of the tile
            tile_axes = _tile_axes(logits, aug.tile_sizes[0], aug.valid_sizes[0], exact)
        else:  # sliding windows: averaged on the host
            windows = [
                np.asarray(programs["tile"](t, *_tile_axes(t, size, valid, exact)))
                for t, size, valid in zip(aug.logits, aug.tile_sizes, aug.valid_sizes)
            ]
            logits = jax.device_put(_average_windows(aug, windows))
            tile_axes = (_axis_weights(h, h), _axis_weights(w, w))  # already at the image's resized size
        image_axes = (_padded_axis(h, h0), _padded_axis(w, w0, flip=aug.flip))
        if single:
            out = programs["labels" if labels else "logits"](logits, tile_axes, image_axes)
            return np.asarray(out)[:h0, :w0]
        probs = programs["probs"](logits, tile_axes, image_axes)
        total = probs if total is None else total + probs
    mean = total / len(augs)
    return np.asarray(programs["argmax"](mean) if labels else mean)[:h0, :w0]


def segment_batch(
    forward: Callable[[np.ndarray], np.ndarray],
    images: Sequence[np.ndarray],
    cfg: InferenceConfig = InferenceConfig(),
    *,
    labels: bool = False,
) -> list[np.ndarray]:
    """Segment RGB images (each (H, W, 3), uint8 or float 0..255, any size). Tiles of equal shape from
    all images and augmentations go through `forward` together. Returns per image (H, W, num_labels):
    logits (one augmentation) or mean softmax probabilities (TTA); with labels=True the (H, W) int32
    argmax of those instead. With a `TiledForward` the logits stay on its device and are resized
    (and reduced to labels) there; another callable gets the numpy path."""
    plans = []
    for image in images:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"images must be (H, W, 3) RGB; got shape {image.shape}")
        plans.append(_plan(image, cfg))
    groups: dict[tuple[int, ...], list[tuple[_Aug, int]]] = {}  # tiles of one shape go through together
    for augs in plans:
        for aug in augs:
            for k, tile in enumerate(aug.tiles):
                groups.setdefault(tile.shape, []).append((aug, k))
    on_device = isinstance(forward, TiledForward)
    for shape in sorted(groups):
        members = groups[shape]
        stacked = np.stack([aug.tiles[k] for aug, k in members])
        if on_device:
            logits = forward.on_device(stacked, np.asarray([aug.valid_sizes[k] for aug, k in members], np.int32))
        else:
            logits = forward(stacked)
        for (aug, k), out in zip(members, logits):
            aug.logits[k] = out
    for augs in plans:
        for aug in augs:
            aug.tiles = []  # free the inputs
    sizes = [np.asarray(image).shape[:2] for image in images]
    if on_device:
        return [_assemble_on_device(augs, size, labels, forward.exact) for augs, size in zip(plans, sizes)]
    results = [_assemble(augs, size) for augs, size in zip(plans, sizes)]
    return [np.argmax(r, axis=-1).astype(np.int32) for r in results] if labels else results


def segment(
    forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, cfg: InferenceConfig = InferenceConfig()
) -> np.ndarray:
    """`segment_batch` for one image."""
    return segment_batch(forward, [image], cfg)[0]


def whole_inference(forward, image, *, scale=None, size_divisor=None, bucket=32) -> np.ndarray:
    """Logits (H, W, num_labels) of one whole-image pass (see module docstring)."""
    return segment(forward, image, InferenceConfig("whole", scale=scale, size_divisor=size_divisor, bucket=bucket))


def slide_inference(forward, image, *, crop, stride, scale=None, bucket=32) -> np.ndarray:
    """Logits (H, W, num_labels) of mmseg's sliding-window inference (see module docstring)."""
    return segment(forward, image, InferenceConfig("slide", scale=scale, crop=crop, stride=stride, bucket=bucket))


def tile_shapes(image_sizes: Iterable[tuple[int, int]], cfg: InferenceConfig) -> set[tuple[int, int]]:
    """The distinct tile shapes (= compilations of TiledForward) that images of these sizes need."""
    shapes = set()
    for h0, w0 in image_sizes:
        for ratio, _ in cfg.augmentations:
            h, w = _resized_size(h0, w0, cfg, ratio)
            if cfg.mode == "whole":
                shapes.add(_tile_shape((h, w), None, cfg.bucket))
            else:
                for y1, y2, x1, x2 in slide_windows(h, w, cfg.crop, cfg.stride):
                    shapes.add(_tile_shape((y2 - y1, x2 - x1), cfg.crop, cfg.bucket))
    return shapes
