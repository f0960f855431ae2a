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


def test_dice_fscore_precision_recall_by_hand():
    # gt rows, pred columns. Class 2 is predicted but absent (Precision 0, Recall NaN, Fscore NaN,
    # Dice 0); class 3 never appears (all NaN); class 1 is in the GT but never predicted (Precision NaN).
    cm = np.array([[6, 2, 2, 0], [3, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    r = metrics.segmentation_metrics(cm, ["a", "b", "c", "d"])
    a, b, c, d = (r["per_class"][n] for n in "abcd")
    # a: TP 6, GT 10, Pred 9
    assert a["Dice"] == 2 * 6 / 19 and a["Precision"] == 6 / 9 and a["Recall"] == 6 / 10
    assert a["Fscore"] == pytest.approx(2 * (6 / 9) * (6 / 10) / (6 / 9 + 6 / 10), rel=1e-15)
    # b: TP 0, GT 4, Pred 2
    assert b["Dice"] == 0.0 and b["Precision"] == 0.0 and b["Recall"] == 0.0 and math.isnan(b["Fscore"])
    # c: TP 0, GT 0, Pred 3
    assert c["Dice"] == 0.0 and c["Precision"] == 0.0 and math.isnan(c["Recall"]) and math.isnan(c["Fscore"])
    assert all(math.isnan(d[m]) for m in ("Dice", "Fscore", "Precision", "Recall"))
    assert r["mDice"] == pytest.approx((12 / 19 + 0 + 0) / 3, rel=1e-15)
    assert r["mPrecision"] == pytest.approx((6 / 9 + 0 + 0) / 3, rel=1e-15)
    assert r["mRecall"] == pytest.approx((6 / 10 + 0) / 2, rel=1e-15) and r["mRecall"] == r["mAcc"]
    assert r["mFscore"] == pytest.approx(a["Fscore"], rel=1e-15)
    table = metrics.format_table(r)
    for word in ("Dice", "Fscore", "Precision", "Recall", "mDice", "mFscore"):
        assert word in table
    assert "63.16" in table  # a's Dice in percent


def test_metrics_against_sklearn_style_numpy_reference():
    # A random matrix: the per-class formulas written out from the label / prediction vectors.
    rng = np.random.default_rng(3)
    labels, preds = rng.integers(0, 5, 4000), rng.integers(0, 5, 4000)
    preds[preds == 4] = 0
    preds[labels == 4] = 4  # class 4 perfect
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 5))
    r = metrics.segmentation_metrics(cm)
    for c in range(5):
        tp = np.sum((labels == c) & (preds == c))
        fp = np.sum((labels != c) & (preds == c))
        fn = np.sum((labels == c) & (preds != c))
        row = r["per_class"][str(c)]
        assert row["IoU"] == tp / (tp + fp + fn)
        assert row["Dice"] == 2 * tp / (2 * tp + fp + fn)
        assert row["Precision"] == tp / (tp + fp) and row["Recall"] == tp / (tp + fn)
        p, q = tp / (tp + fp), tp / (tp + fn)
        assert row["Fscore"] == pytest.approx(2 * p * q / (p + q), rel=1e-15)
    assert r["per_class"]["4"]["Dice"] == 1.0


def test_binary_confusion_matrix_is_two_classes():
    # A binary model's prediction (logit > 0) against 0 / 1 / 255 labels: background and foreground IoU.
    labels = np.array([[0, 0, 1, 1, 255], [1, 0, 1, 0, 1]])
    logits = np.array([[-1.0, 2.0, 3.0, -0.5, 9.0], [0.1, -2.0, 4.0, -3.0, -0.1]])
    cm = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(logits > 0), 2))
    np.testing.assert_array_equal(cm, [[3, 1], [2, 3]])
    r = metrics.segmentation_metrics(cm, ["background", "foreground"])
    assert r["per_class"]["foreground"]["IoU"] == 3 / 6 and r["per_class"]["background"]["IoU"] == 3 / 6
