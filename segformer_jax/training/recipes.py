"""The SegFormer training recipe shared by every config (NVlabs mmseg `schedule_160k` + AdamW).

Not a config itself: `configs/<dataset>.py` start from `paper_recipe` and override what differs.
It lives in the package (not in configs/) because config files are loaded by path, where sibling
imports do not work.
"""

import ml_collections

VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5")

# A few-thousand-parameter SegFormer for tests and smoke runs (`configs/default.py:tiny`).
TINY_ARCHITECTURE = dict(
    hidden_sizes=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_attention_heads=(1, 1, 1, 2), decoder_hidden_size=16
)


def parse_variant(arg, default="b0"):
    """`--config configs/x.py:b2` -> 'b2' (also accepts 'mit-b2', 'segformer-b2')."""
    variant = (arg or default).lower().removeprefix("mit-").removeprefix("segformer-")
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown SegFormer variant {arg!r}; use one of {', '.join(VARIANTS)} (e.g. --config configs/ade20k.py:b2)"
        )
    return variant


def paper_recipe(variant, data):
    """The paper's recipe for `variant` on the data config `data` (an input_pipeline data ConfigDict)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, dropout / drop-path keys, data order and augmentation
    c.total_steps = 160_000  # optimiser updates (paper: 160k iterations on ADE20K / Cityscapes)
    c.batch_size = 16  # global batch (all devices, all hosts); paper: 8 GPUs x 2 images
    c.log_every_steps = 50  # train metrics (loss, lr, grad norm, images/s) averaged over this many steps
    c.progress_bar = True  # tqdm bar with loss, lr, images/s and ETA (process 0 only)
    c.max_steps_this_run = 0  # stop (with a checkpoint) after this many steps of this run; 0 = run to the end
    c.multi_host = False  # call jax.distributed.initialize() (also: env SEGFORMER_MULTI_HOST=1)

    c.model = ml_collections.ConfigDict()
    c.model.variant = variant  # b0..b5 architecture, used when init_from is empty
    c.model.init_from = ""  # HF / segformer_jax dir (e.g. converted nvidia/mit-b2 ImageNet encoder); '' = from scratch
    c.model.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (mixed precision; parameters stay float32)
    c.model.drop_path_rate = 0.1  # stochastic depth at the last block (NVlabs: 0.1 for all variants)
    c.model.classifier_dropout_prob = 0.1  # dropout before the head classifier (NVlabs: 0.1)
    c.model.depthwise_conv_impl = (
        "auto"  # Mix-FFN depthwise conv implementation ('auto'|'native'|'shifted'); speed only
    )
    c.model.decode_head_impl = (
        "auto"  # decode head fusion implementation ('auto'|'concat'|'fused'|'phased'); speed only
    )
    c.model.remat_blocks = False  # recompute encoder blocks in the backward pass (memory for large crops)
    c.model.scan_blocks = False  # each stage's blocks as one lax.scan (compile time of deep variants)
    c.model.binary = False  # one sigmoid logit (num_labels=1, HF BCE) for a 2-class dataset: 0 background, 1 fg
    c.model.overrides = ml_collections.ConfigDict()  # other SegformerConfig fields over the variant (tiny test models)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 6e-5  # AdamW peak lr of the encoder (paper: 6e-5)
    c.optimizer.head_lr_mult = 10.0  # decode_head lr = learning_rate x this (NVlabs lr_mult=10)
    c.optimizer.b1 = 0.9  # AdamW beta1
    c.optimizer.b2 = 0.999  # AdamW beta2
    c.optimizer.eps = 1e-8  # AdamW epsilon (torch default)
    c.optimizer.weight_decay = 0.01  # decoupled weight decay (torch AdamW semantics)
    c.optimizer.no_decay_patterns = ("layer_norm", "batch_norm")  # regexes on param paths without decay (norms)
    c.optimizer.warmup_steps = 1500  # linear warmup updates (mmcv warmup_iters)
    c.optimizer.warmup_ratio = 1e-6  # lr at step 0 = lr x this (mmcv warmup_ratio)
    c.optimizer.poly_power = 1.0  # poly decay power after warmup
    c.optimizer.min_lr = 0.0  # poly decay end value
    c.optimizer.grad_clip_norm = 0.0  # global-norm gradient clipping; 0 = off (NVlabs: off)
    c.optimizer.grad_accum_steps = 1  # micro-batches of batch_size per update (optax.MultiSteps); 1 = off

    c.loss = ml_collections.ConfigDict()
    c.loss.reduction = "all"  # 'all': mean over all pixels incl. ignored (mmseg default, NVlabs); 'valid': HF
    # (name, weight) pairs summed (mmseg loss_decode list); names: cross_entropy, ohem_cross_entropy, dice,
    # lovasz_softmax, focal (training/losses.py)
    c.loss.terms = (("cross_entropy", 1.0),)
    c.loss.class_weight = None  # None | one weight per class (torch weight=) | 'inverse_sqrt_frequency' (train masks)
    c.loss.label_smoothing = 0.0  # cross_entropy label smoothing (torch label_smoothing)
    c.loss.ohem_thresh = 0.7  # ohem_cross_entropy: keep pixels whose true-class probability is below this
    c.loss.ohem_min_kept = 100_000  # ohem_cross_entropy: at least this many pixels per image (mmseg min_kept)
    c.loss.dice_smooth = 1.0  # dice: smoothing added to numerator and denominator (mmseg smooth)
    c.loss.dice_exponent = 2.0  # dice: exponent of the probabilities in the denominator (mmseg exponent)
    c.loss.focal_gamma = 2.0  # focal: (1 - p)^gamma

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 16_000  # evaluate (and checkpoint with mIoU) every this many updates; 0 = only at the end
    c.eval.batch_size = 8  # global eval batch (must divide by the device count)
    c.eval.mode = "whole"  # 'whole' image or 'slide' (mmseg slide_inference)
    c.eval.crop_size = ()  # slide: window (h, w)
    c.eval.stride = ()  # slide: stride (h, w)
    c.eval.num_vis = 4  # validation images in the PNG grid written at each eval
    c.eval.binary_threshold = 0.5  # binary models: foreground where sigmoid(logit) > this (0.5: logit > 0)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 4000  # checkpoint every this many updates (eval steps always checkpoint)
    c.checkpoint.keep = 3  # most recent checkpoints kept (plus the best by mIoU)
    c.checkpoint.async_save = True  # write checkpoints in the background

    c.data = data  # input pipeline (segformer_jax.data.input_pipeline.default_data_config)
    return c
