"""Command line: convert SegFormer checkpoints between PyTorch / Hugging Face and Flax.

python -m weights_convert to-flax  HF_DIR_OR_FILE_OR_HUB_ID  OUT_DIR   # -> config.json + Orbax variables
python -m weights_convert to-hf    FLAX_DIR        OUT_DIR   # -> config.json + model.safetensors
"""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m weights_convert",
        description="Convert SegFormer checkpoints between PyTorch/Hugging Face and Flax (segformer_jax). "
        "Every source tensor must be used and every model variable filled; otherwise the "
        "missing/unused/mis-shaped keys are listed and nothing is written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python -m weights_convert to-flax nvidia/segformer-b0-finetuned-ade-512-512 ./b0-flax   # Hub id\n"
        "  python -m weights_convert to-flax ./segformer-b0-finetuned-ade-512-512 ./b0-flax\n"
        "  python -m weights_convert to-flax ./mit-b2 ./b2-cityscapes-init --num-labels 19\n"
        "  python -m weights_convert to-flax mit_b0.pth ./b0 --preset b0 --format nvlabs\n"
        "  python -m weights_convert to-hf ./b0-flax ./b0-hf   # then transformers "
        "SegformerForSemanticSegmentation.from_pretrained('./b0-hf')",
    )
    sub = p.add_subparsers(dest="command", required=True)

    to_flax = sub.add_parser("to-flax", help="PyTorch/HF (dir, .safetensors, .bin, .pth) -> Flax directory")
    to_flax.add_argument(
        "source",
        help="HF model directory, a Hugging Face Hub id (a local path of that name wins; HF_HUB_OFFLINE=1 reads "
        "only the cache), or a weights file (then give --preset or --config)",
    )
    to_flax.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    to_flax.add_argument("--format", default="auto", help="source key layout: auto (default), hf, nvlabs")
    to_flax.add_argument(
        "--architecture",
        default=None,
        choices=["SegformerForSemanticSegmentation", "SegformerForImageClassification", "SegformerModel"],
        help="target model (default: SegformerForSemanticSegmentation)",
    )
    to_flax.add_argument("--num-labels", type=int, default=None, help="new number of classes (head re-initialised)")
    to_flax.add_argument("--preset", default=None, help="architecture for a bare weights file: b0..b5")
    to_flax.add_argument("--config", default=None, help="config.json describing a bare weights file")
    to_flax.add_argument(
        "--layer-norm-eps",
        type=float,
        default=None,
        help="LayerNorm epsilon (default: 1e-5 for HF, 1e-6 for NVlabs originals)",
    )
    to_flax.add_argument(
        "--reinit",
        action="append",
        default=[],
        metavar="REGEX",
        help="re-initialise Flax variables matching REGEX instead of loading (repeatable)",
    )
    to_flax.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    to_flax.add_argument("--revision", default=None, help="Hub id only: branch, tag or commit (default: main)")
    to_flax.add_argument(
        "--cache-dir", default=None, help="Hub id only: the Hugging Face cache (default: HF_HUB_CACHE / ~/.cache)"
    )

    to_hf = sub.add_parser("to-hf", help="Flax (or HF) directory -> HF directory transformers can load")
    to_hf.add_argument("source", help="directory written by save_pretrained / to-flax (or any from_pretrained source)")
    to_hf.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    to_hf.add_argument(
        "--architecture",
        default=None,
        choices=["SegformerForSemanticSegmentation", "SegformerForImageClassification", "SegformerModel"],
    )
    to_hf.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return p


# The library's errors name its Python arguments; on the command line the same advice is a flag.
_PYTHON_TO_FLAGS = (
    ("pass overwrite=True", "pass --overwrite"),
    ("pass config=SegformerConfig(...) (or a preset)", "pass --preset b0..b5 or --config CONFIG_JSON"),
    ("use from_pretrained(..., num_labels=...) or reinit=[regex]", "use --num-labels N or --reinit REGEX"),
)


def _in_cli_terms(message: str) -> str:
    for python, flags in _PYTHON_TO_FLAGS:
        message = message.replace(python, flags)
    return message


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Our own loggers say what was re-initialised or left unused; other libraries' INFO lines (Orbax
    # prints ~30 per save) would bury that.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("segformer_jax", "weights_convert"):
        logging.getLogger(name).setLevel(logging.INFO)
    import segformer_jax
    from segformer_jax.models.config import NVLABS_LAYER_NORM_EPS, ConfigError, SegformerConfig
    from weights_convert.checkpoint_io import CheckpointFileError
    from weights_convert.convert import ConversionError

    try:
        if args.command == "to-flax":
            config = None
            if args.config:
                config = SegformerConfig.from_json_file(args.config)
            elif args.preset:
                config = SegformerConfig.preset(
                    args.preset, **({"num_labels": args.num_labels} if args.num_labels else {})
                )
            overrides = {}
            eps = args.layer_norm_eps
            if eps is None and args.format == "nvlabs":
                eps = NVLABS_LAYER_NORM_EPS
            if eps is not None:
                overrides["layer_norm_eps"] = eps
            model, variables = segformer_jax.from_pretrained(
                args.source,
                architecture=args.architecture,
                num_labels=args.num_labels,
                config=config,
                reinit=args.reinit,
                source_format=None if args.format == "auto" else args.format,
                revision=args.revision,
                cache_dir=args.cache_dir,
                **overrides,
            )
            out = segformer_jax.save_pretrained(model, variables, args.out_dir, format="flax", overwrite=args.overwrite)
        else:
            model, variables = segformer_jax.from_pretrained(args.source, architecture=args.architecture)
            out = segformer_jax.save_pretrained(model, variables, args.out_dir, format="hf", overwrite=args.overwrite)
    except (ConversionError, ConfigError, CheckpointFileError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {_in_cli_terms(str(e))}", file=sys.stderr)
        return 2
    n = sum(x.size for x in __import__("jax").tree_util.tree_leaves(variables["params"]))
    print(f"wrote {out} ({type(model).__name__}, {n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
