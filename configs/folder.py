"""Your own data: a folder with images/ and masks/ (or train/ and val/ with those inside), masks are
PNGs of class ids (255 = ignore). See segformer_jax/data/folder.py for the layout and class names.

    python train.py --config configs/folder.py:b2 --workdir runs/mine \
        --config.data.folder=/path/to/dataset --config.model.init_from=path/to/mit-b2
"""

from segformer_jax.training import recipes as common


def get_config(arg=None):
    from segformer_jax.data.config import dataset_preset

    variant = common.parse_variant(arg, "b0")
    data = dataset_preset("folder")  # crop 512, scale (2048, 512); set data.folder
    config = common.paper_recipe(variant, data)
    config.total_steps = 40_000  # optimiser updates; scale with your dataset size
    config.batch_size = 8  # global batch
    config.eval.every_steps = 4000  # evaluate (and checkpoint with mIoU) every this many updates
    config.checkpoint.every_steps = 2000  # checkpoint every this many updates
    return config
