"""The TensorFlow-free folder pipeline (segformer_jax.data.python_pipeline) against tf.data's.

Its sampling and rounding are checked value for value against the tf.data transforms (TensorFlow
is the reference here); the shared behaviour (sharding, resume, crops, eval geometry) runs on both
pipelines in test_data.py. A training run on a folder dataset must never import TensorFlow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from segformer_jax.data import config as data_config
from segformer_jax.data import folder as folder_lib
from segformer_jax.data import input_pipeline as ip
from segformer_jax.data import pipelines
from segformer_jax.data import python_pipeline as pp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_folder(root, n_train=6, n_val=3, h=45, w=61, seed=0):
    """Textured images of odd sizes, masks of 4 classes in blocks with ignore pixels."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(root / split / "images", exist_ok=True)
        os.makedirs(root / split / "masks", exist_ok=True)
        for i in range(n):
            hh, ww = h + 7 * i, w - 5 * i
            image = rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8)
            mask = rng.integers(0, 4, (hh // 8 + 1, ww // 8 + 1), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:hh, :ww]
            mask[rng.random((hh, ww)) < 0.02] = 255
            PIL.Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            PIL.Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def folder_cfg(root, **kw):
    cfg = data_config.dataset_preset("folder")
    cfg.folder = str(root)
    cfg.num_classes = 4
    cfg.num_parallel_calls = 2
    cfg.threads = 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize(
    "h,w,nh,nw",
    [(37, 53, 71, 100), (360, 480, 180, 240), (360, 480, 517, 689), (50, 40, 23, 61), (13, 17, 5, 3), (9, 9, 9, 9)],
)
def test_resize_window_equals_tf_resize_then_slice(h, w, nh, nw):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 256, (h, w), dtype=np.uint8)
    tf_image, tf_label = (t.numpy() for t in ip._resize_pair(tf.constant(image), tf.constant(label), nh, nw))
    ours_image, ours_label = pp.resize_window(image, label, nh, nw)
    np.testing.assert_array_equal(ours_image, tf_image)  # same sampling, same rounding: bit for bit
    np.testing.assert_array_equal(ours_label, tf_label)
    y0, x0, wh, ww = nh // 3, nw // 4, max(nh // 2, 1), max(nw // 2, 1)
    win_image, win_label = pp.resize_window(image, label, nh, nw, (y0, x0, wh, ww))
    np.testing.assert_array_equal(win_image, tf_image[y0 : y0 + wh, x0 : x0 + ww])
    np.testing.assert_array_equal(win_label, tf_label[y0 : y0 + wh, x0 : x0 + ww])


def test_hsv_conversions_match_tf():
    rng = np.random.default_rng(0)
    rgb = np.concatenate(
        [rng.random((2000, 3)), rng.integers(0, 256, (2000, 3)) / 255.0, [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5]]]
    ).astype(np.float32)
    hsv = pp.rgb_to_hsv(rgb)
    np.testing.assert_allclose(hsv, tf.image.rgb_to_hsv(rgb).numpy(), atol=2e-7)
    np.testing.assert_allclose(pp.hsv_to_rgb(hsv), tf.image.hsv_to_rgb(hsv).numpy(), atol=2e-7)
    np.testing.assert_allclose(pp.hsv_to_rgb(hsv), rgb, atol=1e-6)


def test_rescale_size_matches_tf():
    for h, w, long, short in [(360, 480, 960, 720), (40, 60, 2048, 512), (513, 257, 1000.7, 333.3), (1, 5, 3, 1)]:
        expected = [int(t) for t in ip._rescale_size(h, w, long, short)]
        assert list(pp.rescale_size(h, w, long, short)) == expected


def test_eval_batches_equal_tf_data(tmp_path):
    """Resize to a scale, align to 32, pad, two hosts with padding examples: every array equal."""
    cfg = folder_cfg(photo_folder(tmp_path), eval_scale=(80, 60), eval_pad_size=(96, 96), eval_size_divisor=32)
    for process_index in (0, 1):
        kw = dict(process_index=process_index, process_count=2)
        ours, theirs = list(pp.make_eval_iterator(cfg, 1, **kw)), list(ip.make_eval_iterator(cfg, 1, **kw))
        assert len(ours) == len(theirs) == 2
        for a, b in zip(ours, theirs):
            assert sorted(a) == sorted(b)
            for key in a:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [bool(b["valid"][0]) for b in pp.make_eval_iterator(cfg, 1, process_index=1, process_count=2)] == [
        True,
        False,
    ]


def test_train_batches_deterministic_resumable_and_recipe_shaped(tmp_path):
    cfg = folder_cfg(photo_folder(tmp_path, n_train=5), crop_size=(32, 48), scale=None, cat_max_ratio=0.75)
    first = [next(it) for it in [pp.make_train_iterator(cfg, 2, seed=7)] for _ in range(6)]
    again = [next(it) for it in [pp.make_train_iterator(cfg, 2, seed=7)] for _ in range(6)]
    resumed = pp.make_train_iterator(cfg, 2, seed=7, start_step=4)  # across the epoch boundary (5 records)
    for k in (4, 5):
        batch = next(resumed)
        for key in ("image", "label"):
            np.testing.assert_array_equal(batch[key], first[k][key])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    other_seed = next(pp.make_train_iterator(cfg, 2, seed=8))
    assert not np.array_equal(other_seed["image"], first[0]["image"])
    batch = first[0]
    assert batch["image"].shape == (2, 32, 48, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 32, 48) and batch["label"].dtype == np.int32
    labels = np.concatenate([b["label"].ravel() for b in first])
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
    # Normalised with the ImageNet mean / std: padding is exactly 0, pixels span about +-2.
    pixels = np.concatenate([b["image"].reshape(-1, 3) for b in first])
    assert -2.2 < pixels.min() < -1.5 and 2.0 < pixels.max() < 2.7


def test_photometric_distortion_is_mmseg_and_deterministic():
    cfg = data_config.default_data_config()
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.float32)
    outs = [pp.photometric_distortion(image, np.random.default_rng([0, k]), cfg) for k in range(40)]
    again = pp.photometric_distortion(image, np.random.default_rng([0, 3]), cfg)
    np.testing.assert_array_equal(again, outs[3])
    for out in outs:
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, np.floor(out))  # integer-valued, as mmcv's uint8 steps
    changed = sum(not np.array_equal(out, image) for out in outs)
    assert 30 <= changed < 40  # each of four distortions applies with p = 1/2: (1/2)^4 of images are untouched


def test_pipeline_choice_and_errors(tmp_path):
    cfg = folder_cfg(tmp_path)
    assert jax.default_backend() == "cpu"
    assert data_config.pipeline_of(cfg) == "python"  # auto: folders on the CPU
    assert pipelines.pipeline_module(cfg) is pp
    cfg.pipeline = "tf"
    assert pipelines.pipeline_module(cfg) is ip
    cfg.pipeline = "python"
    assert pipelines.pipeline_module(cfg) is pp
    shapes = data_config.default_data_config()
    assert data_config.pipeline_of(shapes) == "tf"
    shapes.pipeline = "python"
    with pytest.raises(ValueError, match="folder datasets only.*data.pipeline='tf'"):
        data_config.pipeline_of(shapes)
    cfg.pipeline = "numpy"
    with pytest.raises(ValueError, match="choose one of auto, tf, python"):
        data_config.pipeline_of(cfg)


def test_unreadable_image_names_the_file(tmp_path):
    photo_folder(tmp_path, n_train=2)
    cfg = folder_cfg(tmp_path, crop_size=(16, 16))
    pp.get_dataset_info(cfg)  # scanned while the files were fine
    broken = tmp_path / "train" / "images" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])
    it = pp.make_train_iterator(cfg, 2, seed=0)
    with pytest.raises(folder_lib.FolderDatasetError, match=r"cannot read .*1\.png.*Fix or remove that pair"):
        next(it)


def test_train_label_counts_match_tf_source(tmp_path):
    from segformer_jax.training import losses

    cfg = folder_cfg(photo_folder(tmp_path), reduce_zero_label=True, num_classes=3, pipeline="python")
    ours = losses.class_pixel_counts(cfg, 3)
    cfg.pipeline = "tf"
    np.testing.assert_array_equal(ours, losses.class_pixel_counts(cfg, 3))
    assert ours.sum() > 0


def test_folder_training_run_never_imports_tensorflow(tmp_path):
    """train_and_evaluate on a folder dataset with data.pipeline='python' (2 steps, eval, final export)
    in a fresh process: TensorFlow is never imported (it would cost ~0.5 GB resident)."""
    photo_folder(tmp_path / "data", n_train=4, n_val=2)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from configs import folder
        from segformer_jax import training
        c = folder.get_config("b0")
        c.data.folder = {str(tmp_path / "data")!r}
        c.data.pipeline = "python"
        c.data.num_classes = 4
        c.data.crop_size = (32, 32)
        c.data.eval_scale = None
        c.data.eval_pad_size = (96, 96)
        c.model.overrides.update(
            hidden_sizes=(8, 16, 24, 32), num_attention_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), decoder_hidden_size=16
        )
        c.batch_size = 2
        c.total_steps = 2
        c.eval.every_steps = 0
        c.eval.batch_size = 2
        c.checkpoint.every_steps = 0
        c.progress_bar = False
        training.train_and_evaluate(c, {str(tmp_path / "work")!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "torch"))
        print("HEAVY", loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
    assert os.path.isdir(tmp_path / "work" / "final")
