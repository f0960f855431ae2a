"""Numeric equivalence with transformers' PyTorch SegFormer: every block, every preset, odd sizes,
train mode (BatchNorm statistics), gradients.

Reference: tests/reference.py (weights under which every branch moves the logits at O(1), its
preconditions asserted when it is built). Tolerance: our float32 error against a float64 run of the
same torch model must be <= max(floor, 1.5 x torch float32's own error), floor 1e-5 for blocks and
1e-4 for logits of order 10 (tests/test_mutations.py shows that each classic porting bug fails it)."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import (
    LOGITS_FLOOR,
    TINY,
    build_reference,
    check_train,
    expect,
    expect_logits,
    float64_twin,
    images,
    max_abs_diff,
    to_flax,
    to_nhwc,
    tolerance,
    train_reference,
)

import segformer_jax as sj
from segformer_jax.models import layers
from segformer_jax.models.decode_head import DecodeHead
from segformer_jax.models.encoder import MixVisionTransformer

IMPLS = [("native", "concat"), ("shifted", "fused"), ("shifted", "phased")]


def _encoder_params(variables):
    return {"params": variables["params"]["segformer"]["encoder"]}


def _stage_input(ref, x_nchw, stage):
    """The HF input of `stage` (NCHW) and of its first block (tokens, height, width)."""
    hidden = x_nchw if isinstance(x_nchw, torch.Tensor) else torch.from_numpy(x_nchw)
    with torch.no_grad():
        for s in ref.segformer.stages[:stage]:
            hidden = s(hidden)
        tokens, h, w = ref.segformer.stages[stage].patch_embeddings(hidden)
    return hidden, tokens, h, w


def _expect_from_stage_input(ref, x_nchw, stage, fn):
    """fn(hf_model, hidden, tokens, h, w) -> tensor, on the float32 reference and its float64 twin
    (each computing its own stage input from the images)."""
    return expect(lambda m, x: fn(m, *_stage_input(m, x, stage)), ref, x_nchw)


def test_reference_is_not_degenerate(tiny_reference):
    """The numbers asserted by reference.check_preconditions, for the record."""
    found = tiny_reference.preconditions
    print(found)
    assert found["attention_spread_min"] >= 0.15 and found["gelu_tanh_gap"] >= 2e-4
    assert found["block_ln_eps_ratio"] >= 0.03 and found["input_dependence"] >= 1.0
    assert 9.9 < found["logit_peak"] < 10.1


# ----------------------------------------------------------------------------- blocks
def test_overlap_patch_embed(tiny_reference, tiny_flax):
    _, variables = tiny_flax
    x = images(2, 37, 50, seed=1, layout="NCHW")
    for stage, (k, s) in enumerate([(7, 4), (3, 2)]):
        hidden, tokens, h, w = _stage_input(tiny_reference, x, stage)
        want = _expect_from_stage_input(tiny_reference, x, stage, lambda m, hidden, tokens, h, w: tokens)
        module = layers.OverlapPatchEmbed(TINY["hidden_sizes"][stage], k, s)
        params = variables["params"]["segformer"]["encoder"][f"patch_embeddings_{stage}"]
        out = module.apply({"params": params}, to_nhwc(hidden))
        assert out.shape == (2, h, w, TINY["hidden_sizes"][stage])
        want.assert_matches(out.reshape(2, h * w, -1), f"patch embedding {stage}")


@pytest.mark.parametrize("stage", [0, 1, 3], ids=["sr8", "sr4", "sr1"])
def test_efficient_self_attention(tiny_reference, tiny_flax, stage):
    _, variables = tiny_flax
    x = images(2, 45, 61, seed=2, layout="NCHW")
    _, tokens, h, w = _stage_input(tiny_reference, x, stage)
    want = _expect_from_stage_input(
        tiny_reference, x, stage, lambda m, _, t, h, w: m.segformer.stages[stage].blocks[0].attention(t, h, w)[0]
    )
    c = TINY["hidden_sizes"][stage]
    module = layers.Attention(c, TINY["num_attention_heads"][stage], [8, 4, 2, 1][stage])
    params = variables["params"]["segformer"]["encoder"][f"block_{stage}_0"]["attention"]
    got = module.apply({"params": params}, tokens.numpy().reshape(2, h, w, c))
    want.assert_matches(got.reshape(2, h * w, c), "attention")


@pytest.mark.parametrize("impl", ["native", "shifted"])
def test_mix_ffn(tiny_reference, tiny_flax, impl):
    _, variables = tiny_flax
    x = images(2, 45, 61, seed=3, layout="NCHW")
    _, tokens, h, w = _stage_input(tiny_reference, x, 1)
    want = _expect_from_stage_input(
        tiny_reference, x, 1, lambda m, _, t, h, w: m.segformer.stages[1].blocks[1].mlp(t, h, w)
    )
    assert np.abs(want.f64).max() > 1.0  # the Mix-FFN output is O(1), not ~1e-3
    module = layers.MixFFN(16, 4, depthwise_conv_impl=impl)
    params = variables["params"]["segformer"]["encoder"]["block_1_1"]["mlp"]
    got = module.apply({"params": params}, tokens.numpy().reshape(2, h, w, 16))
    want.assert_matches(got.reshape(2, h * w, 16), "Mix-FFN")


def test_block(tiny_reference, tiny_flax):
    _, variables = tiny_flax
    x = images(2, 45, 61, seed=4, layout="NCHW")
    _, tokens, h, w = _stage_input(tiny_reference, x, 1)
    want = _expect_from_stage_input(
        tiny_reference, x, 1, lambda m, _, t, h, w: m.segformer.stages[1].blocks[0](t, h, w)
    )
    module = layers.Block(16, 2, 4)
    got = module.apply(
        {"params": variables["params"]["segformer"]["encoder"]["block_1_0"]}, tokens.numpy().reshape(2, h, w, 16)
    )
    want.assert_matches(got.reshape(2, h * w, 16), "block")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage(tiny_reference, tiny_flax, stage):
    model, variables = tiny_flax
    x = images(2, 45, 61, seed=5, layout="NCHW")
    hidden, *_ = _stage_input(tiny_reference, x, stage)
    want = _expect_from_stage_input(tiny_reference, x, stage, lambda m, hidden, *_: m.segformer.stages[stage](hidden))
    encoder = MixVisionTransformer(model.config)
    got = encoder.apply(_encoder_params(variables), to_nhwc(hidden), stage, method=MixVisionTransformer.stage)
    want.assert_matches(np.asarray(got).transpose(0, 3, 1, 2), f"stage {stage}")


def test_encoder_hidden_states(tiny_reference, tiny_flax):
    model, variables = tiny_flax
    x = images(2, 45, 61, seed=6)
    nchw = x.transpose(0, 3, 1, 2).copy()
    _, features = model.apply(variables, x, output_hidden_states=True)
    assert len(features) == 4
    for i, got in enumerate(features):
        want = expect(lambda m, x, i=i: m(x, output_hidden_states=True).hidden_states[i], tiny_reference, nchw)
        want.assert_matches(np.asarray(got).transpose(0, 3, 1, 2), f"hidden state {i}")


@pytest.mark.parametrize("impl", ["concat", "fused", "phased"])
def test_decode_head(tiny_reference, tiny_flax, impl):
    model, variables = tiny_flax
    x = images(2, 45, 61, seed=7, layout="NCHW")
    with torch.no_grad():
        hidden = tiny_reference(torch.from_numpy(x), output_hidden_states=True).hidden_states
    want = expect(
        lambda m, x: m.decode_head(m(x, output_hidden_states=True).hidden_states),
        tiny_reference,
        x,
        floor=LOGITS_FLOOR,
        layout="NCHW->NHWC",
    )
    head = DecodeHead(model.config.replace(decode_head_impl=impl))
    got = head.apply(
        {"params": variables["params"]["decode_head"], "batch_stats": variables["batch_stats"]["decode_head"]},
        [to_nhwc(h) for h in hidden],
    )
    assert np.abs(want.f64).max() > 3  # logits of order 10, so 1e-4 is a relative 1e-5
    want.assert_matches(got, f"decode head ({impl})")


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
    got = jax.jit(model.apply)(variables, x)
    assert got.shape == (b, -(-h // 4), -(-w // 4), 7)
    want = expect_logits(tiny_reference, x)
    print(f"{size}: ours {want.error(got):.2e}, torch float32 {want.torch_error:.2e}, tolerance {want.tolerance:.1e}")
    want.assert_matches(got, f"logits {size}")


# Linear weights ~ N(0, (1.7 / sqrt(fan_in))^2) in the wide presets (0.3 at fan-in 32, as the tiny
# reference): a flat 0.3 makes b1-b5 chaotic (torch float32's own error 2e-3 to 0.2 on the logits).
PRESET_LINEAR_GAIN = 1.7


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_every_preset(variant):
    """The published architectures (random weights) at a small, non-square input."""
    cfg = sj.SegformerConfig.preset(variant, num_labels=19)
    hf_kwargs = dict(hidden_sizes=cfg.hidden_sizes, depths=cfg.depths, decoder_hidden_size=cfg.decoder_hidden_size)
    ref = build_reference(num_labels=19, seed=1, image_size=(64, 96), linear_gain=PRESET_LINEAR_GAIN, **hf_kwargs)
    model, variables = to_flax(ref)
    assert model.config == cfg.replace(drop_path_rate=ref.config.drop_path_rate, initializer_range=0.3)
    x = images(1, 64, 96, seed=3)
    want = expect_logits(ref, x)
    got = model.apply(variables, x)  # eager: one-shot, and op compilations are shared between presets
    print(
        f"{variant}: ours {want.error(got):.2e}, torch float32 {want.torch_error:.2e} on logits up to "
        f"{np.abs(want.f64).max():.1f}; {ref.preconditions}"
    )
    want.assert_matches(got, variant)


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
    want = expect_logits(ref, x)
    assert np.abs(want.f64).max() > 3
    want.assert_matches(jax.jit(model.apply)(variables, x), "classification logits")


# ----------------------------------------------------------------------------- train mode
def test_train_mode_outputs_and_batch_norm_statistics():
    ref = train_reference()
    model, variables = to_flax(ref)
    # Logits at an odd size; BatchNorm statistics over a small count (1 x 8 x 8 = 64 pixels), where the
    # unbiased running variance (n / (n - 1)) differs from the biased one by ~1.6e-3 relative.
    for x, checks in [(images(2, 45, 70, seed=11), ("logits",)), (images(1, 32, 32, seed=12), ("bn_mean", "bn_var"))]:
        results = check_train(ref, model, variables, x)
        for name in checks:
            err, tol = results[name]
            print(f"train {x.shape}: {name} {err:.2e} (tolerance {tol:.1e})")
            assert err <= tol, (name, err, tol)
    # Preconditions: O(1) BatchNorm inputs, so biased vs unbiased is visible at 1e-4 relative.
    m = copy.deepcopy(float64_twin(ref)).train()
    old = m.decode_head.batch_norm.running_var.clone()
    with torch.no_grad():
        m(torch.from_numpy(images(1, 32, 32, seed=12, layout="NCHW")).double())
    new = m.decode_head.batch_norm.running_var
    unbiased_batch_var = (new - 0.9 * old) / 0.1
    n = 8 * 8
    gap = (0.1 * unbiased_batch_var / n).max().item() / new.abs().max().item()  # unbiased - biased, relative
    assert 0.3 < unbiased_batch_var.mean().item() and gap > 10 * 1e-4, (unbiased_batch_var, gap)
    assert int(m.decode_head.batch_norm.num_batches_tracked) == 18
    _, stats = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, images(1, 32, 32, seed=12)
    )
    assert int(stats["batch_stats"]["decode_head"]["batch_norm"]["num_batches_tracked"]) == 18


def _upsampled_ce(logits, labels, ignore_index=255):
    """HF loss: logits bilinearly upsampled to the label size, CE over pixels != ignore_index."""
    b, h, w = labels.shape
    up = jax.image.resize(logits, (b, h, w, logits.shape[-1]), "bilinear")
    valid = labels != ignore_index
    logp = jax.nn.log_softmax(up, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


# Gradients that are zero in exact arithmetic, so only rounding noise is left to compare:
# * attention key biases: q . (k + b) adds q . b to every score of a query, a per-row shift softmax
#   ignores;
# * the decode head's per-stage projection biases: a constant per channel (bilinear weights sum to
#   one, the fuse conv is linear) that the train-mode BatchNorm's batch mean removes;
# * the last stage's final LayerNorm bias, for the same reason (it feeds only the decode head).
EXACT_ZERO_GRADIENTS = (
    r"\.attention\.self\.key\.bias$",
    r"^decode_head\.linear_c\.\d\.proj\.bias$",
    r"^segformer\.encoder\.layer_norm\.3\.bias$",
)


def _torch_grads(model, x, labels):
    model = copy.deepcopy(model).train()
    dtype = next(model.parameters()).dtype
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(dtype), labels=torch.from_numpy(labels))
    out.loss.backward()
    from weights_convert.mapping import normalize_hf

    return out.loss.item(), normalize_hf({k: p.grad.numpy() for k, p in model.named_parameters()})  # hub names


def test_loss_and_gradients_of_every_parameter():
    import re

    from weights_convert.convert import flax_to_torch_state

    ref = train_reference()
    model, variables = to_flax(ref)
    x = images(2, 45, 70, seed=12)
    labels = np.random.default_rng(0).integers(0, 5, (2, 45, 70))
    labels[:, :6] = 255
    loss32, grads32 = _torch_grads(ref, x, labels)
    loss64, grads64 = _torch_grads(float64_twin(ref), x, labels)

    def loss_fn(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return _upsampled_ce(logits, labels)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
    assert abs(float(loss) - loss64) <= max(1e-6, 1.5 * abs(loss32 - loss64)) * abs(loss64)
    ours = flax_to_torch_state({"params": grads})
    assert set(ours) == set(grads64) == set(grads32)
    scale = max(np.abs(g).max() for g in grads64.values())
    zeros = sorted(k for k in grads64 if any(re.search(p, k) for p in EXACT_ZERO_GRADIENTS))
    assert len(zeros) == sum(TINY["depths"]) + 4 + 1  # key bias per block, bias per stage projection, LN
    for k in zeros:  # rounding noise in both frameworks
        assert np.abs(grads64[k]).max() < 1e-9 * scale and np.abs(ours[k]).max() < 1e-5 * scale, k
    rows = []
    for k in sorted(set(grads64) - set(zeros)):
        size = np.abs(grads64[k]).max()
        ours_rel = max_abs_diff(ours[k], grads64[k]) / size
        torch_rel = max_abs_diff(grads32[k], grads64[k]) / size
        rows.append((ours_rel, tolerance(torch_rel, 1e-4), k, size / scale))
    worst = max(rows, key=lambda r: r[0] / r[1])
    print(
        f"gradients: {len(rows)} tensors compared (relative), {len(zeros)} exact zeros; worst {worst[0]:.1e} "
        f"vs tolerance {worst[1]:.1e} ({worst[2]}); smallest tensor max |grad| {min(r[3] for r in rows):.1e} of "
        f"the largest"
    )
    failing = [r for r in rows if r[0] > r[1]]
    assert not failing, failing


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


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_draws_the_rate_and_keeps_the_expectation(rate):
    """layers.Dropout (16 random bits an element): the dropped fraction is the rate to within sampling
    error, kept values are scaled so the mean is the input's, the same key gives the same mask, and
    odd sizes (a half-used last word) work."""
    from segformer_jax.models.layers import Dropout

    x = jnp.ones((3, 101, 67, 5))
    drop = Dropout(rate)
    y = np.asarray(drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    n = y.size
    dropped = np.mean(y == 0)
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(y.mean() - 1.0) < 5 * np.sqrt(rate / (1 - rate) / n)
    kept = np.unique(y[y != 0])
    np.testing.assert_allclose(kept, 65536 / (65536 - round(rate * 65536)), rtol=1e-6)
    again = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    other = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert np.array_equal(y, again) and not np.array_equal(y, other)
    # neighbouring elements come from the two halves of one 32-bit word: not correlated
    a, b = (y.reshape(-1)[: n // 2 * 2].reshape(-1, 2) == 0).T
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    assert np.array_equal(drop.apply({}, x, deterministic=True), x)
