"""The network, as the paper draws it (Xie et al., 2021, arXiv 2105.15203).

    config.py       SegformerConfig and the variant table b0..b5 (one place)
    layers.py       the paper's blocks, one class each: OverlapPatchEmbed, EfficientSelfAttention
                    (spatial reduction sr), MixFFN (3x3 depthwise conv + GELU), Block, LayerNorm
    encoder.py      MixVisionTransformer (MiT): four stages of blocks
    decode_head.py  the all-MLP decode head (per-stage MLP, upsample to 1/4, fuse, classify)
    model.py        SegformerModel / ...ForSemanticSegmentation / ...ForImageClassification
    kernels.py      the same functions computed faster (depthwise conv, attention core, LayerNorm,
                    bilinear upsampling, GELU): hand-written VJPs and CPU-friendly forms
    preprocess.py   ImageNet normalisation of uint8 images (the model's input convention)

May import: jax, flax, numpy and each other. Nothing here knows about training, data, files or
torch: this is the floor every other part stands on.
"""
