"""Export a SegFormer for serving without the Python model code.

1. StableHLO via `jax.export`, serialised to one file; reload with `load_stablehlo(path)` and call
   it on any batch size and any image size (symbolic dimensions b, h, w with h, w >= 32):

       save_stablehlo(model, variables, "b0.stablehlo")
       exported = load_stablehlo("b0.stablehlo")          # needs jax only, not segformer_jax
       logits = exported.call(images)                      # (b, ceil(h/4), ceil(w/4), num_labels)

2. A TensorFlow SavedModel via `jax2tf` (native serialisation: the StableHLO module inside an
   XlaCallModule op), with a `serving_default` signature `images: float32[None, None, None, 3]`:

       save_tf_saved_model(model, variables, "b0_savedmodel")
       tf.saved_model.load("b0_savedmodel").serve(images)

The weights are constants inside the artifact. Inputs are float32 NHWC ImageNet-normalised, as for
`model.apply` (uint8_input=True bakes `normalize_images` in); upsample=True returns logits at the
input size instead of 1/4.

`export_tflite` tries the TFLite converter on the SavedModel; see the README (Export section) for the outcome.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from segformer_jax.fileio import atomic_write_bytes
from segformer_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

MIN_SIDE = 32  # smallest image side the network accepts (stage 4 is 1/32)
SHAPE_SPEC = "b, h, w, 3"
CONSTRAINTS = (f"h >= {MIN_SIDE}", f"w >= {MIN_SIDE}")


def serving_fn(model, variables, *, uint8_input: bool = False, upsample: bool = False):
    """images -> logits, closing over the variables (they become constants of the artifact)."""
    from segformer_jax.models.decode_head import upsample_bilinear

    variables = jax.tree_util.tree_map(
        jnp.asarray, {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    )

    def fn(images):
        if uint8_input:
            images = (images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD
        logits = model.apply(variables, images)
        if upsample:
            logits = upsample_bilinear(logits, images.shape[1:3])
        return logits

    return fn


def input_spec(
    channels: int = 3,
    *,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
    uint8_input: bool = False,
) -> jax.ShapeDtypeStruct:
    """Symbolic (or partly fixed) input shape: b, h, w with h, w >= 32 unless given."""
    from jax import export

    dims = [str(batch) if batch else "b", str(height) if height else "h", str(width) if width else "w", str(channels)]
    constraints = [c for c, given in zip(CONSTRAINTS, (height, width)) if not given]
    shape = export.symbolic_shape(", ".join(dims), constraints=constraints)
    return jax.ShapeDtypeStruct(shape, jnp.uint8 if uint8_input else jnp.float32)


def export_stablehlo(
    model,
    variables,
    *,
    uint8_input: bool = False,
    upsample: bool = False,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
    platforms: Sequence[str] | None = None,
):
    """-> jax.export.Exported with symbolic batch and spatial dimensions (unless fixed by arguments)."""
    from jax import export

    fn = serving_fn(model, variables, uint8_input=uint8_input, upsample=upsample)
    spec = input_spec(model.config.num_channels, batch=batch, height=height, width=width, uint8_input=uint8_input)
    try:
        return export.export(jax.jit(fn), platforms=platforms)(spec)
    except Exception as e:  # shape-polymorphism failures surface as several exception types
        if batch is None and (height is None or width is None) and "symbolic" in str(e).lower():
            raise ValueError(
                "symbolic height/width could not be exported: an operation in the model needs concrete "
                f"sizes ({type(e).__name__}: {str(e).splitlines()[0]}). Export fixed sizes instead, e.g. "
                "export_stablehlo(..., height=512, width=512) (the batch stays symbolic)."
            ) from e
        raise


def save_stablehlo(model, variables, path: str | os.PathLike, **kwargs) -> str:
    """Serialise `export_stablehlo(...)` to `path` (bytes of `Exported.serialize()`)."""
    exported = export_stablehlo(model, variables, **kwargs)
    atomic_write_bytes(bytes(exported.serialize()), os.fspath(path))
    return os.fspath(path)


def load_stablehlo(path: str | os.PathLike):
    """-> jax.export.Exported; `.call(images)` runs it (compiled per concrete shape)."""
    from jax import export

    with open(path, "rb") as f:
        return export.deserialize(bytearray(f.read()))


# ------------------------------------------------------------------------------------ TensorFlow
def to_tf_function(
    model,
    variables,
    *,
    uint8_input: bool = False,
    upsample: bool = False,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
):
    """A tf.function of images[b, h, w, 3] (h, w >= 32), via jax2tf native serialisation. batch /
    height / width fix those dimensions (static shapes, e.g. for TFLite)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    fn = serving_fn(model, variables, uint8_input=uint8_input, upsample=upsample)
    dims = [
        str(batch) if batch else "b",
        str(height) if height else "h",
        str(width) if width else "w",
        str(model.config.num_channels),
    ]
    constraints = [c for c, given in zip(CONSTRAINTS, (height, width)) if not given]
    tf_fn = jax2tf.convert(
        fn, polymorphic_shapes=[f"({', '.join(dims)})"], polymorphic_constraints=constraints, with_gradient=False
    )
    dtype = tf.uint8 if uint8_input else tf.float32
    signature = [tf.TensorSpec([batch, height, width, model.config.num_channels], dtype, name="images")]
    return tf.function(tf_fn, autograph=False, jit_compile=True, input_signature=signature)


def save_tf_saved_model(model, variables, out_dir: str | os.PathLike, **kwargs) -> str:
    """Write a SavedModel with `serve` and the `serving_default` signature (atomic: staging + rename)."""
    import shutil

    import tensorflow as tf

    out_dir = os.path.abspath(os.fspath(out_dir))
    module = tf.Module()
    module.serve = to_tf_function(model, variables, **kwargs)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        tf.saved_model.save(module, staging, signatures={"serving_default": module.serve})
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def export_tflite(
    saved_model_dir: str | os.PathLike, out_path: str | os.PathLike, *, allow_select_tf_ops: bool = True
) -> str:
    """Convert a SavedModel from `save_tf_saved_model` to TFLite. Raises RuntimeError with the
    converter's reason when it refuses (jax2tf SavedModels hold an XlaCallModule op)."""
    import tensorflow as tf

    # Refuse symbolic shapes up front: the converter would fail on them too, after printing pages of MLIR.
    signature = tf.saved_model.load(os.fspath(saved_model_dir)).signatures.get("serving_default")
    for name, spec in signature.structured_input_signature[1].items() if signature is not None else ():
        if spec.shape.rank is None or None in spec.shape.as_list():
            raise RuntimeError(
                f"TFLite needs static shapes, but input {name!r} of {saved_model_dir} is {spec.shape}: write the "
                "SavedModel with save_tf_saved_model(..., batch=1, height=H, width=W), one per serving resolution"
            )
    converter = tf.lite.TFLiteConverter.from_saved_model(os.fspath(saved_model_dir))
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if allow_select_tf_ops:
        ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
    converter.target_spec.supported_ops = ops
    try:
        data = converter.convert()
    except Exception as e:
        first = next(
            (line for line in str(e).splitlines() if "XlaCallModule" in line or "error" in line.lower()),
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        raise RuntimeError(f"TFLite conversion failed: {first.strip()}") from e
    atomic_write_bytes(data, os.fspath(out_path))
    return os.fspath(out_path)


# ------------------------------------------------------------------------------------ ONNX / OpenVINO
# jax2onnx is not in the `export` extra: 0.17.1 pins orbax-checkpoint<0.11.37 (metadata only, it never
# imports orbax), which our orbax-checkpoint>=0.12 rules out, so pip cannot resolve both in one install.
ONNX_INSTALL_HINT = (
    "pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1 (--no-deps: its orbax-checkpoint<0.11.37 "
    "pin conflicts with segformer-jax's orbax-checkpoint>=0.12; jax2onnx never imports orbax)"
)
DEFAULT_SIZE = (512, 512)


class ExportDependencyError(ImportError):
    """An optional export package (onnx, onnxruntime, openvino, jax2onnx) is not installed."""


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportDependencyError(
            f"{what} needs the Python package {module!r} ({e}); install it: {ONNX_INSTALL_HINT}"
        ) from None


_CLAMP_LOCK = __import__("threading").Lock()


class _ClampAsMinMax:
    """jax2onnx 0.17.1's lax.clamp lowering cannot stamp a symbolic batch onto its output shape (it
    calls int() on the dimension). While tracing for ONNX, clamp is written as min(max(x, lo), hi):
    the same values for every float32 input, NaN included."""

    def __enter__(self):
        _CLAMP_LOCK.acquire()
        self._clamp = jax.lax.clamp
        jax.lax.clamp = lambda lo, x, hi: jnp.minimum(jnp.maximum(x, lo), hi)

    def __exit__(self, *exc):
        jax.lax.clamp = self._clamp
        _CLAMP_LOCK.release()


FLOAT32_ONLY_FORMATS = {
    "onnx": "ONNX Runtime's CPU kernels have no bfloat16 Einsum / MatMul, so a bfloat16 graph does not load",
    "openvino": "it is converted from the ONNX export, which is float32 only",
    "tflite": "TFLite's kernels have no bfloat16",
}


def check_float32_format(dtype, fmt: str) -> None:
    """A clear error for a bfloat16 model (compute `dtype`) exported to a format whose runtimes cannot
    run bfloat16."""
    from segformer_jax.models import kernels

    if fmt in FLOAT32_ONLY_FORMATS and kernels.is_reduced(dtype):
        raise ValueError(
            f"--format {fmt} exports float32 models only ({FLOAT32_ONLY_FORMATS[fmt]}); export with "
            "--dtype float32 and choose the precision in the runtime: OpenVINO runs a float32 model in bfloat16 "
            "on AMX / AVX-512-BF16 CPUs by default (INFERENCE_PRECISION_HINT). bfloat16 artifacts: --format "
            "stablehlo or savedmodel"
        )


def export_onnx(
    model,
    variables,
    *,
    height: int = DEFAULT_SIZE[0],
    width: int = DEFAULT_SIZE[1],
    batch: int | None = None,
    uint8_input: bool = False,
    upsample: bool = False,
    opset: int = 23,
):
    """-> onnx.ModelProto of images[b, height, width, 3] -> logits, through jax2onnx; the batch is
    symbolic ('b') unless `batch` is given. Height and width are fixed: jax2onnx 0.17.1 cannot lower
    the model with symbolic spatial sizes (export one file per serving resolution)."""
    check_float32_format(model.dtype, "onnx")
    _require("onnx", "ONNX export")
    jax2onnx = _require("jax2onnx", "ONNX export")
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"height={height}, width={width}: the network needs sides >= {MIN_SIDE}")
    fn = serving_fn(model, variables, uint8_input=uint8_input, upsample=upsample)
    spec = input_spec(model.config.num_channels, batch=batch, height=height, width=width, uint8_input=uint8_input)
    with _ClampAsMinMax():
        return jax2onnx.to_onnx(
            fn, [spec], model_name="segformer", opset=opset, input_names=["images"], output_names=["logits"]
        )


def save_onnx(model, variables, path: str | os.PathLike, **kwargs) -> str:
    """Write `export_onnx(...)` to `path` (one .onnx file, weights inside; atomic)."""
    proto = export_onnx(model, variables, **kwargs)
    atomic_write_bytes(proto.SerializeToString(), os.fspath(path))
    return os.fspath(path)


def save_openvino(model, variables, path: str | os.PathLike, *, onnx_path: str | os.PathLike | None = None, **kwargs):
    """Write an OpenVINO IR (`path` = NAME.xml, beside it NAME.bin) converted from the ONNX export
    (`onnx_path`, or one made here with `export_onnx(**kwargs)`). Weights stay float32 (no fp16
    compression); choose the precision at compile time (INFERENCE_PRECISION_HINT: bf16 is the CPU
    default where supported, f32 reproduces the live model). Atomic: both files or neither."""
    import shutil

    ov = _require("openvino", "OpenVINO export")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".xml"):
        raise ValueError(f"{path}: an OpenVINO IR path ends in .xml (the weights go beside it as .bin)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        source = onnx_path
        if source is None:
            source = save_onnx(model, variables, os.path.join(staging, "model.onnx"), **kwargs)
        ov_model = ov.convert_model(os.fspath(source))
        staged_xml = os.path.join(staging, os.path.basename(path))
        ov.save_model(ov_model, staged_xml, compress_to_fp16=False)
        os.replace(staged_xml[: -len(".xml")] + ".bin", path[: -len(".xml")] + ".bin")
        os.replace(staged_xml, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------ command line
FORMATS = ("stablehlo", "savedmodel", "tflite", "onnx", "openvino")


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size={text!r}: give HEIGHTxWIDTH, e.g. 512x512") from None
    return h, w


def main(argv=None) -> int:
    """python -m segformer_jax.export --format FORMAT MODEL OUT (also as segformer_jax.deploy.export)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m segformer_jax.export",
        description="Export a SegFormer (any from_pretrained source: a directory or a Hugging Face Hub id) for "
        "serving. Inputs: float32 NHWC ImageNet-normalised images (--uint8-input: raw 0..255); outputs: logits at "
        "1/4 of the input size (--upsample: at the input size).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m segformer_jax.export --format onnx nvidia/segformer-b0-finetuned-ade-512-512 b0.onnx\n"
        "  python -m segformer_jax.export --format openvino ./b0-flax b0.xml --size 512x683\n"
        "  python -m segformer_jax.export --format stablehlo ./b0-flax b0.stablehlo   # any batch and size\n"
        "formats: stablehlo (symbolic batch, height, width unless --size), savedmodel (same), tflite (static: "
        "--batch 1, --size), onnx / openvino (symbolic batch, fixed --size, default 512x512).",
    )
    p.add_argument("model", help="model directory or Hugging Face Hub id")
    p.add_argument("out", help="output file (.stablehlo, .onnx, .tflite, .xml) or directory (savedmodel)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--size", default=None, help="HEIGHTxWIDTH (required fixed size for onnx/openvino/tflite)")
    p.add_argument("--batch", type=int, default=None, help="fix the batch size (default: symbolic)")
    p.add_argument("--uint8-input", action="store_true", help="take uint8 RGB and normalise inside the artifact")
    p.add_argument("--upsample", action="store_true", help="return logits at the input size")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype baked into the artifact: float32 (exact) or bfloat16 (bf16 matmuls, f32 accumulation)",
    )
    args = p.parse_args(argv)

    from segformer_jax.models.config import ConfigError
    from segformer_jax.pretrained import from_pretrained
    from weights_convert.checkpoint_io import CheckpointFileError
    from weights_convert.convert import ConversionError

    try:
        size = _size(args.size) if args.size else None
        if os.path.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        kwargs = {"uint8_input": args.uint8_input, "upsample": args.upsample, "batch": args.batch}
        check_float32_format(args.dtype, args.format)  # before the model is loaded
        if args.format in ("onnx", "openvino", "tflite") or size:
            kwargs["height"], kwargs["width"] = size or DEFAULT_SIZE
        if args.format in ("onnx", "openvino"):
            _require("onnx", f"--format {args.format}")  # before the model is loaded
            _require("jax2onnx", f"--format {args.format}")
            if args.format == "openvino":
                _require("openvino", "--format openvino")
        model, variables = from_pretrained(args.model, dtype=args.dtype)
        if args.format == "stablehlo":
            out = save_stablehlo(model, variables, args.out, **kwargs)
        elif args.format == "savedmodel":
            out = save_tf_saved_model(model, variables, args.out, **kwargs)
        elif args.format == "tflite":
            kwargs["batch"] = kwargs["batch"] or 1
            with tempfile.TemporaryDirectory() as tmp:
                saved = save_tf_saved_model(model, variables, os.path.join(tmp, "savedmodel"), **kwargs)
                out = export_tflite(saved, args.out)
        elif args.format == "onnx":
            out = save_onnx(model, variables, args.out, **kwargs)
        else:
            out = save_openvino(model, variables, args.out, **kwargs)
    except (
        ConfigError,
        ConversionError,
        CheckpointFileError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        RuntimeError,
        ExportDependencyError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape = f"[{args.batch or 'b'}, " + (f"{kwargs['height']}, {kwargs['width']}" if "height" in kwargs else "h, w")
    print(f"wrote {out} ({args.format}, input {shape}, {model.config.num_channels}])")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
