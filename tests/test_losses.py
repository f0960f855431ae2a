"""The training loss against Hugging Face's torch loss, and the mmseg reduction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segformer_jax import SegformerConfig, SegformerForSemanticSegmentation
from segformer_jax.training import losses

TINY = SegformerConfig(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=4,
)


def _labels(shape, num_classes, seed=0, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, shape).astype(np.int32)
    labels[rng.random(shape) < ignore_fraction] = 255
    return labels


def test_loss_equals_hugging_face_torch_loss(tmp_path):
    import torch
    import transformers

    from segformer_jax import save_pretrained

    model = SegformerForSemanticSegmentation(TINY)
    from segformer_jax.training import init_model_variables

    variables = init_model_variables(model, jax.random.key(0))
    # Scale the classifier so that logits are O(10): a loss near log(K) would hide mistakes.
    variables = jax.tree_util.tree_map(lambda x: x, variables)
    clf = variables["params"]["decode_head"]["classifier"]
    clf["kernel"] = clf["kernel"] * 50.0
    save_pretrained(model, variables, tmp_path / "hf", format="hf")
    torch_model = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "hf").eval()

    images = np.random.default_rng(1).standard_normal((2, 64, 48, 3)).astype(np.float32)
    labels = _labels((2, 64, 48), TINY.num_labels, seed=2)
    with torch.no_grad():
        out = torch_model(
            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), labels=torch.from_numpy(labels).long()
        )
    logits = jax.jit(model.apply)(variables, jnp.asarray(images))
    ours = float(losses.semantic_segmentation_loss(logits, jnp.asarray(labels), reduction="valid"))
    assert float(out.loss) > 0.5  # not a trivially small loss
    np.testing.assert_allclose(ours, float(out.loss), rtol=1e-5)


def test_reductions_against_plain_formula():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 8, 8, 5)).astype(np.float32) * 3
    labels = _labels((2, 32, 32), 5, seed=3, ignore_fraction=0.4)
    up = jax.image.resize(jnp.asarray(logits), (2, 32, 32, 5), "bilinear")
    logp = np.asarray(jax.nn.log_softmax(up, axis=-1))
    valid = labels != 255
    nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], axis=-1)[..., 0] * valid
    got_valid = losses.semantic_segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), reduction="valid")
    got_all = losses.semantic_segmentation_loss(jnp.asarray(logits), jnp.asarray(labels), reduction="all")
    np.testing.assert_allclose(float(got_valid), nll.sum() / valid.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(got_all), nll.sum() / labels.size, rtol=1e-5)
    # Gradients of both reductions differ exactly by the factor valid / all.
    g_valid = jax.grad(lambda x: losses.semantic_segmentation_loss(x, jnp.asarray(labels), reduction="valid"))(logits)
    g_all = jax.grad(lambda x: losses.semantic_segmentation_loss(x, jnp.asarray(labels), reduction="all"))(logits)
    np.testing.assert_allclose(np.asarray(g_all), np.asarray(g_valid) * valid.sum() / labels.size, rtol=1e-5, atol=1e-9)


def test_all_ignored_gives_zero_and_bad_reduction_is_rejected():
    logits = jnp.ones((1, 4, 4, 3))
    labels = jnp.full((1, 16, 16), 255)
    assert float(losses.semantic_segmentation_loss(logits, labels)) == 0.0
    with pytest.raises(ValueError, match="reduction"):
        losses.semantic_segmentation_loss(logits, labels, reduction="mean")
