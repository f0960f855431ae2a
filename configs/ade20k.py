"""ADE20K (TFDS scene_parse150, 150 classes), the paper's recipe: 512x512 crops (640 for b5), 160k
iterations, batch 16, AdamW 6e-5, poly, reduce-zero-label, whole-image eval at short side 512 with sizes
rounded up to multiples of 32 (NVlabs AlignedResize, `data.eval_size_divisor`).

    python train.py --config configs/ade20k.py:b2 --workdir runs/ade20k_b2 \
        --config.model.init_from=path/to/mit-b2     # ImageNet encoder, as in the paper
"""

from segformer_jax.training import recipes as common


def get_config(arg=None):
    from segformer_jax.data.config import dataset_preset

    variant = common.parse_variant(arg, "b0")
    data = dataset_preset("scene_parse150")  # reduce_zero_label on (dataset default)
    if variant == "b5":  # NVlabs segformer.b5.640x640.ade.160k
        data.crop_size = (640, 640)  # (h, w) training crop
        data.scale = (2048, 640)  # (w, h) mmseg img_scale
        data.eval_scale = (2048, 640)  # (w, h) eval resize
    config = common.paper_recipe(variant, data)
    return config
