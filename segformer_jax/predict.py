"""Segment image files with a SegFormer: label PNGs (class ids) and colour overlays.

    python -m segformer_jax.predict --model ./segformer-b0-ade --output ./out photos/ 'more/*.jpg' one.png
    python -m segformer_jax.predict --model ./b2-city --output out --mode slide --scale 2048x1024 \\
        --crop 1024x1024 --stride 768x768 --ratios 0.5,0.75,1,1.25,1.5,1.75 --flip city/*.png

From Python: `predict(["photos/"], "./segformer-b0-ade", "out")`.

For every input `NAME.ext` it writes `NAME.png` (class id per pixel, 8-bit, or 16-bit when there are
more than 256 classes) and `NAME_overlay.png` (palette colours blended over the image), each through
a temporary file renamed into place, so no half-written file is ever left. Images are grouped by
tile shape (see `segformer_jax.inference`), batched and run through one jitted function per shape.
A bad input (not an image, truncated, too small, ...) is reported and skipped; the rest go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

import numpy as np

from segformer_jax import inference, xla_options
from segformer_jax.data import palettes
from segformer_jax.fileio import atomic_file

logger = logging.getLogger("segformer_jax")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
MIN_IMAGE_SIDE = 8


class ImageError(ValueError):
    """An input file that cannot be segmented (the message says why)."""


class OutputError(OSError):
    """The output folder cannot be written."""


# ------------------------------------------------------------------------------------ inputs
def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files, folders (their image files, not recursive) and glob patterns -> sorted unique files.
    Raises FileNotFoundError for an input that matches nothing, ValueError if no image is found."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files, problems = [], []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f))
            )
            if not found:
                problems.append(f"{item}: folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.isfile(item):
            files.append(item)  # given explicitly: tried whatever its extension
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(item) if os.path.isfile(f))
            if not found:
                problems.append(f"{item}: pattern matches no files")
            files += found
        else:
            problems.append(f"{item}: no such file or folder")
    seen, unique = set(), []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    for p in problems:
        logger.warning("%s", p)
    if not unique:
        raise FileNotFoundError("no images to segment:\n    " + "\n    ".join(problems or ["(no inputs given)"]))
    return unique


def _open(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (PIL cannot identify the file format)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot open ({e})") from None


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the header only."""
    with _open(path) as img:
        w, h = img.size
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"{path}: image is {w}x{h} pixels; at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed")
    return h, w


def load_image(path: str) -> tuple[np.ndarray, list[str]]:
    """-> (H, W, 3) uint8 RGB and notes about conversions. Grayscale, palette, CMYK and alpha images
    are converted to RGB (alpha dropped); 16-bit images are scaled to 8 bits."""
    notes = []
    with _open(path) as img:
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", broken chunks
            raise ImageError(f"{path}: truncated or corrupt image ({e})") from None
        w, h = img.size
        if min(h, w) < MIN_IMAGE_SIDE:
            raise ImageError(f"{path}: image is {w}x{h} pixels; at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed")
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(img).astype(np.float64)
            top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
            arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
            notes.append(f"{mode} ({'16-bit' if top > 255 else 'integer'}) grayscale converted to 8-bit RGB")
            rgb = np.repeat(arr[..., None], 3, axis=-1)
        else:
            if mode != "RGB":
                notes.append(f"{mode} image converted to RGB" + (" (alpha dropped)" if "A" in mode else ""))
            rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb, np.uint8), notes


# ------------------------------------------------------------------------------------ outputs
def check_output_dir(out_dir: str) -> str:
    """Create `out_dir` if needed and prove it is writable, before any model work."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
    return out_dir


def _save_png_atomic(array: np.ndarray, path: str) -> None:
    from PIL import Image

    with atomic_file(path) as f:
        if array.dtype == np.uint16:
            Image.fromarray(array.astype(np.uint16)).save(f, format="PNG")  # mode I;16
        else:
            Image.fromarray(array).save(f, format="PNG")


def _output_names(files: Sequence[str]) -> list[str]:
    names, used = [], set()
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        name, k = stem, 1
        while name in used:
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


# ------------------------------------------------------------------------------------ model
def binary_apply(apply_fn, threshold: float = 0.5):
    """A binary model's apply (one logit channel x) as two channels (logit(threshold), x): their argmax
    is the 0 / 1 mask sigmoid(x) > threshold (logit > 0 at 0.5, HF's rule), and their softmax is
    (1 - p, p) with p = sigmoid(x - logit(threshold)), which TTA averages as for any model."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"binary threshold={threshold}: a probability strictly between 0 and 1")
    offset = float(np.log(threshold / (1.0 - threshold)))

    def apply(variables, images, *args, **kwargs):
        import jax.numpy as jnp

        logits = apply_fn(variables, images, *args, **kwargs)
        return jnp.concatenate([jnp.full_like(logits, offset), logits], axis=-1)

    return apply


def load_model(path: str | os.PathLike, dtype: str = "float32"):
    """-> (model, apply_fn, variables) from a from_pretrained directory or an int8 checkpoint
    written by `segformer_jax.deploy.quantize.save_quantized`; `dtype`: the compute dtype."""
    from segformer_jax.deploy import quantize

    if quantize.is_quantized(path):
        model, qvariables = quantize.load_quantized(path, dtype=dtype)
        return model, quantize.quantized_apply(model), qvariables
    from segformer_jax.pretrained import from_pretrained

    model, variables = from_pretrained(path, dtype=dtype)
    return model, model.apply, variables


@dataclasses.dataclass
class PredictResult:
    written: list[tuple[str, str, str | None]] = dataclasses.field(default_factory=list)  # (input, labels, overlay)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (input, message)
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (input, note)
    compilations: int = 0
    seconds: float = 0.0


def predict(
    inputs,
    model,
    out_dir,
    *,
    variables=None,
    apply_fn=None,
    forward: inference.TiledForward | None = None,
    config: inference.InferenceConfig = inference.InferenceConfig(),
    batch_size: int = 4,
    palette: str | np.ndarray | None = "auto",
    alpha: float = 0.5,
    overlay: bool = True,
    progress: bool = True,
    chunk_images: int = 16,
    threshold: float = 0.5,
    dtype: str = "float32",
) -> PredictResult:
    """Segment `inputs` (files, folders, globs) and write label PNGs + overlays into `out_dir`.

    model: a model directory (from_pretrained / save_pretrained / quantize.save_quantized), or a
        Flax module with `variables` (and optionally `apply_fn`, default model.apply).
    forward: reuse a TiledForward (and its compilations) across calls.
    config: whole / slide, resize scale, TTA ratios and flip, crop/stride, bucket.
    threshold: binary models (one logit channel): foreground (1) where sigmoid(logit) > threshold; a
        `forward` given for such a model must be built on `binary_apply`.
    dtype: compute dtype of a model loaded from a directory: 'float32' (exact) or 'bfloat16' (bfloat16
        matmuls and convs with float32 accumulation; see README, Speed).
    Returns a PredictResult (written files, failures with messages, compilations, seconds).
    Raises before any model work if no image is found or out_dir cannot be written."""
    start = time.perf_counter()
    files = expand_inputs(inputs)
    out_dir = check_output_dir(out_dir)
    inside = [f for f in files if os.path.dirname(os.path.realpath(f)) == os.path.realpath(out_dir)]
    if inside:
        raise OutputError(
            f"the output folder {out_dir} holds {len(inside)} of the input images "
            f"({', '.join(os.path.basename(f) for f in inside[:5])}{', ...' if len(inside) > 5 else ''}): "
            "the label maps (NAME.png) would overwrite them, and a rerun would read the outputs as "
            "inputs; choose another output folder"
        )
    if isinstance(model, (str, os.PathLike)):
        model, apply_fn, variables = load_model(model, dtype)
    elif variables is None and forward is None:
        raise ValueError("predict: pass a model directory, or a Flax model with variables=")
    if forward is None:
        apply = apply_fn or model.apply
        if model.config.num_labels == 1:  # binary: mask PNG of 0 / 1, overlay of the foreground
            apply = binary_apply(apply, threshold)
        forward = inference.TiledForward(apply, variables, batch_size)
    num_labels = max(model.config.num_labels, 2)
    colours = (
        np.asarray(palette, np.uint8) if isinstance(palette, np.ndarray) else palettes.get_palette(palette, num_labels)
    )
    label_dtype = np.uint8 if num_labels <= 256 else np.uint16
    compilations_before = forward.compilations
    result = PredictResult()

    # Read headers, then order by tile shape so batches are full and shapes are grouped.
    sized = []
    for f, name in zip(files, _output_names(files)):
        try:
            sized.append((f, name, image_size(f)))
        except ImageError as e:
            result.failed.append((f, str(e)))
            logger.error("%s", e)

    def order(item):
        return sorted(inference.tile_shapes([item[2]], config)), item[0]

    sized.sort(key=order)

    from tqdm import tqdm

    bar = tqdm(total=len(sized), unit="img", disable=not progress, desc="segmenting")
    try:
        for i in range(0, len(sized), chunk_images):
            chunk = sized[i : i + chunk_images]
            images, ok = [], []
            for f, name, _ in chunk:
                try:
                    image, notes = load_image(f)
                except ImageError as e:
                    result.failed.append((f, str(e)))
                    logger.error("%s", e)
                    continue
                for note in notes:
                    result.notes.append((f, note))
                    logger.warning("%s: %s", f, note)
                images.append(image)
                ok.append((f, name))
            if images:
                try:
                    label_maps = inference.segment_batch(forward, images, config, labels=True)
                except Exception as e:  # the network failed on this chunk: report its images, go on
                    for f, _ in ok:
                        result.failed.append((f, f"inference failed: {type(e).__name__}: {e}"))
                    logger.error("inference failed on %d image(s): %s", len(ok), e)
                    label_maps = []
                for (f, name), image, label_map in zip(ok, images, label_maps):
                    labels = label_map.astype(label_dtype)
                    label_path = os.path.join(out_dir, f"{name}.png")
                    overlay_path = os.path.join(out_dir, f"{name}_overlay.png") if overlay else None
                    try:
                        _save_png_atomic(labels, label_path)
                        if overlay_path:
                            _save_png_atomic(palettes.overlay(image, labels, colours, alpha), overlay_path)
                    except OSError as e:
                        result.failed.append((f, f"cannot write output: {e}"))
                        logger.error("%s: cannot write output: %s", f, e)
                        continue
                    result.written.append((f, label_path, overlay_path))
            bar.update(len(chunk))
    finally:
        bar.close()
    result.compilations = forward.compilations - compilations_before
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------ CLI
def _pair(text: str, what: str) -> tuple[int, int] | None:
    if text.lower() in ("none", "native", "0"):
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected e.g. 512x512, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what}: expected two positive integers like 512x512, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segformer_jax.predict",
        description="Segment images with a SegFormer: NAME.png (class ids) and NAME_overlay.png per input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m segformer_jax.predict --model ./b0-ade --output out photos/ '*.jpg'\n"
        "  python -m segformer_jax.predict --model ./b2-city --output out --mode slide --scale 2048x1024 \\\n"
        "      --crop 1024x1024 --stride 768x768 city/\n"
        "  python -m segformer_jax.predict --model ./b0-ade --output out --ratios 0.5,0.75,1,1.25,1.5,1.75 "
        "--flip x.jpg",
    )
    p.add_argument("inputs", nargs="+", help="image files, folders, or glob patterns (quote them)")
    p.add_argument(
        "--model",
        required=True,
        help="model directory (Hugging Face, save_pretrained, or int8 quantized) or a Hugging Face Hub id "
        "(nvidia/segformer-b0-finetuned-ade-512-512; a local path of that name wins)",
    )
    p.add_argument("--output", "-o", required=True, help="output folder (created if needed)")
    p.add_argument(
        "--mode",
        choices=("whole", "slide"),
        default=None,
        help="default: as the model was evaluated in training (its inference.json), else whole",
    )
    p.add_argument(
        "--scale",
        default=None,
        help="keep-ratio resize scale LONGxSHORT as mmseg img_scale, e.g. 2048x512 (ADE20K), 2048x1024 "
        "(Cityscapes); 'none' keeps the image size. Default: the model's training eval scale "
        "(inference.json, written by train.py), else 2048x512",
    )
    p.add_argument("--ratios", default="1.0", help="multi-scale TTA ratios, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    p.add_argument("--flip", action="store_true", help="flip TTA (adds the mirrored image)")
    p.add_argument(
        "--crop", default=None, help="sliding-window size HxW (mode slide; default: the model's, else 512x512)"
    )
    p.add_argument(
        "--stride", default=None, help="sliding-window stride HxW (mode slide; default: the model's, else 341x341)"
    )
    p.add_argument(
        "--size-divisor",
        type=int,
        default=None,
        help="round resized sizes up to a multiple (NVlabs AlignedResize); 0: no rounding; default: "
        "the model's training eval setting, else none",
    )
    p.add_argument(
        "--bucket", default="32", help="pad tiles to multiples of this (fewer compilations); 'none': exact sizes"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype: float32 (exact to transformers) or bfloat16 (matmuls in bfloat16, float32 accumulation)",
    )
    p.add_argument("--palette", default="auto", help="auto | ade20k | cityscapes | generated")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="binary models (one logit channel): foreground where sigmoid(logit) > this (default 0.5: logit > 0)",
    )
    p.add_argument("--no-overlay", action="store_true", help="write label maps only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--compilation-cache",
        default=xla_options.DEFAULT_COMPILATION_CACHE,
        help="persistent XLA compilation cache folder ('' = off): a rerun with the same model and "
        "sizes loads its compiled programs instead of compiling them (default %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    xla_options.enable_compilation_cache(args.compilation_cache)
    try:
        try:
            ratios = tuple(float(r) for r in args.ratios.split(",") if r.strip())
        except ValueError:
            raise ValueError(f"--ratios={args.ratios}: give numbers, e.g. 0.5,0.75,1.0,1.25") from None
        try:
            bucket = None if args.bucket.lower() == "none" else int(args.bucket)
        except ValueError:
            raise ValueError(f"--bucket={args.bucket}: give a number of pixels, e.g. 32, or 'none'") from None
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha={args.alpha}: the overlay opacity is between 0 and 1")
        # Flags given win; then the settings the model was evaluated with in training; then the defaults.
        given = {k: v for k, v in (("mode", args.mode), ("size_divisor", args.size_divisor)) if v is not None}
        for name in ("scale", "crop", "stride"):
            if getattr(args, name) is not None:
                given[name] = _pair(getattr(args, name), f"--{name}")  # 'none' is a choice, not "unset"
        model_dir = args.model
        if not os.path.exists(model_dir):  # a Hub id: its (cached) snapshot carries the preprocessing
            from segformer_jax.pretrained import looks_like_hub_id, resolve_source

            model_dir = resolve_source(model_dir) if looks_like_hub_id(model_dir) else model_dir
        saved = inference.load_settings(model_dir) if os.path.isdir(model_dir) else {}
        from_model = {k: v for k, v in saved.items() if k not in given}
        if "scale" in given:
            from_model.pop("size", None)  # --scale replaces the processor's fixed resize
        if from_model:
            source = (
                f"as evaluated in training ({inference.SETTINGS_NAME})"
                if os.path.isfile(os.path.join(model_dir, inference.SETTINGS_NAME))
                else "its transformers preprocessor_config.json"
            )
            print(
                f"{args.model}: {source}: " + ", ".join(f"{k} {v}" for k, v in from_model.items()) + "; flags override",
                file=sys.stderr,
            )
        settings = {"mode": "whole", "scale": (2048, 512), **from_model, **given}
        config = inference.InferenceConfig(ratios=ratios, flip=args.flip, bucket=bucket, **settings)
    except (ValueError, FileNotFoundError, argparse.ArgumentTypeError) as e:  # HubError is a FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = predict(
            args.inputs,
            args.model,
            args.output,
            config=config,
            batch_size=args.batch_size,
            palette=args.palette,
            alpha=args.alpha,
            overlay=not args.no_overlay,
            threshold=args.threshold,
            progress=not args.quiet,
            dtype=args.dtype,
        )
    except (FileNotFoundError, OutputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{len(result.written)} image(s) segmented into {os.path.abspath(args.output)} in {result.seconds:.1f}s "
        f"({result.compilations} compilation(s)); {len(result.failed)} failed",
        file=sys.stderr,
    )
    for f, message in result.failed:
        print(f"  failed: {message}" if message.startswith(f) else f"  failed: {f}: {message}", file=sys.stderr)
    return 0 if not result.failed else (1 if result.written else 2)


if __name__ == "__main__":
    sys.exit(main())
