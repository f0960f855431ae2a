"""README claims that no other test checked: bf16 compute with float32 parameters, from_pretrained's
id2label= / reinit=, training's init_from, the drop-path linear schedule and the dropout placement
against HF, export's uint8_input / upsample / "< 32 px fails", the SavedModel at batch > 1,
"transformers refuses the int8 file", 16-bit label PNGs for > 256 classes. Tiny models."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from reference import TINY, build_reference, images, max_abs_diff, random_variables, to_flax

import segformer_jax as sj

SMALL = dict(TINY, num_labels=5)


@pytest.fixture(scope="module")
def small():
    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**SMALL))
    return model, random_variables(model, seed=4)


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    model, variables = small
    path = str(tmp_path_factory.mktemp("claims") / "tiny-flax")
    sj.save_pretrained(model, variables, path, format="flax")
    return path


# ----------------------------------------------------------------------------- bf16
def test_bfloat16_compute_with_float32_parameters(small):
    model, variables = small
    bf16 = sj.SegformerForSemanticSegmentation(model.config, dtype=jnp.bfloat16)
    x = images(1, 48, 64, seed=1)
    jaxpr = str(jax.make_jaxpr(bf16.apply)(variables, x))
    assert "bf16[" in jaxpr and "dot_general" in jaxpr
    # parameters stay float32: the same variables (float32) serve both models
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables["params"])} == {np.dtype(np.float32)}
    full = np.asarray(jax.jit(model.apply)(variables, x), np.float32)
    half = np.asarray(jax.jit(bf16.apply)(variables, x), np.float32)
    err = max_abs_diff(half, full) / np.abs(full).max()
    print(f"bf16 vs float32 logits: relative {err:.1e}")
    assert 1e-5 < err < 5e-2  # bf16 really computed (not float32), and close


# ----------------------------------------------------------------------------- from_pretrained / init_from
def _leaf(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return np.asarray(tree)


def test_id2label_and_reinit(saved, small):
    _, variables = small
    id2label = {0: "sky", 1: "road", 2: "car"}
    model, loaded = sj.from_pretrained(saved, id2label=id2label, reinit=[r"decode_head/linear_fuse/"])
    assert model.config.num_labels == 3 and model.config.id2label == id2label
    assert _leaf(loaded, "params/decode_head/classifier/kernel").shape == (1, 1, 16, 3)  # a fresh classifier
    fuse = "params/decode_head/linear_fuse/kernel"
    assert max_abs_diff(_leaf(loaded, fuse), _leaf(variables, fuse)) > 0.1  # re-initialised by reinit=
    for kept in ("params/decode_head/linear_c_0/proj/kernel", "params/segformer/encoder/block_1_1/mlp/dense1/kernel"):
        np.testing.assert_array_equal(_leaf(loaded, kept), _leaf(variables, kept))


def test_training_init_from_keeps_the_encoder_and_gives_a_fresh_head(tmp_path):
    import importlib.util
    import os

    from segformer_jax import training

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
    spec = importlib.util.spec_from_file_location("claims_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    first, _ = training.build_model(config, ["a", "b", "c", "d", "e"])
    variables = random_variables(first, seed=3)
    sj.save_pretrained(first, variables, str(tmp_path / "five"), format="flax")
    config.model.init_from = str(tmp_path / "five")
    model, pretrained = training.build_model(config, ["a", "b", "c"])  # 3 classes, the checkpoint has 5
    assert model.config.num_labels == 3 and model.config.hidden_sizes == first.config.hidden_sizes
    assert _leaf(pretrained, "params/decode_head/classifier/kernel").shape[-1] == 3
    enc = "params/segformer/encoder/block_2_0/mlp/dense1/kernel"
    np.testing.assert_array_equal(_leaf(pretrained, enc), _leaf(variables, enc))


# ----------------------------------------------------------------------------- drop path and dropout vs HF
def test_drop_path_rates_are_hf_linear_schedule():
    ref = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(**{**SMALL, "depths": [2, 3, 1, 2], "drop_path_rate": 0.3})
    )
    hf_rates = [
        float(getattr(block.drop_path, "drop_prob", 0.0)) for stage in ref.segformer.stages for block in stage.blocks
    ]
    ours = sj.SegformerConfig(**{**SMALL, "depths": (2, 3, 1, 2), "drop_path_rate": 0.3}).drop_path_rates
    np.testing.assert_allclose(ours, hf_rates, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours, np.linspace(0, 0.3, 8), rtol=1e-6)  # 0 for the first block, 0.3 the last


@pytest.mark.parametrize(
    "site", ["hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"], ids=lambda s: s[:-5]
)
def test_dropout_placement_matches_hf(site):
    """With one dropout site at rate 1 (everything dropped: deterministic in both frameworks), train-mode
    logits are those of HF's network with that site zeroed: where each dropout sits decides the number
    (e.g. Mix-FFN's second dropout after fc2 leaves no fc2 bias; attention dropout on the probabilities
    leaves the output projection's bias)."""
    rates = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    ref = build_reference(num_labels=5, seed=5, drop_path_rate=0.0, check=False, **{**rates, site: 1.0}, **TINY)
    ref = copy.deepcopy(ref).train()
    model, variables = to_flax(ref)
    x = images(1, 40, 48, seed=6)
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).logits.numpy().transpose(0, 2, 3, 1)
    got, _ = jax.jit(
        lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    )(variables, x)
    # without dropout the logits are different: the site matters at this rate
    ref.config.update({site: 0.0})
    plain = sj.SegformerForSemanticSegmentation(model.config.replace(**{site: 0.0}))
    free, _ = jax.jit(lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert max_abs_diff(free, want) > 1e-2
    assert max_abs_diff(got, want) < 1e-4, site


# ----------------------------------------------------------------------------- export
def test_stablehlo_uint8_input_upsample_and_minimum_size(small, tmp_path):
    from segformer_jax.deploy import export as E
    from segformer_jax.models.decode_head import upsample_bilinear

    model, variables = small
    path = E.save_stablehlo(model, variables, tmp_path / "m.stablehlo", uint8_input=True, upsample=True)
    exp = E.load_stablehlo(path)
    raw = np.random.default_rng(7).integers(0, 256, (2, 40, 52, 3), dtype=np.uint8)
    got = np.asarray(exp.call(raw))
    want = upsample_bilinear(model.apply(variables, sj.normalize_images(raw)), (40, 52))
    assert got.shape == (2, 40, 52, 5)
    assert max_abs_diff(got, want) < 1e-5
    with pytest.raises(Exception, match="(?i)shape|constraint|assert|dimension"):
        exp.call(np.zeros((1, 28, 52, 3), np.uint8))  # below 32 pixels


def test_tf_saved_model_at_batch_3(small, tmp_path):
    tf = pytest.importorskip("tensorflow")
    from segformer_jax.deploy import export as E

    model, variables = small
    path = E.save_tf_saved_model(model, variables, tmp_path / "saved")
    loaded = tf.saved_model.load(path)
    x = images(3, 36, 44, seed=8)
    got = loaded.signatures["serving_default"](tf.constant(x))
    got = np.asarray(next(iter(got.values())))
    assert max_abs_diff(got, model.apply(variables, x)) < 1e-5


# ----------------------------------------------------------------------------- int8, 16-bit PNGs
def test_transformers_refuses_the_int8_file(small, tmp_path):
    from segformer_jax.deploy import quantize as Q

    model, variables = small
    out = Q.save_quantized(model, Q.quantize_variables(variables), tmp_path / "int8")
    with pytest.raises((OSError, ValueError, EnvironmentError)):
        transformers.SegformerForSemanticSegmentation.from_pretrained(out)


def test_label_png_is_16_bit_above_256_classes(tmp_path):
    from PIL import Image

    from segformer_jax.predict import predict

    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**{**TINY, "num_labels": 300}))
    variables = random_variables(model, seed=9)
    bias = np.zeros(300, np.float32)
    bias[299] = 1e3  # class 299 everywhere: an id that does not fit in 8 bits
    variables["params"]["decode_head"]["classifier"]["bias"] = bias
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / "a.png")
    predict([str(src)], model, str(tmp_path / "out"), variables=variables, overlay=False)
    label = Image.open(tmp_path / "out" / "a.png")
    assert label.mode.startswith("I;16") or label.mode == "I", label.mode
    arr = np.asarray(label)
    assert arr.shape == (40, 48) and int(arr.max()) == 299 and int(arr.min()) == 299
