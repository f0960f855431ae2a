"""Whole-image / sliding-window / TTA inference against a straightforward torch reference of the
NVlabs (mmseg) procedure, run with the Hugging Face torch model on each tile's unpadded pixels (torch
`F.interpolate` for every resize, nothing of segformer_jax); compilation counting.

The reference model's weights make every branch matter (initializer_range 0.3, perturbed norms,
logits of order 10): zero padding then moves the logits by O(1), so a padded shortcut cannot pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

F = torch.nn.functional

import segformer_jax as sj  # noqa: E402
from segformer_jax import inference  # noqa: E402
from segformer_jax.pretrained import variable_shapes  # noqa: E402
from weights_convert.convert import torch_state_to_flax  # noqa: E402

TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=5,
)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # same function, ~2x faster XLA:CPU compiles
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


TOLERANCE = 1e-4  # logits of order 10; float32 noise of both sides is ~1e-5


def _hf_reference():
    import reference

    x = (torch.from_numpy(_image(64, 96).astype(np.float32)).permute(2, 0, 1)[None] - MEAN) / STD
    return reference.pipeline_reference(TINY, x)


@pytest.fixture(scope="module")
def models():
    ref = _hf_reference()
    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY))
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    variables, _ = torch_state_to_flax(state, variable_shapes(model))
    forward = inference.TiledForward.from_model(model, variables, batch_size=4, compiler_options=FAST_COMPILE)
    return ref, forward, (model, variables)


# ------------------------------------------------------------------ reference (mmseg, torch, one image)
def _ref_keep_ratio(h, w, scale, ratio):
    if scale is None:
        return int(h * ratio + 0.5), int(w * ratio + 0.5)
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def _ref_encode_decode(ref, x):
    """mmseg encode_decode on the tile's own pixels: the HF model, logits resized to the tile. A side
    under 32 pixels (which the network cannot take) is zero-padded to 32, as the procedure does."""
    h, w = x.shape[2:]
    ph, pw = max(h, 32), max(w, 32)
    out = ref(F.pad(x, (0, pw - w, 0, ph - h))).logits
    out = F.interpolate(out, size=(ph, pw), mode="bilinear", align_corners=False)
    return out[:, :, :h, :w]


def _ref_slide(ref, img, crop, stride):
    """mmseg EncoderDecoder.slide_inference, verbatim in structure."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((1, TINY["num_labels"], h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_logit = _ref_encode_decode(ref, img[:, :, y1:y2, x1:x2])
            preds += F.pad(crop_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def _reference(ref, image, cfg: inference.InferenceConfig, *, tta_mean_of="probabilities"):
    h0, w0 = image.shape[:2]
    img = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    outs = []
    with torch.no_grad():
        for ratio in cfg.ratios:
            for flip in (False, True) if cfg.flip else (False,):
                h, w = _ref_keep_ratio(h0, w0, cfg.scale, ratio)
                x = img if (h, w) == (h0, w0) else F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
                x = (x - MEAN) / STD
                if flip:
                    x = x.flip(3)
                if cfg.mode == "whole":
                    logit = _ref_encode_decode(ref, x)
                else:
                    logit = _ref_slide(ref, x, cfg.crop, cfg.stride)
                if flip:
                    logit = logit.flip(3)
                if (h, w) != (h0, w0):
                    logit = F.interpolate(logit, size=(h0, w0), mode="bilinear", align_corners=False)
                outs.append(logit)
    if len(outs) == 1:
        out = outs[0]
    elif tta_mean_of == "probabilities":  # mmseg aug_test
        out = sum(F.softmax(o, dim=1) for o in outs) / len(outs)
    else:  # the other reading, to show the test can tell them apart
        out = F.softmax(sum(outs) / len(outs), dim=1)
    return out[0].permute(1, 2, 0).numpy()


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content (random noise is all high frequency) plus noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 5.0)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ geometry helpers
@pytest.mark.parametrize("size_in,size_out", [((13, 17), (40, 29)), ((64, 48), (21, 33)), ((5, 9), (5, 20))])
def test_resize_bilinear_equals_torch(size_in, size_out):
    x = np.random.default_rng(0).standard_normal(size_in + (3,)).astype(np.float32)
    want = (
        F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=size_out, mode="bilinear", align_corners=False)[
            0
        ]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_allclose(inference.resize_bilinear(x, size_out), want, atol=1e-5)


def test_keep_ratio_size_matches_mmcv():
    assert inference.keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    assert inference.keep_ratio_size(1024, 2048, (2048, 512)) == (512, 1024)
    assert inference.keep_ratio_size(100, 5000, (2048, 512)) == (41, 2048)  # long edge caps
    assert inference.keep_ratio_size(1024, 2048, (2048, 1024), 0.5) == (512, 1024)
    assert inference.keep_ratio_size(300, 451, (2048, 512), size_divisor=32) == (512, 800)
    assert inference.keep_ratio_size(30, 40, None, 1.75) == (53, 70)


def test_slide_windows_cover_and_match_mmseg_grid():
    windows = inference.slide_windows(100, 130, (48, 64), (32, 40))
    assert windows[0] == (0, 48, 0, 64) and windows[-1] == (52, 100, 66, 130)
    cover = np.zeros((100, 130), int)
    for y1, y2, x1, x2 in windows:
        assert (y2 - y1, x2 - x1) == (48, 64)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert inference.slide_windows(30, 200, (48, 64), (32, 40))[0] == (0, 30, 0, 64)  # smaller than crop


def test_settings_that_would_leave_pixels_unsegmented_are_refused():
    with pytest.raises(ValueError, match=r"stride=\(600, 600\) is larger than crop=\(64, 64\)"):
        inference.InferenceConfig("slide", crop=(64, 64), stride=(600, 600))
    inference.InferenceConfig("whole", crop=(64, 64), stride=(600, 600))  # unused in whole mode
    for bad in ((0, 64), None, (64,), "64"):
        with pytest.raises(ValueError, match="crop=.*give two positive integers"):
            inference.InferenceConfig("slide", crop=bad)
    with pytest.raises(ValueError, match="scale=512.*give two positive integers"):
        inference.InferenceConfig(scale=512)
    with pytest.raises(ValueError, match="size_divisor=-32"):
        inference.InferenceConfig(size_divisor=-32)


# ------------------------------------------------------------------ procedure vs reference (1e-5)
CASES = {
    "whole_exact_no_padding": (inference.InferenceConfig("whole", scale=None, bucket=None), (48, 72)),
    "whole_resized_padded": (inference.InferenceConfig("whole", scale=(96, 64), bucket=32), (45, 70)),
    "slide": (inference.InferenceConfig("slide", scale=None, crop=(48, 64), stride=(32, 40), bucket=32), (75, 100)),
    "slide_image_smaller_than_crop": (
        inference.InferenceConfig("slide", scale=None, crop=(48, 64), stride=(32, 40), bucket=32),
        (40, 150),
    ),
    "tta_scales_flip": (inference.InferenceConfig("whole", scale=(96, 64), ratios=(0.75, 1.0), flip=True), (45, 70)),
    "whole_tiny_side": (inference.InferenceConfig("whole", scale=None, bucket=32), (20, 70)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_agrees_with_reference(models, case):
    ref, forward, _ = models
    cfg, (h, w) = CASES[case]
    image = _image(h, w, seed=len(case))
    ours = inference.segment(forward, image, cfg)
    want = _reference(ref, image, cfg)
    assert ours.shape == (h, w, TINY["num_labels"])
    assert np.abs(want).max() > (0.5 if cfg.augmentations[1:] else 3.0)  # not a degenerate reference
    np.testing.assert_allclose(ours, want, atol=TOLERANCE, rtol=0)
    if len(cfg.augmentations) > 1:  # the mean of probabilities, not the softmax of the mean logits
        other = _reference(ref, image, cfg, tta_mean_of="logits")
        assert np.abs(other - want).max() > 100 * TOLERANCE


@pytest.mark.parametrize(
    "sizes", [[(97, 131), (120, 100)], [(33, 250)], [(360, 480)]], ids=["97x131+120x100", "33x250", "360x480"]
)
def test_bucketed_images_get_their_unpadded_logits(models, sizes):
    """Sizes that are not multiples of 32, padded to their bucket and run in one batch: each image's
    logits are transformers' on that image alone (the padded form missed by O(1) and 10-50% of labels)."""
    ref, forward, _ = models
    cfg = inference.InferenceConfig("whole", scale=None, bucket=32)
    images = [_image(h, w, seed=h) for h, w in sizes]
    ours = inference.segment_batch(forward, images, cfg)
    labels = inference.segment_batch(forward, images, cfg, labels=True)
    for image, logits, lab in zip(images, ours, labels):
        want = _reference(ref, image, inference.InferenceConfig("whole", scale=None, bucket=None))
        assert np.abs(want).max() > 3.0
        np.testing.assert_allclose(logits, want, atol=TOLERANCE, rtol=0)
        np.testing.assert_array_equal(lab, want.argmax(-1))


def test_the_padded_form_differs_so_the_reference_can_tell(models):
    """exact=False (the old behaviour: the padded tile is the input) is O(1) away from transformers on
    the same image: the reference above is sensitive to padding."""
    ref, _, (model, variables) = models
    padded = inference.TiledForward.from_model(model, variables, batch_size=1, exact=False)
    image = _image(97, 131, seed=97)
    cfg = inference.InferenceConfig("whole", scale=None, bucket=32)
    want = _reference(ref, image, cfg)
    got = inference.segment(padded, image, cfg)
    assert np.abs(got - want).max() > 0.5
    assert np.mean(got.argmax(-1) == want.argmax(-1)) < 0.99


_PADDED = {}


def _padded_forward(model, variables):
    if "forward" not in _PADDED:
        _PADDED["forward"] = inference.TiledForward.from_model(
            model, variables, batch_size=4, compiler_options=FAST_COMPILE, exact=False
        )
    return _PADDED["forward"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_assembly_equals_the_numpy_one(models, case):
    """A TiledForward keeps the logits on its device and resizes / averages / takes the argmax there; any
    other callable gets the numpy procedure. Same numbers, same labels."""
    _, _, (model, variables) = models
    # The numpy path runs `forward` on the padded tiles as they are: compare with the padded device path.
    forward = _padded_forward(model, variables)
    cfg, (h, w) = CASES[case]
    images = [_image(h, w, seed=3), _image(h + 7, w - 5, seed=4)]
    on_device = inference.segment_batch(forward, images, cfg)
    on_host = inference.segment_batch(lambda tiles: forward(tiles), images, cfg)
    labels = inference.segment_batch(forward, images, cfg, labels=True)
    for dev, host, lab, image in zip(on_device, on_host, labels, images):
        assert dev.shape == host.shape == image.shape[:2] + (TINY["num_labels"],)
        np.testing.assert_allclose(dev, host, atol=1e-5, rtol=0)  # float32 rounding of order-10 logits
        assert lab.shape == image.shape[:2] and lab.dtype == np.int32
        top2 = np.sort(host, axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-5  # argmax ties within rounding may go either way
        np.testing.assert_array_equal(lab[clear], np.argmax(host, axis=-1)[clear])


def test_batched_equals_one_by_one_and_compiles_once_per_bucket(models):
    ref, forward, _ = models  # shared with the tests above: compilations accumulate over the module
    cfg = inference.InferenceConfig("whole", scale=None, bucket=32)
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(40, 64)), int(rng.integers(50, 96))) for _ in range(20)]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    seen_before, before = set(forward.shapes), forward.compilations
    batched = inference.segment_batch(forward, images, cfg)
    expected = inference.tile_shapes(sizes, cfg)
    assert expected == {(64, 96), (64, 64)}
    assert forward.compilations - before == len(expected - seen_before)
    assert expected <= set(forward.shapes)
    # Running again compiles nothing; an image alone gives the same as inside a batch.
    again = inference.segment_batch(forward, images[:5], cfg)
    for a, b in zip(batched[:5], again):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(batched[3], inference.segment(forward, images[3], cfg), atol=1e-6)
    # Over the whole module: every tile shape was compiled exactly once.
    assert len(forward.shapes) == len(set(forward.shapes)) == forward.compilations
