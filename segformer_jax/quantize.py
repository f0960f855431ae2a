"""`python -m segformer_jax.quantize MODEL OUT`: the int8 weight-only checkpoint of a float32 model.

The quantization itself (and its Python API) is `segformer_jax.deploy.quantize`.
"""

from __future__ import annotations

import os

from segformer_jax._moved import forward_module_attributes
from segformer_jax.deploy.quantize import QuantizedCheckpointError, checkpoint_bytes, quantize_variables, save_quantized

# `segformer_jax.quantize.load_quantized` and the rest of the old module keep working for one release.
__getattr__ = forward_module_attributes(__name__, "segformer_jax.deploy.quantize")


def main(argv=None) -> int:
    """python -m segformer_jax.quantize MODEL_DIR OUT_DIR: a float32 model (any from_pretrained
    source, e.g. a train.py workdir's final/) -> its int8 weight-only checkpoint."""
    import argparse
    import shutil
    import sys

    from segformer_jax.models.config import ConfigError
    from weights_convert.checkpoint_io import CheckpointFileError
    from weights_convert.convert import ConversionError

    p = argparse.ArgumentParser(
        prog="python -m segformer_jax.quantize",
        description="Write the int8 weight-only checkpoint of a float32 SegFormer: kernels become int8 with one "
        "float32 scale per output channel, the rest stays float32 (~4x smaller). Load it with "
        "segformer_jax.deploy.quantize.load_quantized, or give it to segformer_jax.predict --model.",
    )
    p.add_argument("model", help="float32 model directory (Hugging Face, save_pretrained, train.py's <workdir>/final)")
    p.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = p.parse_args(argv)
    from segformer_jax.pretrained import from_pretrained

    try:
        model, variables = from_pretrained(args.model)
        out = save_quantized(model, quantize_variables(variables), args.out_dir, overwrite=args.overwrite)
        from segformer_jax.inference import SETTINGS_NAME

        if os.path.isfile(os.path.join(args.model, SETTINGS_NAME)):  # predict's defaults travel with the weights
            shutil.copyfile(os.path.join(args.model, SETTINGS_NAME), os.path.join(out, SETTINGS_NAME))
    except (
        ConfigError,
        ConversionError,
        CheckpointFileError,
        QuantizedCheckpointError,
        FileNotFoundError,
        FileExistsError,
    ) as e:
        print(f"error: {str(e).replace('pass overwrite=True', 'pass --overwrite')}", file=sys.stderr)
        return 2
    before, after = checkpoint_bytes(args.model), checkpoint_bytes(out)
    print(f"wrote {out} (int8 weights {after / 2**20:.1f} MB; {args.model}: {before / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
