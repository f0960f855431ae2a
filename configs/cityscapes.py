"""Cityscapes (TFDS cityscapes/semantic_segmentation, 19 train ids), the paper's recipe: 1024x1024
crops, 160k iterations, batch 8 (8 GPUs x 1), sliding-window eval 1024x1024 stride 768 on the full
1024x2048 images.

    python train.py --config configs/cityscapes.py:b2 --workdir runs/cs_b2 --config.model.init_from=mit-b2
"""

from segformer_jax.training import recipes as common


def get_config(arg=None):
    from segformer_jax.data.config import dataset_preset

    variant = common.parse_variant(arg, "b0")
    data = dataset_preset("cityscapes")  # crop (1024, 1024), scale (2048, 1024)
    config = common.paper_recipe(variant, data)
    config.batch_size = 8  # NVlabs cityscapes configs: samples_per_gpu=1 on 8 GPUs
    config.eval.mode = "slide"  # mmseg test_cfg mode='slide'
    config.eval.crop_size = (1024, 1024)  # slide window (h, w)
    config.eval.stride = (768, 768)  # slide stride (h, w)
    config.eval.batch_size = 8  # images per eval batch (global)
    return config
