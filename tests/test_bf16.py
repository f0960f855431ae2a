"""Reduced precision: bfloat16 matmuls and convs with float32 accumulation, statistics and elementwise
work in float32 on CPU; float32 stays the default and exact."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import torch

import segformer_jax as sj
from segformer_jax.models import kernels

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # same function, faster XLA:CPU compiles


@pytest.fixture(autouse=True)
def every_matmul_reduced(monkeypatch):
    """The tiny test model's matmuls are all narrower than the CPU threshold below which bfloat16 does
    not pay (kernels.reduced_pays), so they would stay float32: lower it, so bfloat16 is tested."""
    monkeypatch.setattr(kernels, "MIN_REDUCED_CPU_DIM", 1)


@pytest.fixture(scope="module")
def pair(tiny_reference):
    model32, variables = reference.to_flax(tiny_reference)
    model16 = sj.SegformerForSemanticSegmentation(model32.config, dtype=jnp.bfloat16)
    return tiny_reference, model32, model16, variables


def test_bf16_logits_track_float32_and_transformers(pair):
    ref, model32, model16, variables = pair
    x = reference.images(2, 64, 96, seed=3)
    with torch.no_grad():
        want = reference.to_nhwc(ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits)
    got32 = np.asarray(jax.jit(model32.apply)(variables, x))
    got16 = np.asarray(jax.jit(model16.apply)(variables, x))
    assert got16.dtype == np.float32
    assert reference.max_abs_diff(got32, want) < 1e-4  # the default is untouched
    scale = np.abs(want).max()
    diff16 = reference.max_abs_diff(got16, want)
    assert 1e-4 < diff16 < 0.05 * scale  # really bfloat16 (not float32 in disguise), and close
    assert np.mean(got16.argmax(-1) == want.argmax(-1)) > 0.95


def test_bf16_program_has_bf16_matmuls_with_f32_accumulation_and_f32_elementwise(pair):
    _, _, model16, variables = pair
    text = jax.jit(model16.apply).lower(variables, np.zeros((1, 64, 64, 3), np.float32)).as_text()
    dots = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*", text)
    assert dots
    reduced = [d for d in dots if re.search(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> tensor<[^>]*xf32>", d)]
    # Every matmul and conv on activations: bfloat16 operands, float32 result (the depthwise conv is
    # multiply-adds). The others are the fused decode head folding each stage's projection (kernel
    # and bias, parameters) into its slice of the fuse kernel: 2 per stage, on weights only.
    weights_only = [d for d in dots if d not in reduced]
    assert len(weights_only) == 2 * model16.config.num_encoder_blocks, weights_only[:3]
    assert all(re.match(r"stablehlo\.dot_general %arg\d+, ", d) for d in weights_only), weights_only[:3]
    if jax.default_backend() == "cpu":  # no bfloat16 transcendental or reduction work on CPU
        for op in ("exponential", "rsqrt", "reduce"):
            assert not re.search(rf"stablehlo\.{op}[^\n]*bf16", text), op


def test_bf16_training_step_keeps_float32_parameters_and_gradients(pair):
    from segformer_jax.training import losses

    _, model32, model16, variables = pair
    x = reference.images(2, 64, 64, seed=4)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, model16.config.num_labels, (2, 64, 64)))

    def loss_and_grads(model):
        def loss_fn(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )
            return losses.semantic_segmentation_loss(logits, labels)

        fn = jax.jit(jax.value_and_grad(loss_fn)).lower(variables["params"])
        return fn.compile(compiler_options=FAST_COMPILE)(variables["params"])

    loss, grads = loss_and_grads(model16)
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(g.dtype == jnp.float32 for g in leaves) and all(np.all(np.isfinite(g)) for g in leaves)
    _, g32 = loss_and_grads(model32)
    flat16 = np.concatenate([np.ravel(g) for g in leaves])
    flat32 = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(g32)])
    cosine = flat16 @ flat32 / np.linalg.norm(flat16) / np.linalg.norm(flat32)
    assert cosine > 0.99


@pytest.mark.parametrize("bad", ["float16", "int8", "bf16", jnp.int32])
def test_unknown_compute_dtypes_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match=r"choose one of \['bfloat16', 'float32'\]"):
        kernels.compute_dtype(bad)
    assert kernels.compute_dtype("bfloat16") == jnp.bfloat16 and kernels.compute_dtype(jnp.float32) == jnp.float32


def test_bf16_stablehlo_export_computes_what_the_live_bf16_model_does(pair):
    from segformer_jax.deploy import export as E

    _, model32, model16, variables = pair
    x = reference.images(1, 64, 96, seed=1)
    exported = E.export_stablehlo(model16, variables)
    got = np.asarray(exported.call(x))
    assert reference.max_abs_diff(got, jax.jit(model16.apply)(variables, x)) < 1e-5
    assert reference.max_abs_diff(got, jax.jit(model32.apply)(variables, x)) > 1e-4  # bfloat16 inside


def test_narrow_matmuls_stay_float32_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_REDUCED_CPU_DIM", 64)
    x, w = jnp.ones((8, 32)), jnp.ones((32, 256))
    text = jax.jit(lambda x, w: kernels.matmul(x, w, jnp.bfloat16)).lower(x, w).as_text()
    assert ("bf16" in text) == (jax.default_backend() != "cpu")
    wide = jax.jit(lambda x, w: kernels.matmul(x, w, jnp.bfloat16)).lower(jnp.ones((8, 64)), jnp.ones((64, 64)))
    assert re.search(r"tensor<8x64xbf16>, tensor<64x64xbf16>\) -> tensor<8x64xf32>", wide.as_text())


def test_bf16_weights_stored_for_compute_only_where_the_model_casts_them(pair, tmp_path):
    """from_pretrained(dtype='bfloat16') keeps bfloat16 copies of the kernels the model casts on every
    call; statistics, biases, depthwise kernels and the decode head's folded projections stay float32."""
    ref, model32, model16, variables = pair
    cast = kernels.weights_for_compute(variables, jnp.bfloat16)
    assert kernels.weights_for_compute(variables, jnp.float32) is variables
    flat = {jax.tree_util.keystr(p): v.dtype for p, v in jax.tree_util.tree_leaves_with_path(cast)}
    reduced = {k for k, d in flat.items() if d == jnp.bfloat16}
    assert any("query']['kernel" in k for k in reduced) and any(
        "patch_embeddings_0']['proj']['kernel" in k for k in reduced
    )
    assert any("'sr']['kernel" in k for k in reduced) and any("classifier']['kernel" in k for k in reduced)
    for k in reduced:
        assert k.endswith("['kernel']") and "'batch_stats'" not in k, k
        assert "dwconv" not in k and "linear_c" not in k and "linear_fuse" not in k, k
    assert all(d == jnp.float32 for k, d in flat.items() if k not in reduced and "num_batches" not in k)

    x = reference.images(2, 64, 96, seed=3)
    got = np.asarray(jax.jit(model16.apply)(cast, x))
    want = np.asarray(jax.jit(model16.apply)(variables, x))
    # XLA may keep a float32 weight's excess precision through its bfloat16 round trip; stored
    # bfloat16 weights are rounded for sure: close, not bit-identical.
    assert reference.max_abs_diff(got, want) < 0.02 * np.abs(want).max()

    def converts_to_bf16(v):
        program = jax.jit(model16.apply).lower(v, x).as_text()
        return len(re.findall(r"stablehlo\.convert[^\n]*xf32>\) -> tensor<[0-9x]*xbf16>", program))

    assert converts_to_bf16(cast) < converts_to_bf16(variables)

    sj.save_pretrained(model32, variables, tmp_path / "m")
    _, loaded = sj.from_pretrained(tmp_path / "m", dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(loaded)
    assert sum(v.dtype == jnp.bfloat16 for v in leaves) == len(reduced)
    _, master = sj.from_pretrained(tmp_path / "m", dtype="bfloat16", cast_weights=False)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(master["params"]))
