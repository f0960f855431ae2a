"""Oxford-IIIT Pet trimaps (TFDS oxford_iiit_pet: pet / background / boundary), a small fine-tuning
recipe: 512x512 crops, 20k iterations, batch 8, the paper's optimiser.

    python train.py --config configs/pets.py:b0 --workdir runs/pets_b0 --config.model.init_from=mit-b0
"""

from segformer_jax.training import recipes as common


def get_config(arg=None):
    from segformer_jax.data.config import dataset_preset

    variant = common.parse_variant(arg, "b0")
    data = dataset_preset("oxford_iiit_pet")
    config = common.paper_recipe(variant, data)
    config.total_steps = 20_000  # ~43 epochs of the 3,680 train images at batch 8
    config.batch_size = 8  # global batch
    config.optimizer.warmup_steps = 500  # shorter schedule, shorter warmup
    config.eval.every_steps = 2000  # evaluate (and checkpoint with mIoU) every this many updates
    config.checkpoint.every_steps = 1000  # checkpoint every this many updates
    return config
