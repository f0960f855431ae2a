"""Binary segmentation (one logit channel, HF num_labels=1): a folder dataset of 0 / 1 masks trains,
evaluates on background and foreground, and predicts 0 / 1 mask PNGs; bad binary input is refused
before training, naming the config field."""

import importlib.util
import os
import time

import numpy as np
import pytest
from PIL import Image

from segformer_jax import training
from segformer_jax.training import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_config(root, steps):
    spec = importlib.util.spec_from_file_location(
        "test_binary_folder_config", os.path.join(REPO, "configs", "folder.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("b0")
    config.model.overrides.update(recipes.TINY_ARCHITECTURE)
    config.model.binary = True
    config.model.drop_path_rate = 0.0
    config.model.classifier_dropout_prob = 0.0
    config.data.folder = str(root)
    config.data.crop_size = (64, 64)
    config.data.scale = (64, 64)
    config.data.ratio_range = (0.75, 1.5)
    config.data.eval_scale = (64, 64)
    config.data.eval_pad_size = (64, 64)
    config.total_steps = steps
    config.batch_size = 8
    config.loss.reduction = "valid"
    config.optimizer.learning_rate = 5e-3
    config.optimizer.head_lr_mult = 1.0
    config.optimizer.warmup_steps = 10
    config.eval.every_steps = 0
    config.eval.batch_size = 8
    config.eval.num_vis = 2
    config.checkpoint.every_steps = 0
    config.checkpoint.async_save = False
    config.log_every_steps = 10
    config.progress_bar = False
    return config


def _binary_folder(root, n_train=48, n_val=8, size=64, seed=0, foreground_value=1):
    """Noisy images with one or two bright-ish discs (the foreground), masks 0 / 1, a 255 border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            for _ in range(rng.integers(1, 3)):
                cy, cx, r = rng.integers(12, size - 12), rng.integers(12, size - 12), rng.integers(6, 14)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
            image = rng.normal(90, 30, (size, size, 3))
            image[mask == 1] += np.array([110.0, 40.0, -40.0])
            image = np.clip(image, 0, 255).astype(np.uint8)
            mask = np.where(mask == 1, foreground_value, 0).astype(np.uint8)
            mask[:2] = 255
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    (root / "class_names.txt").write_text("background\nforeground\n")
    return root


def _train_binary(tmp_path, steps):
    root = _binary_folder(tmp_path / "data")
    config = _folder_config(root, steps)
    t0 = time.time()
    results = training.train_and_evaluate(config, str(tmp_path / "run"))
    return results, time.time() - t0, root


def _check_run(results, tmp_path, root, min_iou):
    assert results["num_pixels"] == 8 * 62 * 64  # both classes counted, the 255 rows not
    assert set(results["per_class"]) == {"background", "foreground"}
    assert results["per_class"]["foreground"]["IoU"] >= min_iou, results["per_class"]
    assert results["per_class"]["background"]["IoU"] >= min_iou
    for key in ("mDice", "mFscore", "mPrecision", "mRecall"):
        assert 0.0 < results[key] <= 1.0
    import json

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if r["split"] == "eval"]
    assert evals and evals[-1]["mDice"] == pytest.approx(results["mDice"])
    saved = json.load(open(tmp_path / "run" / "eval_results.json"))
    assert saved["per_class"]["foreground"]["Fscore"] == pytest.approx(results["per_class"]["foreground"]["Fscore"])

    # predict: the exported model has one logit channel; mask PNGs hold 0 / 1 and agree with the masks.
    from segformer_jax import predict as predict_lib
    from segformer_jax.pretrained import from_pretrained

    final = tmp_path / "run" / "final"
    model, _ = from_pretrained(str(final))
    assert model.config.num_labels == 1
    val_images = root / "val" / "images"
    from segformer_jax import inference

    settings = inference.InferenceConfig(**inference.load_settings(str(final)))  # as evaluated: 64 px
    out = predict_lib.predict([str(val_images)], str(final), str(tmp_path / "pred"), progress=False, config=settings)
    assert not out.failed and len(out.written) == 8
    inter = union = 0
    for _, label_path, overlay_path in out.written:
        pred = np.asarray(Image.open(label_path))
        assert pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1}
        assert os.path.exists(overlay_path)
        truth = np.asarray(Image.open(root / "val" / "masks" / os.path.basename(label_path)))
        valid = truth != 255
        inter += np.sum((pred == 1) & (truth == 1) & valid)
        union += np.sum(((pred == 1) | (truth == 1)) & valid)
    assert inter / union >= min_iou - 0.02  # the eval's numbers, but for float ties
    # A threshold near 1 marks (almost) nothing as foreground.
    strict = predict_lib.predict(
        [str(val_images)], str(final), str(tmp_path / "strict"), progress=False, config=settings, threshold=0.999999
    )
    fg_strict = sum(np.sum(np.asarray(Image.open(p)) == 1) for _, p, _ in strict.written)
    fg_default = sum(np.sum(np.asarray(Image.open(p)) == 1) for _, p, _ in out.written)
    assert fg_strict < fg_default


@pytest.mark.slow
def test_binary_folder_trains_to_foreground_iou(tmp_path):
    results, seconds, root = _train_binary(tmp_path, steps=120)
    print(f"binary run: foreground IoU {results['per_class']['foreground']['IoU']:.4f} in {seconds:.1f}s")
    _check_run(results, tmp_path, root, min_iou=0.85)


def test_binary_folder_short_run(tmp_path):
    results, seconds, root = _train_binary(tmp_path, steps=40)
    print(f"short binary run: foreground IoU {results['per_class']['foreground']['IoU']:.4f} in {seconds:.1f}s")
    _check_run(results, tmp_path, root, min_iou=0.6)


def test_bad_binary_input_is_refused_before_training(tmp_path):
    # Masks saved for viewing (foreground 255 = ignore would train on background only) or with a 3rd class.
    root = _binary_folder(tmp_path / "data", n_train=3, n_val=1, foreground_value=2)
    config = _folder_config(root, 5)
    with pytest.raises(ValueError, match=r"model\.binary=True.*values \[2\]"):
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    # Three classes named: not a binary dataset.
    (root / "class_names.txt").write_text("a\nb\nc\n")
    for split in ("train", "val"):
        for p in (root / split / "masks").iterdir():
            Image.fromarray(np.minimum(np.asarray(Image.open(p)), 1).astype(np.uint8)).save(p)
    with pytest.raises(training.TrainingError, match=r"model\.binary=True.*2 classes"):
        training.train_and_evaluate(config, str(tmp_path / "run2"))
    # Loss config errors name the field, before anything trains.
    (root / "class_names.txt").write_text("background\nforeground\n")
    from segformer_jax.data import input_pipeline

    input_pipeline.clear_source_cache()  # the folder was scanned with the 3 names
    for field, value, match in (
        ("terms", (("cross_entropy", 1.0), ("tversky", 1.0)), "unknown loss 'tversky'"),
        ("class_weight", (1.0, 2.0, 3.0), "loss.class_weight has 3 entries"),
        ("ohem_min_kept", 64 * 64 + 1, "loss.ohem_min_kept"),
    ):
        bad = _folder_config(root, 5)
        bad.loss[field] = value
        if field == "ohem_min_kept":
            bad.loss.terms = (("ohem_cross_entropy", 1.0),)
        with pytest.raises(ValueError, match=match):
            training.train_and_evaluate(bad, str(tmp_path / f"bad_{field}"))
        assert not os.path.exists(tmp_path / f"bad_{field}" / "checkpoints")


def test_inverse_sqrt_frequency_from_the_training_masks(tmp_path):
    from segformer_jax.training import losses

    root = _binary_folder(tmp_path / "data", n_train=4, n_val=1)
    config = _folder_config(root, 5)
    counts = np.zeros(2, np.int64)
    for p in (root / "train" / "masks").iterdir():
        m = np.asarray(Image.open(p))
        counts += [np.sum(m == 0), np.sum(m == 1)]
    np.testing.assert_array_equal(losses.class_pixel_counts(config.data, 2), counts)
    w = losses.resolve_class_weight("inverse_sqrt_frequency", 2, config.data)
    f = counts / counts.sum()
    np.testing.assert_allclose(w, (1 / np.sqrt(f)) / np.sum(np.sqrt(f)), rtol=1e-6)
    # A class that occurs in no training mask: refused, named.
    for p in (root / "train" / "masks").iterdir():
        Image.fromarray(np.where(np.asarray(Image.open(p)) == 255, 255, 0).astype(np.uint8)).save(p)
    from segformer_jax.data import input_pipeline

    input_pipeline.clear_source_cache()
    with pytest.raises(ValueError, match=r"inverse_sqrt_frequency.*\(foreground\)|inverse_sqrt_frequency.*\(1\)"):
        losses.resolve_class_weight("inverse_sqrt_frequency", 2, config.data, ["background", "foreground"])
