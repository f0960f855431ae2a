"""Confusion matrix, mIoU / mAcc / aAcc (mmseg conventions), whole and sliding-window inference."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from segformer_jax.evaluation import metrics


def test_confusion_matrix_by_hand_with_ignore_and_out_of_range():
    labels = np.array([[0, 0, 1, 1], [2, 255, 1, 7]])  # 255 ignored, 7 outside [0, 3): not counted
    preds = np.array([[0, 1, 1, 1], [0, 2, 2, 0]])
    expected = np.array(
        [
            [1, 1, 0],  # gt 0: predicted 0 once, 1 once
            [0, 2, 1],  # gt 1: 1, 1, 2
            [1, 0, 0],
        ]
    )  # gt 2: 0
    got = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 3, 255))
    np.testing.assert_array_equal(got, expected)


def test_metrics_by_hand_absent_class_is_nan_and_excluded():
    # 4 classes: class 3 never appears (NaN, excluded); class 2 is predicted but absent from the GT
    # (IoU 0 since it has a union, Acc NaN).
    cm = np.array([[3, 1, 0, 0], [0, 4, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = metrics.segmentation_metrics(cm, ["a", "b", "c", "d"])
    iou_a, iou_b = 3 / (4 + 3 - 3), 4 / (6 + 5 - 4)
    assert r["per_class"]["a"]["IoU"] == pytest.approx(iou_a)
    assert r["per_class"]["b"]["IoU"] == pytest.approx(iou_b)
    assert r["per_class"]["c"]["IoU"] == 0.0 and math.isnan(r["per_class"]["c"]["Acc"])
    assert math.isnan(r["per_class"]["d"]["IoU"]) and math.isnan(r["per_class"]["d"]["Acc"])
    assert r["mIoU"] == pytest.approx((iou_a + iou_b + 0.0) / 3)
    assert r["mAcc"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert r["aAcc"] == pytest.approx(7 / 10)
    table = metrics.format_table(r)
    assert "nan" in table and "mIoU" in table


def test_accumulator_flushes_to_int64(monkeypatch):
    monkeypatch.setattr(metrics, "_FLUSH_PIXELS", 10)
    acc = metrics.ConfusionMatrixAccumulator(2)
    total = np.zeros((2, 2), np.int64)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        labels, preds = rng.integers(0, 2, (2, 3)), rng.integers(0, 2, (2, 3))
        batch_cm = metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 2)
        total += np.asarray(batch_cm)
        acc.add(batch_cm, labels.size)
    result = acc.result()
    assert result.dtype == np.int64
    np.testing.assert_array_equal(result, total)


def test_save_json_writes_nan_as_null(tmp_path):
    r = metrics.segmentation_metrics(np.array([[1, 0], [0, 0]]), ["x", "y"])
    metrics.save_json(r, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["per_class"]["y"]["IoU"] is None and loaded["mIoU"] == 1.0


def test_slide_windows_follow_mmseg():
    # Cityscapes: 1024x2048, crop 1024, stride 768 -> 1 row x 3 columns, last window moved back to the border.
    boxes = metrics.slide_windows(1024, 2048, (1024, 1024), (768, 768))
    assert boxes == [(0, 1024, 0, 1024), (0, 1024, 768, 1792), (0, 1024, 1024, 2048)]
    # An image smaller than the crop: a single window, the whole image.
    assert metrics.slide_windows(50, 40, (64, 64), (48, 48)) == [(0, 50, 0, 40)]


def test_slide_inference_averages_overlaps():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 20, 30, 3)).astype(np.float32))
    # A per-pixel "model" at full resolution: every window agrees with the whole image, so the average
    # of overlapping windows must give back exactly the whole-image result.
    out = metrics.predict(lambda x: x * 2.0, images, mode="slide", crop=(12, 12), stride=(8, 8), num_classes=3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(images) * 2.0, rtol=1e-6)
    # A window-dependent model: constant = number of the window's columns; the canvas holds the average.
    ones = metrics.predict(
        lambda x: jnp.full(x.shape[:3] + (1,), float(x.shape[2])),
        images,
        mode="slide",
        crop=(20, 16),
        stride=(20, 14),
        num_classes=1,
    )
    np.testing.assert_allclose(np.asarray(ones), 16.0)


def test_whole_inference_upsamples_logits_to_label_size():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 2)).astype(np.float32))
    out = metrics.predict(lambda x: logits, jnp.zeros((1, 16, 16, 3)), mode="whole")
    assert out.shape == (1, 16, 16, 2)
    import jax

    np.testing.assert_allclose(
        np.asarray(out), np.asarray(jax.image.resize(logits, (1, 16, 16, 2), "bilinear")), rtol=1e-5, atol=1e-6
    )
