"""The hand-written kernels compute the same function (and gradients) as the plain JAX forms and
torch. Tiny shapes: the whole file runs in seconds."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from segformer_jax import SegformerConfig
from segformer_jax.models import kernels
from segformer_jax.models.decode_head import resolve_decode_head_impl, upsample_bilinear
from segformer_jax.models.layers import DepthwiseConv3x3, resolve_depthwise_impl

F = torch.nn.functional

DW_SHAPES = [(2, 7, 9, 5), (2, 1, 3, 4), (2, 4, 4, 8), (1, 13, 6, 3)]


def _rand(rng, shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _dw_args(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return _rand(rng, shape), _rand(rng, (3, 3, 1, c)), _rand(rng, (c,)), _rand(rng, shape)


def _torch_dw(x, k, b, cot):
    """Torch grouped conv on the same weights: output (NHWC) and grads w.r.t. x, kernel, bias."""
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    kt = torch.tensor(np.asarray(k).transpose(3, 2, 0, 1), requires_grad=True)  # HWIO -> O I H W
    bt = torch.tensor(np.asarray(b), requires_grad=True)
    y = F.conv2d(xt, kt, bt, padding=1, groups=x.shape[-1])
    (y * torch.tensor(np.asarray(cot).transpose(0, 3, 1, 2))).sum().backward()
    return (
        y.detach().numpy().transpose(0, 2, 3, 1),
        xt.grad.numpy().transpose(0, 2, 3, 1),
        kt.grad.numpy().transpose(2, 3, 1, 0),
        bt.grad.numpy(),
    )


def _vjp(fn, x, k, b, cot):
    y, vjp = jax.vjp(fn, x, k, b)
    return (y, *vjp(cot))


@pytest.mark.parametrize("shape", DW_SHAPES)
def test_depthwise_matches_grouped_conv_and_torch(shape):
    x, k, b, cot = _dw_args(shape)
    ref = _vjp(kernels.depthwise_conv3x3_native, x, k, b, cot)
    ours = _vjp(kernels.depthwise_conv3x3, x, k, b, cot)
    autodiff = _vjp(kernels._dw3x3_forward, x, k, b, cot)  # the same 9 taps, differentiated by JAX
    tor = _torch_dw(x, k, b, cot)
    for name, r, o, a, t in zip(("y", "dx", "dkernel", "dbias"), ref, ours, autodiff, tor):
        assert o.shape == r.shape, name
        np.testing.assert_allclose(o, r, atol=2e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(o, a, atol=2e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(o, t, atol=2e-5, rtol=1e-5, err_msg=name)


def test_depthwise_check_grads():
    x, k, b, _ = _dw_args((2, 5, 3, 3), seed=1)
    # Finite differences in float32 need loose tolerances; the exact comparison with torch's
    # gradients is test_depthwise_matches_grouped_conv_and_torch.
    check_grads(kernels.depthwise_conv3x3, (x, k, b), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    # Second order through the hand-written VJP (it is itself differentiable).
    check_grads(
        lambda x, k, b: jax.grad(lambda *a: jnp.sum(kernels.depthwise_conv3x3(*a) ** 2))(x, k, b),
        (x, k, b),
        order=1,
        modes=["rev"],
        atol=1e-2,
        rtol=1e-2,
    )


def test_depthwise_under_jit_vmap():
    x, k, b, _ = _dw_args((2, 6, 5, 4), seed=2)
    y = jax.jit(kernels.depthwise_conv3x3)(x, k, b)
    yv = jax.vmap(lambda xi: kernels.depthwise_conv3x3(xi[None], k, b)[0])(x)
    np.testing.assert_allclose(y, kernels.depthwise_conv3x3_native(x, k, b), atol=1e-5)
    np.testing.assert_allclose(yv, y, atol=1e-6)


@pytest.mark.parametrize("impl", ["native", "shifted", "auto"])
def test_depthwise_module_impls_same_params(impl):
    x, _, _, cot = _dw_args((2, 7, 5, 6), seed=3)
    ref_mod = DepthwiseConv3x3(6, impl="native")
    variables = ref_mod.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-zero bias
    mod = DepthwiseConv3x3(6, impl=impl)
    assert jax.tree.map(jnp.shape, mod.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
    f = lambda m: jax.value_and_grad(lambda v: jnp.sum(m.apply(v, x) * cot))(variables)
    (l0, g0), (l1, g1) = f(ref_mod), f(mod)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=2e-5, rtol=1e-5), g1, g0)


def test_auto_impls_on_this_backend():
    expected = "shifted" if jax.default_backend() == "cpu" else "native"
    assert resolve_depthwise_impl("auto") == expected
    assert resolve_decode_head_impl("auto") == ("phased" if jax.default_backend() == "cpu" else "fused")
    assert resolve_decode_head_impl("auto", train=True) == "fused"
    assert resolve_decode_head_impl("phased", train=True) == "phased"
    assert resolve_depthwise_impl("native") == "native"


RESIZES = [
    ((4, 5), (16, 20)),
    ((3, 5), (7, 11)),
    ((5, 3), (5, 12)),
    ((2, 2), (16, 2)),
    ((1, 3), (4, 9)),
    ((6, 4), (13, 17)),
]


@pytest.mark.parametrize("src,dst", RESIZES)
def test_resize_bilinear_matches_jax_and_torch(src, dst):
    rng = np.random.default_rng(4)
    x = _rand(rng, (2, *src, 3))
    cot = _rand(rng, (2, *dst, 3))
    y, vjp = jax.vjp(lambda v: kernels.resize_bilinear(v, dst), x)
    y_ref, vjp_ref = jax.vjp(lambda v: jax.image.resize(v, (2, *dst, 3), "bilinear"), x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(vjp(cot)[0], vjp_ref(cot)[0], atol=1e-5)
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))
    yt = F.interpolate(xt, size=dst, mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, yt, atol=1e-5)
    np.testing.assert_allclose(upsample_bilinear(x, dst), y, atol=0)


def test_column_phases_round_trip_and_order():
    x = jnp.arange(2 * 3 * 12 * 2, dtype=jnp.float32).reshape(2, 3, 12, 2)
    phased = kernels.to_column_phases(x, 4)
    # column 4k + r is stored at r * 3 + k
    np.testing.assert_array_equal(phased[:, :, 1 * 3 + 2], x[:, :, 4 * 2 + 1])
    np.testing.assert_array_equal(kernels.from_column_phases(phased, 4), x)


@pytest.mark.parametrize(
    "w,size,period", [(4, (8, 16), 4), (3, (5, 12), 4), (2, (2, 12), 12), (6, (6, 12), 4), (5, (5, 5), 1)]
)
def test_upsample_to_column_phases_is_resize_in_phase_order(w, size, period):
    rng = np.random.default_rng(5)
    x = _rand(rng, (2, 4 if size[0] >= 4 else size[0], w, 3))
    cot = _rand(rng, (2, *size, 3))
    y, vjp = jax.vjp(lambda v: kernels.upsample_to_column_phases(v, size, period), x)
    want, vjp_want = jax.vjp(lambda v: kernels.to_column_phases(kernels.resize_bilinear(v, size), period), x)
    np.testing.assert_allclose(y, want, atol=1e-6)
    np.testing.assert_allclose(vjp(cot)[0], vjp_want(cot)[0], atol=1e-5)


def test_column_phase_period():
    assert kernels.column_phase_period([16, 8, 4, 2], 16) == 8
    assert kernels.column_phase_period([12, 6, 3, 2], 12) == 12
    assert kernels.column_phase_period([17, 9, 5, 3], 17) is None
    with pytest.raises(ValueError, match="period 4 needs to be a multiple of the factor 2"):
        kernels.upsample_columns_phased(jnp.zeros((1, 2, 3, 1)), 2, 4)


def _torch_ce(logits, labels, ignore_index=255):
    lt = torch.tensor(np.asarray(logits).transpose(0, 3, 1, 2), requires_grad=True)
    up = F.interpolate(lt, size=labels.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, torch.tensor(np.asarray(labels)).long(), ignore_index=ignore_index)
    loss.backward()
    return loss.item(), lt.grad.numpy().transpose(0, 2, 3, 1)


LOSSES = {
    "reference": kernels.cross_entropy_reference,
    "fused": kernels.upsampled_cross_entropy,
    "banded1": functools.partial(kernels.upsampled_cross_entropy_banded, band_rows=1),
    "banded_big": functools.partial(kernels.upsampled_cross_entropy_banded, band_rows=64),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
# banded: column-phase order for the first two (widths 6 -> 24, 4 -> 16), natural order with a
# non-integer width factor for (4, 5) -> (8, 12), the unbanded fallback for 5 -> 17 rows.
@pytest.mark.parametrize("low,high", [((5, 6), (20, 24)), ((4, 4), (8, 16)), ((4, 5), (8, 12)), ((5, 7), (17, 23))])
def test_upsampled_cross_entropy_matches_torch(name, low, high):
    rng = np.random.default_rng(5)
    logits = _rand(rng, (2, *low, 7))
    labels = rng.integers(0, 7, size=(2, *high)).astype(np.int32)
    labels[0, :3] = 255
    labels[1, :, -2:] = 255
    loss_t, grad_t = _torch_ce(logits, labels)
    loss, grad = jax.jit(jax.value_and_grad(LOSSES[name]))(logits, jnp.asarray(labels))
    np.testing.assert_allclose(loss, loss_t, rtol=1e-5)
    np.testing.assert_allclose(grad, grad_t, atol=1e-6, rtol=1e-4)
    if low == (5, 6):  # uint8 labels give the same
        loss8 = jax.jit(LOSSES[name])(logits, jnp.asarray(labels.astype(np.uint8)))
        np.testing.assert_allclose(loss8, loss, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cross_entropy_all_ignored_is_zero(name):
    logits = jnp.ones((1, 2, 2, 3))
    labels = jnp.full((1, 8, 8), 255, jnp.int32)
    loss, grad = jax.value_and_grad(LOSSES[name])(logits, labels)
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def test_cross_entropy_check_grads():
    rng = np.random.default_rng(6)
    logits = _rand(rng, (1, 3, 4, 5))
    labels = jnp.asarray(rng.integers(0, 5, size=(1, 12, 16)))
    for name in ("fused", "banded1"):  # finite differences in float32: loose; exact vs torch is tested above
        loss = LOSSES[name]
        check_grads(
            lambda x, loss=loss: loss(x, labels), (logits,), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2
        )


TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 2, 4, 8),
    decoder_hidden_size=16,
    num_labels=5,
    classifier_dropout_prob=0.0,
    drop_path_rate=0.0,
)


@pytest.mark.parametrize(
    "impl,size",
    [("fused", (16, 16)), ("fused", (17, 12)), ("phased", (16, 16)), ("phased", (17, 12)), ("phased", (12, 17))],
)
def test_fused_head_equals_concat(impl, size):
    """The decode head alone on random stage features (the encoder is not needed and compiles slowly).
    phased: (16, 16) runs in column-phase period 8, (17, 12) in period 12, (12, 17) falls back."""
    from segformer_jax.models.decode_head import DecodeHead
    from segformer_jax.models.encoder import stage_sizes

    cfg = SegformerConfig(**TINY)
    # stage feature sizes of a (4 * size) image
    shapes = stage_sizes(cfg, 4 * size[0], 4 * size[1])
    keys = jax.random.split(jax.random.key(1), 4)
    feats = tuple(jax.random.normal(k, (2, h, w, c)) for k, (h, w), c in zip(keys, shapes, cfg.hidden_sizes))
    concat = DecodeHead(cfg.replace(decode_head_impl="concat"))
    fused = DecodeHead(cfg.replace(decode_head_impl=impl))
    variables = concat.init(jax.random.key(0), feats)
    assert jax.tree.map(jnp.shape, fused.init(jax.random.key(0), feats)) == jax.tree.map(jnp.shape, variables)
    # random BN statistics so the head's affine parts matter
    stats = jax.tree.map(lambda v: v + 0.3 if v.dtype == jnp.float32 else v, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    labels = jax.random.randint(jax.random.key(2), (2, 4 * size[0], 4 * size[1]), 0, 5)

    @functools.partial(jax.jit, static_argnums=0)
    def run(head, variables):
        def loss(params):
            logits, mut = head.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, feats, train=True, mutable=["batch_stats"]
            )
            return kernels.upsampled_cross_entropy(logits, labels), mut

        return head.apply(variables, feats), jax.value_and_grad(loss, has_aux=True)(variables["params"])

    y0, ((l0, m0), g0) = run(concat, variables)
    y1, ((l1, m1), g1) = run(fused, variables)
    np.testing.assert_allclose(y1, y0, atol=1e-5, rtol=1e-5)
    # train mode: same loss, gradients and batch-stat updates
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4), g1, g0)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5), m1, m0)


# ----------------------------------------------------------------------------- layer norm, attention


@pytest.mark.parametrize("shape", [(2, 5, 7, 16), (3, 33)])
def test_layer_norm_matches_torch_values_and_grads(shape):
    rng = np.random.default_rng(7)
    x = _rand(rng, shape) * 3 + 1
    scale, bias, cot = _rand(rng, shape[-1:]) + 1, _rand(rng, shape[-1:]), _rand(rng, shape)
    y, vjp = jax.vjp(lambda *a: kernels.layer_norm(*a, 1e-5), x, scale, bias)
    y_ref, vjp_ref = jax.vjp(lambda *a: kernels.layer_norm_reference(*a, 1e-5), x, scale, bias)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for got, want in zip(vjp(cot), vjp_ref(cot)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    xt, st, bt = (torch.tensor(np.asarray(a), requires_grad=True) for a in (x, scale, bias))
    yt = F.layer_norm(xt, shape[-1:], st, bt, 1e-5)
    yt.backward(torch.tensor(np.asarray(cot)))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-5)
    for got, want in zip(vjp(cot), (xt.grad, st.grad, bt.grad)):
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5)


def test_layer_norm_module_same_params_as_flax():
    from segformer_jax.models.layers import LayerNorm

    x = jnp.ones((2, 3, 8))
    ours = LayerNorm().init(jax.random.key(0), x)
    flax_ln = nn.LayerNorm().init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax_ln)


@pytest.mark.parametrize("n,m,heads,d", [(24, 6, 2, 8), (16, 16, 1, 4)])
def test_attention_matches_torch_values_and_grads(n, m, heads, d):
    rng = np.random.default_rng(8)
    q, k, v = _rand(rng, (2, n, heads, d)), _rand(rng, (2, m, heads, d)), _rand(rng, (2, m, heads, d))
    cot = _rand(rng, (2, n, heads, d))
    y, vjp = jax.vjp(kernels.attention, q, k, v)
    y_ref, vjp_ref = jax.vjp(kernels.attention_reference, q, k, v)
    np.testing.assert_allclose(y, y_ref, atol=1e-6)
    for got, want in zip(vjp(cot), vjp_ref(cot)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    qt, kt, vt = (torch.tensor(np.asarray(a).transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
    yt = F.scaled_dot_product_attention(qt, kt, vt)
    yt.backward(torch.tensor(np.asarray(cot).transpose(0, 2, 1, 3)))
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 1, 3), atol=1e-5)
    for got, want in zip(vjp(cot), (qt.grad, kt.grad, vt.grad)):
        np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 1, 3), atol=1e-5, rtol=1e-5)


def test_attention_per_image_loop_same_values(monkeypatch):
    rng = np.random.default_rng(10)
    q, k, v = (
        _rand(rng, (3, 21, 2, 8)),
        _rand(rng, (3, 5, 2, 8)),
        _rand(rng, (3, 5, 2, 8)),
    )  # shapes no other test traces
    monkeypatch.setattr(kernels, "_PER_IMAGE_ATTENTION_SIZE", 2 * 21 * 5)
    looped = jax.jit(kernels.attention)
    assert "while" in looped.lower(q, k, v).as_text()
    batched = jax.jit(kernels.attention_reference)(q, k, v)
    assert "while" not in jax.jit(kernels.attention_reference).lower(q, k, v).as_text()
    np.testing.assert_allclose(looped(q, k, v), batched, atol=1e-6, rtol=1e-6)


def test_attention_dropout_path_is_unbiased_and_random():
    from segformer_jax.models.layers import EfficientSelfAttention

    x = _rand(np.random.default_rng(11), (1, 4, 4, 8))
    layer = EfficientSelfAttention(8, num_heads=2, sr_ratio=2, attention_dropout=0.5)
    variables = layer.init(jax.random.key(0), x)
    expected = layer.apply(variables, x)
    sample = jax.jit(jax.vmap(lambda key: layer.apply(variables, x, train=True, rngs={"dropout": key})))
    outs = sample(jax.random.split(jax.random.key(1), 4000))
    assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3  # dropout is drawn
    np.testing.assert_allclose(outs.mean(0), expected, atol=0.02)  # E[dropout(p)] = p


def test_erf_f32_is_erf_within_float32_rounding_and_lowers_to_plain_ops():
    import math

    from segformer_jax.models.kernels import erf_f32

    z = np.concatenate([np.linspace(-6, 6, 200_001, dtype=np.float32), np.float32([0.0, 3.9, -3.9, 1e30, -1e30])])
    ours = np.asarray(jax.jit(erf_f32)(jnp.asarray(z)), np.float64)
    exact = np.array([math.erf(float(v)) for v in z])
    assert np.abs(ours - exact).max() < 4e-7
    assert np.isnan(np.asarray(erf_f32(jnp.float32(np.nan))))
    grad = jax.jit(jax.vmap(jax.grad(erf_f32)))(jnp.asarray(z[::1000]))
    np.testing.assert_allclose(grad, 2 / np.sqrt(np.pi) * np.exp(-(np.float64(z[::1000]) ** 2)), rtol=2e-6, atol=1e-30)
    # no composite op: TF's StableHLO deserialiser (SavedModel / TFLite export) rejects lax.erf's
    assert "composite" not in jax.jit(erf_f32).lower(jnp.asarray(z)).as_text()


def test_gelu_of_half_is_the_exact_gelu_within_float32_rounding():
    from segformer_jax.models.layers import gelu_of_half

    x = _rand(np.random.default_rng(9), (4096,)) * 4
    x = jnp.concatenate([x, jnp.asarray([0.0, -0.0, 1e-30, -1e-30, 5.0, -5.0, 30.0, -30.0], jnp.float32)])
    ours = np.asarray(jax.jit(lambda x: gelu_of_half(x * 0.5))(x))
    exact = F.gelu(torch.tensor(np.asarray(x), dtype=torch.float64)).numpy()
    torch32 = F.gelu(torch.tensor(np.asarray(x))).numpy()
    # about as close to the float64 GELU as torch's float32 GELU is (within 1.5x its error)
    assert np.abs(ours - exact).max() <= max(2e-6, 1.5 * np.abs(torch32 - exact).max())
    np.testing.assert_allclose(ours, torch32, atol=3e-6, rtol=1e-6)
    np.testing.assert_allclose(ours, jax.jit(lambda x: nn.gelu(x, approximate=False))(x), atol=3e-6, rtol=1e-6)
    np.testing.assert_allclose(ours[-8:-4], [0.0, 0.0, 5e-31, -5e-31], rtol=1e-6, atol=0)  # no underflow
    np.testing.assert_array_equal(ours[-2:], [30.0, 0.0])  # saturates, no NaN from the tails
    half_bf16 = (x * 0.5).astype(jnp.bfloat16)  # same code in bfloat16 (the config's dtype option)
    np.testing.assert_allclose(np.asarray(gelu_of_half(half_bf16), np.float32), exact, atol=0.05, rtol=0.02)


def test_depthwise_output_scale_halves_exactly():
    x, _, _, _ = _dw_args((2, 6, 5, 8))
    for impl in ("shifted", "native"):
        conv = DepthwiseConv3x3(8, impl)
        variables = conv.init(jax.random.key(0), x)
        variables = jax.tree.map(lambda a: a + 0.1, variables)  # nonzero bias too
        full = conv.apply(variables, x)
        np.testing.assert_array_equal(conv.apply(variables, x, output_scale=0.5), full * 0.5)


# ----------------------------------------------------------------------------- scanned / rematerialised blocks


def _deep_tiny_model(drop_path_rate=0.0, **changes):
    from segformer_jax import SegformerForSemanticSegmentation

    cfg = SegformerConfig(**{**TINY, "depths": (2, 3, 1, 2)})
    return SegformerForSemanticSegmentation(
        cfg.replace(drop_path_rate=drop_path_rate, classifier_dropout_prob=0.0, **changes)
    )


@pytest.fixture(scope="module")
def deep_tiny():
    """Variables, inputs, and the plain module path's eval logits, train loss and gradients, and
    train-mode logits with stochastic depth (key 3)."""
    from segformer_jax.pretrained import init_variables

    plain = _deep_tiny_model()
    variables = init_variables(plain, 0, (32, 48))
    x = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
    labels = jax.random.randint(jax.random.key(2), (2, 32, 48), 0, 5)

    @functools.partial(jax.jit, static_argnums=0)
    def run(model):
        def loss(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
            )
            return kernels.upsampled_cross_entropy(logits, labels)

        return model.apply(variables, x), jax.value_and_grad(loss)(variables["params"])

    @functools.partial(jax.jit, static_argnums=0)
    def dropping(model):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(3)})[0]

    return dict(
        variables=variables,
        run=run,
        dropping=dropping,
        plain=run(plain),
        plain_dropping=dropping(_deep_tiny_model(drop_path_rate=0.5)),
    )


# (scan alone is the scan + remat path without jax.checkpoint: left out to keep the suite short)
@pytest.mark.parametrize(
    "changes",
    [dict(remat_blocks=True), pytest.param(dict(scan_blocks=True, remat_blocks=True), marks=pytest.mark.slow)],
)
def test_scanned_and_rematerialised_blocks_are_the_same_function(changes, deep_tiny):
    """Same parameters, same logits, loss and gradients as the plain module path, and with stochastic
    depth on the same masks for the same key: the encoder draws every block's at once, so both paths
    drop the same branches (classifier dropout off here)."""
    from segformer_jax.pretrained import init_variables

    variant = _deep_tiny_model(**changes)
    variables = deep_tiny["variables"]
    assert jax.tree.map(jnp.shape, init_variables(variant, 0, (32, 48))) == jax.tree.map(jnp.shape, variables)
    y0, (l0, g0) = deep_tiny["plain"]
    y1, (l1, g1) = deep_tiny["run"](variant)
    np.testing.assert_allclose(y1, y0, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-5), g1, g0)

    out = deep_tiny["dropping"](_deep_tiny_model(drop_path_rate=0.5, **changes))
    np.testing.assert_allclose(out, deep_tiny["plain_dropping"], atol=1e-5)
    assert np.abs(np.asarray(out) - np.asarray(y0)).max() > 1e-3  # and something was dropped


def test_drop_path_keeps_samples_whose_draw_is_below_the_keep_rate():
    from segformer_jax.models.layers import DropPath

    x = jnp.ones((4, 3, 2))
    draws = jnp.asarray([0.05, 0.69, 0.71, 0.95])
    out = DropPath(0.3).apply({}, x, train=True, draw=draws)
    np.testing.assert_allclose(out[:, 0, 0], [1 / 0.7, 1 / 0.7, 0.0, 0.0], rtol=1e-7)
    assert DropPath(0.3).apply({}, x, train=False, draw=draws) is x
    # without draws it draws its own: about 30% of 4000 samples dropped
    own = DropPath(0.3).apply({}, jnp.ones((4000, 1)), train=True, rngs={"dropout": jax.random.key(0)})
    assert abs(float(jnp.mean(own == 0)) - 0.3) < 0.03
