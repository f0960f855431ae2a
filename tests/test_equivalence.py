"""Numeric equivalence with transformers' PyTorch SegFormer: every block, every preset, odd sizes,
train mode (BatchNorm statistics), gradients. Tolerance: 1e-4 max-abs-diff on logits of order 10."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import TINY, build_reference, images, max_abs_diff, to_flax, to_nhwc

import segformer_jax as sj
from segformer_jax.models import layers
from segformer_jax.models.decode_head import DecodeHead
from segformer_jax.models.encoder import MixVisionTransformer

ATOL = 1e-4
IMPLS = [("native", "concat"), ("shifted", "fused"), ("shifted", "phased")]


def _encoder_params(variables):
    return {"params": variables["params"]["segformer"]["encoder"]}


def _stage_input(ref, x_nchw, stage):
    """The HF input of `stage` (NCHW) and of its first block (tokens, height, width)."""
    hidden = torch.from_numpy(x_nchw)
    with torch.no_grad():
        for s in ref.segformer.stages[:stage]:
            hidden = s(hidden)
        tokens, h, w = ref.segformer.stages[stage].patch_embeddings(hidden)
    return hidden, tokens, h, w


# ----------------------------------------------------------------------------- blocks
def test_overlap_patch_embed(tiny_reference, tiny_flax):
    _, variables = tiny_flax
    x = images(2, 37, 50, seed=1, layout="NCHW")
    for stage, (k, s) in enumerate([(7, 4), (3, 2)]):
        hidden, tokens, h, w = _stage_input(tiny_reference, x, stage)
        module = layers.OverlapPatchEmbed(TINY["hidden_sizes"][stage], k, s)
        params = variables["params"]["segformer"]["encoder"][f"patch_embeddings_{stage}"]
        out = module.apply({"params": params}, to_nhwc(hidden))
        assert out.shape == (2, h, w, TINY["hidden_sizes"][stage])
        assert max_abs_diff(out.reshape(2, h * w, -1), tokens.numpy()) < 1e-5


@pytest.mark.parametrize("stage", [0, 1, 3], ids=["sr8", "sr4", "sr1"])
def test_efficient_self_attention(tiny_reference, tiny_flax, stage):
    _, variables = tiny_flax
    _, tokens, h, w = _stage_input(tiny_reference, images(2, 45, 61, seed=2, layout="NCHW"), stage)
    hf_block = tiny_reference.segformer.stages[stage].blocks[0]
    with torch.no_grad():
        want = hf_block.attention(tokens, h, w)[0].numpy()
    c = TINY["hidden_sizes"][stage]
    module = layers.Attention(c, TINY["num_attention_heads"][stage], [8, 4, 2, 1][stage])
    params = variables["params"]["segformer"]["encoder"][f"block_{stage}_0"]["attention"]
    got = module.apply({"params": params}, tokens.numpy().reshape(2, h, w, c))
    assert max_abs_diff(got.reshape(2, h * w, c), want) < 1e-5


@pytest.mark.parametrize("impl", ["native", "shifted"])
def test_mix_ffn(tiny_reference, tiny_flax, impl):
    _, variables = tiny_flax
    _, tokens, h, w = _stage_input(tiny_reference, images(2, 45, 61, seed=3, layout="NCHW"), 1)
    with torch.no_grad():
        want = tiny_reference.segformer.stages[1].blocks[1].mlp(tokens, h, w).numpy()
    module = layers.MixFFN(16, 4, depthwise_conv_impl=impl)
    params = variables["params"]["segformer"]["encoder"]["block_1_1"]["mlp"]
    got = module.apply({"params": params}, tokens.numpy().reshape(2, h, w, 16))
    assert max_abs_diff(got.reshape(2, h * w, 16), want) < 1e-5


def test_block(tiny_reference, tiny_flax):
    _, variables = tiny_flax
    _, tokens, h, w = _stage_input(tiny_reference, images(2, 45, 61, seed=4, layout="NCHW"), 1)
    with torch.no_grad():
        want = tiny_reference.segformer.stages[1].blocks[0](tokens, h, w).numpy()
    module = layers.Block(16, 2, 4)
    got = module.apply(
        {"params": variables["params"]["segformer"]["encoder"]["block_1_0"]}, tokens.numpy().reshape(2, h, w, 16)
    )
    assert max_abs_diff(got.reshape(2, h * w, 16), want) < 1e-5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage(tiny_reference, tiny_flax, stage):
    model, variables = tiny_flax
    hidden, *_ = _stage_input(tiny_reference, images(2, 45, 61, seed=5, layout="NCHW"), stage)
    with torch.no_grad():
        want = tiny_reference.segformer.stages[stage](hidden)
    encoder = MixVisionTransformer(model.config)
    got = encoder.apply(_encoder_params(variables), to_nhwc(hidden), stage, method=MixVisionTransformer.stage)
    assert max_abs_diff(got, to_nhwc(want)) < 1e-5


def test_encoder_hidden_states(tiny_reference, tiny_flax):
    model, variables = tiny_flax
    x = images(2, 45, 61, seed=6)
    with torch.no_grad():
        want = tiny_reference(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states
    _, features = model.apply(variables, x, output_hidden_states=True)
    assert len(features) == len(want) == 4
    for got, ref in zip(features, want):
        assert max_abs_diff(got, to_nhwc(ref)) < 1e-5


@pytest.mark.parametrize("impl", ["concat", "fused", "phased"])
def test_decode_head(tiny_reference, tiny_flax, impl):
    model, variables = tiny_flax
    x = torch.from_numpy(images(2, 45, 61, seed=7, layout="NCHW"))
    with torch.no_grad():
        hidden = tiny_reference(x, output_hidden_states=True).hidden_states
        want = tiny_reference.decode_head(hidden)
    head = DecodeHead(model.config.replace(decode_head_impl=impl))
    got = head.apply(
        {"params": variables["params"]["decode_head"], "batch_stats": variables["batch_stats"]["decode_head"]},
        [to_nhwc(h) for h in hidden],
    )
    assert np.abs(to_nhwc(want)).max() > 3  # logits of order 10, so 1e-4 is a relative 1e-5
    assert max_abs_diff(got, to_nhwc(want)) < ATOL


# ----------------------------------------------------------------------------- whole model
# Each size with one pair of implementations (concat and fused at two sizes each;
# phased here at stage-1 width 12, column-phase period 12; the variant tests below run it, as auto, at
# period 8).
@pytest.mark.parametrize(
    "size,impl",
    [
        ((2, 64, 64), IMPLS[0]),
        ((2, 67, 93), IMPLS[1]),
        ((1, 33, 129), IMPLS[0]),
        ((1, 100, 35), IMPLS[1]),
        ((2, 40, 48), IMPLS[2]),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v[0], int) else "-".join(v),
)
def test_logits_any_size(tiny_reference, tiny_flax, size, impl):
    model, variables = tiny_flax
    model = sj.SegformerForSemanticSegmentation(
        model.config.replace(depthwise_conv_impl=impl[0], decode_head_impl=impl[1])
    )
    b, h, w = size
    x = images(b, h, w, seed=h * w)
    with torch.no_grad():
        want = to_nhwc(tiny_reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits)
    got = jax.jit(model.apply)(variables, x)
    assert got.shape == (b, -(-h // 4), -(-w // 4), 7)
    assert max_abs_diff(got, want) < ATOL


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_every_preset(variant):
    """The published architectures (random weights) at a small, non-square input."""
    cfg = sj.SegformerConfig.preset(variant, num_labels=19)
    hf_kwargs = dict(hidden_sizes=cfg.hidden_sizes, depths=cfg.depths, decoder_hidden_size=cfg.decoder_hidden_size)
    ref = build_reference(num_labels=19, seed=1, image_size=(64, 96), **hf_kwargs)
    model, variables = to_flax(ref)
    assert model.config == cfg.replace(drop_path_rate=ref.config.drop_path_rate)
    x = images(1, 64, 96, seed=3)
    with torch.no_grad():
        want = to_nhwc(ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits)
    got = model.apply(variables, x)  # eager: one-shot, and op compilations are shared between presets
    print(f"{variant}: max-abs-diff {max_abs_diff(got, want):.2e} on logits up to {np.abs(want).max():.1f}")
    assert max_abs_diff(got, want) < ATOL


# Parameter counts of the published models (HF SegformerForSemanticSegmentation, 150 labels, and the
# ImageNet SegformerForImageClassification, 1000 labels): 3.8M / 13.7M / 27.5M / 47.3M / 64.1M / 84.7M.
PARAM_COUNTS = {
    "b0": (3_752_694, 3_576_392),
    "b1": (13_715_798, 13_664_424),
    "b2": (27_461_974, 24_709_288),
    "b3": (47_337_814, 44_585_128),
    "b4": (64_108_374, 61_355_688),
    "b5": (84_708_694, 81_956_008),
}


@pytest.mark.parametrize("variant", sorted(PARAM_COUNTS))
def test_parameter_counts(variant):
    from segformer_jax.pretrained import variable_shapes

    seg, cls = PARAM_COUNTS[variant]
    for model_cls, num_labels, want in [
        (sj.SegformerForSemanticSegmentation, 150, seg),
        (sj.SegformerForImageClassification, 1000, cls),
    ]:
        shapes = variable_shapes(model_cls(sj.SegformerConfig.preset(variant, num_labels=num_labels)))
        assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"])) == want


def test_image_classification_head():
    ref = build_reference(transformers.SegformerForImageClassification, num_labels=10, **TINY)
    model, variables = to_flax(ref, sj.SegformerForImageClassification)
    x = images(2, 48, 80, seed=9)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
    assert max_abs_diff(jax.jit(model.apply)(variables, x), want) < ATOL


# ----------------------------------------------------------------------------- train mode
def _train_reference():
    """Dropout and drop-path off, so train mode is deterministic: only BatchNorm differs from eval."""
    return build_reference(
        num_labels=5,
        seed=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
        **TINY,
    ).train()


def test_train_mode_outputs_and_batch_norm_statistics():
    ref = _train_reference()
    model, variables = to_flax(ref)
    x = images(2, 45, 70, seed=11)
    with torch.no_grad():
        want = to_nhwc(ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits)
    got, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert max_abs_diff(got, want) < ATOL
    bn = ref.decode_head.batch_norm
    stats = updates["batch_stats"]["decode_head"]["batch_norm"]
    assert max_abs_diff(stats["mean"], bn.running_mean.numpy()) < 1e-6
    assert max_abs_diff(stats["var"], bn.running_var.numpy()) < 1e-6  # unbiased update, as torch
    assert int(stats["num_batches_tracked"]) == int(bn.num_batches_tracked) == 18


def _upsampled_ce(logits, labels, ignore_index=255):
    """HF loss: logits bilinearly upsampled to the label size, CE over pixels != ignore_index."""
    b, h, w = labels.shape
    up = jax.image.resize(logits, (b, h, w, logits.shape[-1]), "bilinear")
    valid = labels != ignore_index
    logp = jax.nn.log_softmax(up, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


def test_loss_and_gradients_of_every_parameter():
    ref = _train_reference()
    model, variables = to_flax(ref)
    x = images(2, 45, 70, seed=12)
    labels = np.random.default_rng(0).integers(0, 5, (2, 45, 70))
    labels[:, :6] = 255
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), labels=torch.from_numpy(labels))
    out.loss.backward()

    def loss_fn(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return _upsampled_ce(logits, labels)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    from weights_convert.convert import flax_to_torch_state
    from weights_convert.mapping import normalize_hf

    flax_grads = flax_to_torch_state({"params": grads})
    torch_grads = normalize_hf({k: p.grad.numpy() for k, p in ref.named_parameters()})  # v5 -> hub names
    assert set(flax_grads) == set(torch_grads)
    scale = max(np.abs(g).max() for g in torch_grads.values())
    # Some gradients are zero in exact arithmetic (attention key biases: softmax ignores a per-query
    # shift; biases before the train-mode BatchNorm: removed by the batch mean). Both frameworks
    # return rounding noise there, so those are held to the absolute bound only.
    significant = [k for k, g in torch_grads.items() if np.abs(g).max() > 1e-4 * scale]
    assert len(significant) > 0.6 * len(torch_grads)
    worst_relative = max(
        (max_abs_diff(flax_grads[k], torch_grads[k]) / np.abs(torch_grads[k]).max(), k) for k in significant
    )
    worst_absolute = max(max_abs_diff(flax_grads[k], torch_grads[k]) for k in torch_grads)
    print(
        f"gradients: worst relative {worst_relative[0]:.1e} ({worst_relative[1]}), "
        f"worst absolute {worst_absolute:.1e} of max |grad| {scale:.1f}"
    )
    assert worst_relative[0] < 1e-4, worst_relative
    assert worst_absolute < 1e-5 * scale


def test_dropout_and_drop_path_are_active_in_train_mode(tiny_flax):
    model, variables = tiny_flax
    model = sj.SegformerForSemanticSegmentation(model.config.replace(drop_path_rate=0.5, hidden_dropout_prob=0.2))
    x = images(2, 32, 32, seed=13)
    run = jax.jit(
        lambda seed: model.apply(
            variables, x, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"]
        )[0]
    )
    a, b, a2 = run(0), run(1), run(0)
    assert max_abs_diff(a, a2) == 0.0 and max_abs_diff(a, b) > 1e-2
