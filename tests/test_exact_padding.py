"""Padding never changes an answer: the training-time eval (fixed-shape batches) and `predict`
(bucketed tiles) give, for images whose sizes are not multiples of 32, what transformers computes on
each unpadded image. The references run the HF model image by image, torch `F.interpolate` and
transformers' own post-processing; nothing of segformer_jax's resizing is used.

The weights make every branch matter (initializer_range 0.3, perturbed norms, logits of order 10),
and each test also checks that the old padded form misses the reference, so it can fail."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import segformer_jax as sj
from segformer_jax import inference
from segformer_jax.evaluation import metrics
from segformer_jax.pretrained import variable_shapes
from segformer_jax.training import make_eval_step
from weights_convert.convert import torch_state_to_flax

F = torch.nn.functional
TINY = dict(
    hidden_sizes=(8, 16, 24, 32),
    depths=(1, 1, 1, 1),
    num_attention_heads=(1, 1, 1, 2),
    decoder_hidden_size=16,
    num_labels=5,
)
SIZES = [(97, 131), (33, 250), (64, 80), (120, 37)]
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


@pytest.fixture(scope="module")
def hf_and_flax():
    """transformers' weights at initializer_range 0.3, perturbed norms, logits of order 10 (under
    reference.pipeline_reference's weights the padded eval misses less often on these images)."""
    torch.manual_seed(0)
    ref = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(**TINY, initializer_range=0.3)
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
        ref.decode_head.batch_norm.running_var.uniform_(0.5, 1.5, generator=g)
        peak = ref(torch.from_numpy(_normalised(_image(64, 64, 0)))[None].permute(0, 3, 1, 2)).logits.abs().max()
        ref.decode_head.classifier.weight.mul_(10 / peak)
        ref.decode_head.classifier.bias.mul_(10 / peak)
    model = sj.SegformerForSemanticSegmentation(sj.SegformerConfig(**TINY))
    state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    variables, _ = torch_state_to_flax(state, variable_shapes(model))
    return ref, model, jax.tree_util.tree_map(np.asarray, variables)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx[..., None] / 6.0 + np.arange(3)) * np.cos(yy[..., None] / 4.0 + seed)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _normalised(image):
    return ((image.astype(np.float32) - MEAN) / STD).astype(np.float32)


@torch.no_grad()
def _hf_labels(ref, image):
    """transformers' own pipeline at the image's size: SegformerImageProcessor without resizing,
    the model, post_process_semantic_segmentation (bilinear to the target size, argmax)."""
    processor = transformers.SegformerImageProcessorPil(do_resize=False)  # the one without torchvision
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    outputs = ref(pixel_values=pixels)
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0].numpy(), outputs


@torch.no_grad()
def _hf_upsampled_logits(ref, normalised):
    x = torch.from_numpy(normalised).permute(2, 0, 1)[None]
    logits = ref(x).logits
    return F.interpolate(logits, size=normalised.shape[:2], mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def _confusion(labels, preds, k):
    valid = labels != 255
    return np.bincount(labels[valid] * k + preds[valid], minlength=k * k).reshape(k, k)


def test_training_eval_on_fixed_shape_batches_equals_per_image_transformers(hf_and_flax):
    """The eval step's confusion matrix (images padded to 128x256, labels padded with 255) equals the one
    of transformers run on each unpadded image, so the mIoU recorded during training is exact."""
    ref, model, variables = hf_and_flax
    k, pad = TINY["num_labels"], (128, 256)
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    rng = np.random.default_rng(5)
    labels = [rng.integers(0, k, size=img.shape[:2]).astype(np.int32) for img in images]
    batch = {
        "image": np.zeros((len(images), *pad, 3), np.float32),
        "label": np.full((len(images), *pad), 255, np.int32),
        "valid": np.ones((len(images),), bool),
        "image_size": np.asarray(SIZES, np.int32),
    }
    want = np.zeros((k, k), np.int64)
    for i, (img, lab) in enumerate(zip(images, labels)):
        h, w = img.shape[:2]
        batch["image"][i, :h, :w] = _normalised(img)
        batch["label"][i, :h, :w] = lab
        logits = _hf_upsampled_logits(ref, _normalised(img)).numpy()
        assert np.abs(logits).max() > 3  # order-10 logits: padding would matter
        want += _confusion(lab, logits.argmax(-1), k)

    # A filler example, as the last eval batch has (valid False, size 0): scored nowhere, computed finitely.
    batch = {key: np.concatenate([v, np.zeros_like(v[:1])]) for key, v in batch.items()}
    batch["label"][-1] = 255
    config = ml_collections.ConfigDict({"eval": {"mode": "whole", "crop_size": None, "stride": None}})
    eval_step = jax.jit(make_eval_step(model, config, k))
    matrix, preds = eval_step(variables, batch)
    np.testing.assert_array_equal(np.asarray(matrix), want)
    for i, (h, w) in enumerate(SIZES):
        assert np.all(np.asarray(preds)[i, :h, :w] >= 0)
    assert np.all(np.asarray(preds)[-1] >= 0)

    # The padded form (what the eval computed before: no image sizes) is visibly off.
    padded, _ = eval_step(variables, {key: v for key, v in batch.items() if key != "image_size"})
    assert np.abs(np.asarray(padded) - want).sum() > 0.05 * want.sum()
    assert metrics.segmentation_metrics(np.asarray(matrix))["mIoU"] == pytest.approx(
        metrics.segmentation_metrics(want)["mIoU"], abs=0
    )


def test_predict_end_to_end_equals_transformers_pipeline_and_compiles_once_per_bucket(hf_and_flax, tmp_path):
    """`predict` (default bucket 32, whole image at its own size) on mixed-size photos writes the labels
    of transformers' own pipeline, pixel for pixel; the logits agree to 1e-4. Counted with JAX's own
    backend-compile events: one network compile per bucket, none on a rerun."""
    from jax import monitoring

    from segformer_jax import predict as P

    ref, model, variables = hf_and_flax
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = SIZES + [(100, 140), (90, 129)]  # the last two share 97x131's 128x160 bucket
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_image(h, w, seed=10 + i)).save(folder / f"img{i}.png")
    cfg = inference.InferenceConfig("whole", scale=None)  # bucket 32: the default
    assert cfg.bucket == 32
    buckets = inference.tile_shapes(sizes, cfg)

    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if event == monitoring_event else None
    monitoring_event = "/jax/core/compile/backend_compile_duration"
    monitoring.register_event_duration_secs_listener(listener)
    try:
        forward = inference.TiledForward.from_model(model, variables, batch_size=2)
        result = P.predict([str(folder)], model, tmp_path / "out", forward=forward, config=cfg, progress=False)
        first = len(compiles)
        again = P.predict([str(folder)], model, tmp_path / "out2", forward=forward, config=cfg, progress=False)
        second = len(compiles) - first
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert not result.failed and not again.failed
    assert forward.compilations == len(buckets) < len(sizes)
    assert first >= len(buckets) and second == 0  # network + device assembly programs, all cached

    logits_by_image = inference.segment_batch(
        forward, [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)], cfg
    )
    for i, (h, w) in enumerate(sizes):
        image = _image(h, w, seed=10 + i)
        want_labels, outputs = _hf_labels(ref, image)
        got = np.asarray(Image.open(tmp_path / "out" / f"img{i}.png"))
        assert got.shape == (h, w)
        # Identical except where transformers' own top two logits are within the 1e-4 logit tolerance
        # (a tie either side may break): 1 pixel in ~30,000 here.
        hf_logits = F.interpolate(outputs.logits, size=(h, w), mode="bilinear", align_corners=False)[0]
        top2 = np.sort(hf_logits.permute(1, 2, 0).numpy(), axis=-1)[..., -2:]
        clear = top2[..., 1] - top2[..., 0] > 1e-4
        assert clear.mean() > 0.999
        np.testing.assert_array_equal(got[clear], want_labels[clear])
        want_logits = _hf_upsampled_logits(ref, _normalised(image)).numpy()
        assert np.abs(logits_by_image[i] - want_logits).max() < 1e-4
    assert os.path.isfile(tmp_path / "out" / "img0_overlay.png")


def test_a_model_directory_carries_its_preprocessing(hf_and_flax, tmp_path):
    """save_pretrained(format='hf') writes transformers' preprocessor_config.json (the image at its own
    size, ImageNet normalisation), transformers reads it, and predict takes its defaults from it; a
    processor that resizes to a fixed size is followed too (measured against transformers' pipeline)."""
    from segformer_jax import predict as P
    from segformer_jax.pretrained import read_preprocessor_config, save_pretrained

    ref, model, variables = hf_and_flax
    out = save_pretrained(model, variables, tmp_path / "hf", format="hf")
    processor = transformers.SegformerImageProcessorPil.from_pretrained(out)
    assert processor.do_resize is False and np.allclose(processor.image_mean, [0.485, 0.456, 0.406])
    settings = inference.load_settings(out)
    assert settings["mode"] == "whole" and settings["scale"] is None and "size" not in settings
    np.testing.assert_allclose(settings["mean"], MEAN, rtol=1e-6)
    np.testing.assert_allclose(settings["std"], STD, rtol=1e-6)
    again = save_pretrained(
        model, variables, tmp_path / "again", format="hf", preprocessor=read_preprocessor_config(out)
    )
    assert read_preprocessor_config(again) == read_preprocessor_config(out)

    # A processor resizing to 64x96: predict's defaults follow it.
    hf_dir = tmp_path / "resizing"
    ref.save_pretrained(hf_dir)
    transformers.SegformerImageProcessorPil(do_resize=True, size={"height": 64, "width": 96}).save_pretrained(hf_dir)
    settings = inference.load_settings(hf_dir)
    assert settings["size"] == (64, 96) and settings["scale"] is None
    image = _image(150, 170, seed=3)
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert (
        P.main(["--model", str(hf_dir), "--output", str(tmp_path / "pred"), "--quiet", str(tmp_path / "photo.png")])
        == 0
    )
    got = np.asarray(Image.open(tmp_path / "pred" / "photo.png"))
    processor = transformers.SegformerImageProcessorPil.from_pretrained(hf_dir)
    with torch.no_grad():
        outputs = ref(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])
    want = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0].numpy()
    # Not bit-exact by construction: transformers resizes the uint8 image with PIL (antialiased, rounded
    # to uint8) and the logits in one step; predict resizes float pixels (torch's bilinear) and the
    # logits via the resized size. Without the processor's size (the old default, 2048x512) far less agrees.
    agreement = np.mean(got == want)
    assert agreement > 0.9, agreement
    print(f"agreement with transformers' resizing pipeline: {agreement:.4f}")
