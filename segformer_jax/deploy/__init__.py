"""Shipping a trained model.

    export.py       StableHLO (jax.export), TensorFlow SavedModel (jax2tf), TFLite
    quantize.py     int8 weight-only checkpoints (per-output-channel scales) and their apply function

May import: models, pretrained, inference. CLIs: `python -m segformer_jax.quantize`.
"""
