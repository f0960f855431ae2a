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
