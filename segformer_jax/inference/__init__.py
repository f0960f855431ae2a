"""Segmenting images with a trained model.

    tiling.py       whole-image / sliding-window / multi-scale + flip (TTA) inference, as mmseg's test
                    procedure; InferenceConfig, TiledForward (one compile per tile shape), the settings
                    a model directory carries (inference.json)
    visualize.py    colour overlays and comparison grids

May import: models, data (its eval settings and palettes), pretrained. The predict CLI on top of it is
`python -m segformer_jax.predict`.

The names below are the documented API (`from segformer_jax import inference; inference.segment(...)`).
"""

from segformer_jax.inference.tiling import (
    MIN_TILE,
    SETTINGS_NAME,
    InferenceConfig,
    TiledForward,
    config_from_training,
    keep_ratio_size,
    load_settings,
    resize_bilinear,
    save_settings,
    segment,
    segment_batch,
    slide_inference,
    slide_windows,
    softmax,
    tile_shapes,
    whole_inference,
)

__all__ = [
    "MIN_TILE",
    "SETTINGS_NAME",
    "InferenceConfig",
    "TiledForward",
    "config_from_training",
    "keep_ratio_size",
    "load_settings",
    "resize_bilinear",
    "save_settings",
    "segment",
    "segment_batch",
    "slide_inference",
    "slide_windows",
    "softmax",
    "tile_shapes",
    "whole_inference",
]
