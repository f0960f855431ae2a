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


# ----------------------------------------------------------------------------- config-selected losses
# References: torch on the logits upsampled with F.interpolate(bilinear, align_corners=False), in
# float64, written from the mmseg / HF / Berman formulas; values and gradients (w.r.t. the low-res
# logits) within 1e-5 relative.


def _case(k=5, seed=0, shape=(2, 8, 8), out=(32, 32), ignore_fraction=0.2, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((*shape, k)) * scale).astype(np.float32)
    labels = _labels((shape[0], *out), max(k, 2), seed=seed + 1, ignore_fraction=ignore_fraction)
    return logits, labels


def _torch_up(logits, out):
    import torch
    import torch.nn.functional as F

    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    up = F.interpolate(x.permute(0, 3, 1, 2), size=out, mode="bilinear", align_corners=False)
    return x, up


def _compare(ours_fn, ref_fn, logits, labels):
    """ours_fn(jax logits) -> scalar; ref_fn(torch upsampled (B, K, H, W) float64, torch labels) -> scalar."""
    import torch

    x, up = _torch_up(logits, labels.shape[1:])
    ref = ref_fn(up, torch.from_numpy(labels).long())
    ref.backward()
    value, grad = jax.value_and_grad(ours_fn)(jnp.asarray(logits))
    ref_grad = x.grad.numpy().astype(np.float64)
    np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
    scale = np.abs(ref_grad).max()
    assert scale > 0
    rel = np.abs(np.asarray(grad, np.float64) - ref_grad).max() / scale
    assert rel < 1e-5, rel
    return float(value), rel


@pytest.mark.parametrize("reduction", ["valid", "all"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_smoothed_cross_entropy_against_torch(reduction, smoothing):
    import torch.nn.functional as F

    logits, labels = _case(k=5, seed=4)
    weights = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    import torch

    w = torch.tensor(weights, dtype=torch.float64)

    def ref(up, lab):
        if reduction == "valid":
            return F.cross_entropy(up, lab, weight=w, ignore_index=255, label_smoothing=smoothing)
        return F.cross_entropy(up, lab, weight=w, ignore_index=255, label_smoothing=smoothing, reduction="sum") / (
            lab.numel()
        )

    def ours(x):
        return losses.cross_entropy(
            x, jnp.asarray(labels), reduction=reduction, class_weight=weights, label_smoothing=smoothing
        )

    _compare(ours, ref, logits, labels)
    if smoothing == 0.0:  # the public entry point takes class_weight= with the same meaning
        _compare(
            lambda x: losses.semantic_segmentation_loss(
                x, jnp.asarray(labels), reduction=reduction, class_weight=weights
            ),
            ref,
            logits,
            labels,
        )


@pytest.mark.parametrize("reduction", ["valid", "all"])
def test_binary_loss_is_hugging_face_bce(reduction):
    import torch

    logits, labels = _case(k=1, seed=5)
    labels = np.where(labels == 255, 255, labels % 2).astype(np.int32)

    def ref(up, lab):  # transformers' SegformerForSemanticSegmentation.forward, num_labels == 1
        valid_mask = ((lab >= 0) & (lab != 255)).double()
        loss = torch.nn.BCEWithLogitsLoss(reduction="none")(up.squeeze(1), lab.double())
        if reduction == "all":
            return (loss * valid_mask).mean()
        return (loss * valid_mask).sum() / valid_mask.sum()

    _compare(
        lambda x: losses.semantic_segmentation_loss(x, jnp.asarray(labels), reduction=reduction), ref, logits, labels
    )
    # Class weights (background, foreground) on the binary loss: torch BCE with per-pixel weights.
    weights = np.array([0.3, 2.0], np.float32)

    def ref_weighted(up, lab):
        valid = (lab != 255).double()
        w = torch.tensor(weights, dtype=torch.float64)[lab.clamp(0, 1)] * valid
        loss = torch.nn.BCEWithLogitsLoss(reduction="none")(up.squeeze(1), lab.double().clamp(0, 1))
        return (loss * w).sum() / (w.sum() if reduction == "valid" else lab.numel())

    _compare(
        lambda x: losses.semantic_segmentation_loss(x, jnp.asarray(labels), reduction=reduction, class_weight=weights),
        ref_weighted,
        logits,
        labels,
    )


def _mmseg_ohem_weight(up, lab, thresh, min_kept, ignore_index=255):
    """mmseg OHEMPixelSampler.sample (thresh given), verbatim but for the context object."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        batch_kept = min_kept * lab.size(0)
        valid_mask = lab != ignore_index
        seg_weight = up.new_zeros(size=lab.size())
        valid_seg_weight = seg_weight[valid_mask]
        seg_prob = F.softmax(up, dim=1)
        tmp = lab.clone().unsqueeze(1)
        tmp[tmp == ignore_index] = 0
        seg_prob = seg_prob.gather(1, tmp).squeeze(1)
        sort_prob, _ = seg_prob[valid_mask].sort()
        min_threshold = sort_prob[min(batch_kept, sort_prob.numel() - 1)] if sort_prob.numel() > 0 else 0.0
        threshold = max(min_threshold, thresh)
        valid_seg_weight[seg_prob[valid_mask] < threshold] = 1.0
        seg_weight[valid_mask] = valid_seg_weight
    return seg_weight


@pytest.mark.parametrize("reduction", ["valid", "all"])
@pytest.mark.parametrize("min_kept", [10, 900])  # below / above the number of pixels under thresh
def test_ohem_cross_entropy_against_mmseg(reduction, min_kept):
    import torch.nn.functional as F

    logits, labels = _case(k=4, seed=6, scale=2.0)

    def ref(up, lab):
        weight = _mmseg_ohem_weight(up, lab, 0.7, min_kept)
        loss = F.cross_entropy(up, lab, ignore_index=255, reduction="none") * weight
        denominator = (lab != 255).sum() if reduction == "valid" else lab.numel()
        return loss.sum() / denominator

    _compare(
        lambda x: losses.ohem_cross_entropy(x, jnp.asarray(labels), reduction=reduction, thresh=0.7, min_kept=min_kept),
        ref,
        logits,
        labels,
    )
    keep = np.asarray(losses.ohem_kept_mask(jnp.asarray(logits), jnp.asarray(labels), thresh=0.7, min_kept=min_kept))
    _, up = _torch_up(logits, labels.shape[1:])
    import torch

    np.testing.assert_array_equal(keep, _mmseg_ohem_weight(up, torch.from_numpy(labels).long(), 0.7, min_kept).numpy())
    with pytest.raises(ValueError, match="ohem_min_kept"):
        losses.ohem_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), min_kept=32 * 32 + 1)


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_against_mmseg_formula(weighted):
    import torch
    import torch.nn.functional as F

    logits, labels = _case(k=4, seed=7)
    weights = np.array([1.0, 0.5, 2.0, 1.5], np.float32) if weighted else None

    def ref(up, lab):  # mmseg 0.x dice_loss / binary_dice_loss, valid pixels in the denominator too
        k = up.shape[1]
        pred = F.softmax(up, dim=1)
        valid = (lab != 255).double()
        target = F.one_hot(lab.clamp(0, k - 1), k).double()
        total = 0.0
        for i in range(k):
            p = pred[:, i].reshape(lab.shape[0], -1)
            t = target[..., i].reshape(lab.shape[0], -1)
            v = valid.reshape(lab.shape[0], -1)
            num = torch.sum(p * t * v, dim=1) * 2 + 1.0
            den = torch.sum((p.pow(2) + t.pow(2)) * v, dim=1) + 1.0
            d = (1 - num / den).mean()
            total = total + (d * float(weights[i]) if weighted else d)
        return total / k

    _compare(lambda x: losses.dice_loss(x, jnp.asarray(labels), class_weight=weights), ref, logits, labels)


def _berman_lovasz_softmax(probas, labels, ignore=255):
    """Berman et al.'s reference (lovasz_losses.py): classes='present', per_image=False."""
    import torch

    def lovasz_grad(gt_sorted):
        p = len(gt_sorted)
        gts = gt_sorted.sum()
        intersection = gts - gt_sorted.float().cumsum(0)
        union = gts + (1 - gt_sorted).float().cumsum(0)
        jaccard = 1.0 - intersection / union
        if p > 1:
            jaccard[1:p] = jaccard[1:p] - jaccard[0:-1]
        return jaccard

    b, c, h, w = probas.size()
    probas = probas.permute(0, 2, 3, 1).contiguous().view(-1, c)
    labels = labels.view(-1)
    valid = labels != ignore
    probas, labels = probas[valid.nonzero().squeeze()], labels[valid]
    losses_ = []
    for cls in range(c):
        fg = (labels == cls).double()
        if fg.sum() == 0:
            continue
        errors = (fg - probas[:, cls]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses_.append(torch.dot(errors_sorted, lovasz_grad(fg[perm.data]).double()))
    return sum(losses_) / len(losses_) if losses_ else probas.sum() * 0


def test_lovasz_softmax_against_berman_reference():
    import torch.nn.functional as F

    logits, labels = _case(k=4, seed=8)
    labels[labels == 3] = 2  # class 3 absent: 'present' leaves it out
    _compare(
        lambda x: losses.lovasz_softmax(x, jnp.asarray(labels)),
        lambda up, lab: _berman_lovasz_softmax(F.softmax(up, dim=1), lab),
        logits,
        labels,
    )


@pytest.mark.parametrize("reduction", ["valid", "all"])
def test_focal_against_formula(reduction):
    import torch
    import torch.nn.functional as F

    logits, labels = _case(k=3, seed=9)
    alpha = np.array([0.25, 1.0, 0.5], np.float32)

    def ref(up, lab):
        valid = lab != 255
        logp = F.log_softmax(up, dim=1).gather(1, lab.clamp(0, 2).unsqueeze(1)).squeeze(1)
        a = torch.tensor(alpha, dtype=torch.float64)[lab.clamp(0, 2)]
        loss = (-a * (1 - logp.exp()) ** 2 * logp) * valid
        return loss.sum() / (valid.sum() if reduction == "valid" else lab.numel())

    _compare(
        lambda x: losses.focal_loss(x, jnp.asarray(labels), reduction=reduction, gamma=2.0, class_weight=alpha),
        ref,
        logits,
        labels,
    )


def test_losses_on_a_label_size_that_is_no_integer_multiple():
    """The banded walk needs H = s h; other sizes take one whole-image band, same formulas."""
    import torch.nn.functional as F

    logits, labels = _case(k=3, seed=10, shape=(1, 6, 5), out=(20, 17))
    _compare(
        lambda x: losses.cross_entropy(x, jnp.asarray(labels), label_smoothing=0.2),
        lambda up, lab: F.cross_entropy(up, lab, ignore_index=255, label_smoothing=0.2),
        logits,
        labels,
    )


def test_loss_terms_from_config_sum_and_bad_input():
    import ml_collections

    logits, labels = _case(k=3, seed=11)
    x, y = jnp.asarray(logits), jnp.asarray(labels)
    cfg = ml_collections.ConfigDict(
        {"reduction": "valid", "terms": (("cross_entropy", 1.0), ("dice", 0.5)), "class_weight": None}
    )
    fn = losses.loss_from_config(cfg, num_classes=3)
    expected = losses.semantic_segmentation_loss(x, y) + 0.5 * losses.dice_loss(x, y)
    np.testing.assert_allclose(float(fn(x, y)), float(expected), rtol=1e-6)

    def bad(match, **changes):
        c = ml_collections.ConfigDict({**cfg.to_dict(), **changes})
        with pytest.raises(ValueError, match=match):
            losses.loss_from_config(c, num_classes=3, crop_size=(32, 32))

    bad("unknown loss 'dicee'", terms=(("dicee", 1.0),))
    bad("loss.terms", terms=(("dice", "heavy"),))
    bad("loss.class_weight has 2 entries", class_weight=(1.0, 2.0))
    bad("loss.class_weight", class_weight="inverse_frequency")
    bad("loss.ohem_min_kept=2000", terms=("ohem_cross_entropy",), ohem_min_kept=2000)
    bad("loss.label_smoothing", label_smoothing=1.5)
    bad("loss.reduction", reduction="mean")


def test_inverse_sqrt_frequency_weights():
    counts = np.array([900, 100, 0])
    with pytest.raises(ValueError, match=r"class_weight='inverse_sqrt_frequency'.*\(c\)"):
        losses.inverse_sqrt_frequency_weights(counts, ["a", "b", "c"])
    w = losses.inverse_sqrt_frequency_weights(np.array([900, 100]))
    f = np.array([0.9, 0.1])
    expected = (1 / np.sqrt(f)) / np.sum(f / np.sqrt(f))
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert w[1] / w[0] == pytest.approx(3.0)


def test_default_config_loss_is_the_banded_kernel_unchanged():
    """The default loss.terms (cross_entropy, 1.0) traces to exactly the program of
    semantic_segmentation_loss (the banded kernel): the train step's speed and memory do not change."""
    from segformer_jax.training import recipes

    cfg = recipes.paper_recipe("b0", None).loss
    for reduction in ("valid", "all"):
        cfg.reduction = reduction
        fn = losses.loss_from_config(cfg, num_classes=4)
        x, y = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 32, 32), jnp.int32)
        ours = jax.make_jaxpr(jax.value_and_grad(fn))(x, y)
        plain = jax.make_jaxpr(
            jax.value_and_grad(lambda a, b, r=reduction: losses.semantic_segmentation_loss(a, b, reduction=r))
        )(x, y)
        assert str(ours) == str(plain)
