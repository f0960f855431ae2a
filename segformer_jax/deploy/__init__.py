"""Shipping a trained model.

    export.py       StableHLO (jax.export), TensorFlow SavedModel (jax2tf), TFLite, ONNX (jax2onnx),
                    OpenVINO IR (from the ONNX file); `main` is `python -m segformer_jax.export`
    quantize.py     int8 weight-only checkpoints (per-output-channel scales) and their apply function

May import: models, pretrained, inference. CLIs on top: `python -m segformer_jax.quantize`,
`python -m segformer_jax.export`.
"""
