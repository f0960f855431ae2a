"""SegFormer in JAX/Flax, exact to Hugging Face transformers.

The package, floor by floor (a floor imports only the floors above it in this list):

    models/         the network: config and variants, the paper's blocks, encoder, decode head, fast kernels
    fileio.py       all-or-nothing writes;  xla_options.py  XLA flags and the compilation cache
    hugepages.py    glibc's huge-page malloc setting, which the command-line tools restart with
    data/           datasets (TFDS, folder), the tf.data augmentation recipe, palettes
    pretrained.py   from_pretrained / save_pretrained: Hugging Face, NVlabs and our own checkpoints
    inference/      whole / sliding-window / TTA inference, visualisation
    evaluation/     confusion matrices, mIoU / mPA / aAcc
    training/       state, train_step, checkpoints, logging, the loop, optimiser, loss, config recipes
    deploy/         export (StableHLO, SavedModel, TFLite, ONNX, OpenVINO), int8 quantization
    predict.py, evaluate.py, quantize.py, export.py   the command-line tools (`python -m segformer_jax.<tool>`)

`weights_convert/` (beside this package) holds the checkpoint key tables and the conversion CLI;
`tests/test_layout.py` checks the floors and that no import cycle exists.
"""

from segformer_jax import _moved
from segformer_jax.models.config import VARIANTS, ConfigError, SegformerConfig
from segformer_jax.models.model import SegformerForImageClassification, SegformerForSemanticSegmentation, SegformerModel
from segformer_jax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_images

_moved.install()

__all__ = [
    "VARIANTS",
    "ConfigError",
    "SegformerConfig",
    "SegformerModel",
    "SegformerForSemanticSegmentation",
    "SegformerForImageClassification",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_images",
    "from_pretrained",
    "save_pretrained",
]


def __getattr__(name):  # pretrained I/O pulls in orbax/safetensors: import it on first use
    if name in ("from_pretrained", "save_pretrained"):
        from segformer_jax import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'segformer_jax' has no attribute {name!r}")
