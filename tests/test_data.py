"""Tests of segformer_jax.data: sources, label mappings, tf.data train/eval pipelines.

Everything runs on small data made here (tmp dirs) or under tfds.testing.mock_data;
nothing is downloaded or written outside tmp_path.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from segformer_jax.data import folder as folder_lib  # noqa: E402
from segformer_jax.data import input_pipeline as ip  # noqa: E402
from segformer_jax.data import python_pipeline as pp  # noqa: E402
from segformer_jax.data import (
    sources,  # noqa: E402
    synthetic_shapes,  # noqa: E402
)

MEAN = np.array(ip.IMAGENET_MEAN, np.float32)
STD = np.array(ip.IMAGENET_STD, np.float32)


def unnormalize(image):
    return image * STD + MEAN


def no_aug(cfg):
    """Turns every random training transform off (identity geometry/colours)."""
    cfg.ratio_range = None
    cfg.cat_max_ratio = 1.0
    cfg.flip_prob = 0.0
    cfg.photometric = False
    return cfg


# --------------------------------------------------------------------- fixtures

# Folder datasets run on both input pipelines: tf.data and the TensorFlow-free numpy one.
both_pipelines = pytest.mark.parametrize("pipe", [ip, pp], ids=["tf", "python"])


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    synthetic_shapes.ensure_prepared(data_dir, "small")
    return data_dir


def shapes_cfg(data_dir, **kw):
    cfg = ip.default_data_config()
    cfg.data_dir = data_dir
    cfg.tfds_config = "small"
    cfg.crop_size = (64, 64)
    cfg.scale = (64, 64)
    cfg.eval_scale = (64, 64)
    cfg.eval_pad_size = (64, 64)
    cfg.num_parallel_calls = 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array, mode=mode).save(path) if mode else PIL.Image.fromarray(array).save(path)


def folder_cfg(root, **kw):
    cfg = ip.default_data_config()
    cfg.name = "folder"
    cfg.folder = str(root)
    cfg.num_parallel_calls = 2
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make_id_folder(root, n=10, h=24, w=32):
    """Folder dataset where example i is a uniform image of colour (10*i, 7, 200) and a
    mask with class i % 3 (so examples are identifiable after the transforms)."""
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        img[...] = (10 * i, 7, 200)
        save_png(os.path.join(root, "images", f"im{i:02d}.png"), img)
        save_png(os.path.join(root, "masks", f"im{i:02d}.png"), np.full((h, w), i % 3, np.uint8))
    with open(os.path.join(root, "class_names.txt"), "w") as f:
        f.write("a\nb\nc\n")


def blob_mask(rng, h, w, num_classes):
    """Random piecewise-constant mask: a few big axis-aligned rectangles."""
    mask = np.zeros((h, w), np.uint8)
    for _ in range(6):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        y1, x1 = y0 + rng.integers(8, h // 2 + 8), x0 + rng.integers(8, w // 2 + 8)
        mask[y0:y1, x0:x1] = rng.integers(0, num_classes)
    return mask


# ------------------------------------------------------------ synthetic_shapes


def test_synthetic_generator_is_deterministic_and_varied():
    a_img, a_mask = synthetic_shapes.generate_example(np.random.default_rng([0, 0, 5]), 128)
    b_img, b_mask = synthetic_shapes.generate_example(np.random.default_rng([0, 0, 5]), 128)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_img.shape == (128, 128, 3) and a_img.dtype == np.uint8
    assert a_mask.shape == (128, 128) and a_mask.dtype == np.uint8
    counts = np.zeros(synthetic_shapes.NUM_CLASSES)
    colour_sums = np.zeros((synthetic_shapes.NUM_CLASSES, 3))
    for i in range(40):
        img, mask = synthetic_shapes.generate_example(np.random.default_rng([0, 0, i]), 128)
        assert mask.max() < synthetic_shapes.NUM_CLASSES
        for c in range(synthetic_shapes.NUM_CLASSES):
            sel = mask == c
            counts[c] += sel.sum()
            colour_sums[c] += img[sel].astype(np.float64).sum(0)
    # Every class appears with a real area (big shapes), background dominates.
    assert (counts[1:] > 40 * 128 * 128 * 0.01).all(), counts
    assert counts[0] == counts.max()
    # Each shape class has its own colour family: mean colours are far apart.
    means = colour_sums / counts[:, None]
    for i in range(1, synthetic_shapes.NUM_CLASSES):
        for j in range(i + 1, synthetic_shapes.NUM_CLASSES):
            assert np.abs(means[i] - means[j]).max() > 40, (i, j, means)
    assert np.argmax(means[1]) == 0  # circle: red
    assert np.argmax(means[2]) == 1  # square: green
    assert np.argmax(means[3]) == 2  # triangle: blue


def test_synthetic_tfds_builder(shapes_dir):
    builder = tfds.builder("synthetic_shapes/small", data_dir=shapes_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["validation"].num_examples == 16
    # The stored examples are exactly the generator's (seed 0, split 1 = validation).
    stored = sorted(
        hashlib.sha1(ex["image"].tobytes() + ex["segmentation_mask"].tobytes()).hexdigest()
        for ex in tfds.as_numpy(builder.as_dataset(split="validation"))
    )
    expected = []
    for i in range(16):
        img, mask = synthetic_shapes.generate_example(np.random.default_rng([0, 1, i]), 64)
        expected.append(hashlib.sha1(img.tobytes() + mask[..., None].tobytes()).hexdigest())
    assert stored == sorted(expected)
    # ensure_prepared on a prepared dir is a no-op returning the builder.
    assert synthetic_shapes.ensure_prepared(shapes_dir, "small").is_prepared()


def test_dataset_info_synthetic(shapes_dir):
    info = ip.get_dataset_info(shapes_cfg(shapes_dir))
    assert info.num_classes == 6
    assert info.class_names == ["background", "circle", "square", "triangle", "ring", "stripes"]
    assert info.palette.shape == (6, 3) and info.palette.dtype == np.uint8
    assert len({tuple(c) for c in info.palette}) == 6
    assert (info.num_train_examples, info.num_eval_examples) == (64, 16)


# ------------------------------------------------------------ train pipeline


def test_train_batches_values_determinism_and_resume(shapes_dir):
    cfg = shapes_cfg(shapes_dir)
    it = ip.make_train_iterator(cfg, 16, seed=3)
    batches = [next(it) for _ in range(6)]  # > 1 epoch (64 examples = 4 batches)
    b = batches[0]
    assert b["image"].shape == (16, 64, 64, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (16, 64, 64) and b["label"].dtype == np.int32
    labels = np.concatenate([x["label"].ravel() for x in batches])
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4, 5, 255}
    assert len(set(np.unique(labels)) - {255}) == 6
    raw = unnormalize(np.stack([x["image"] for x in batches]))
    lab = np.stack([x["label"] for x in batches])
    # Real pixels are 0..255 integers after un-normalising (mmseg uint8 semantics).
    real = raw[lab != 255]
    assert real.min() > -0.01 and real.max() < 255.01
    np.testing.assert_allclose(real, np.round(real), atol=2e-3)
    # Some crops were padded (ratio < 1): padded image pixels are exactly 0 after
    # normalisation and their label is 255.
    padded = np.all(np.stack([x["image"] for x in batches]) == 0.0, axis=-1)
    assert padded.sum() > 0
    assert (lab[padded] == 255).all()
    assert not np.array_equal(batches[0]["image"], batches[1]["image"])

    # Same seed -> identical batches; resume at step k -> batch k (here past an epoch).
    it2 = ip.make_train_iterator(cfg, 16, seed=3)
    for k in range(2):
        x = next(it2)
        np.testing.assert_array_equal(x["image"], batches[k]["image"])
        np.testing.assert_array_equal(x["label"], batches[k]["label"])
    it3 = ip.make_train_iterator(cfg, 16, seed=3, start_step=5)
    x = next(it3)
    np.testing.assert_array_equal(x["image"], batches[5]["image"])
    np.testing.assert_array_equal(x["label"], batches[5]["label"])
    # Another seed -> other data.
    y = next(ip.make_train_iterator(cfg, 16, seed=4))
    assert not np.array_equal(y["image"], batches[0]["image"])


def test_train_epochs_cover_dataset_and_hosts_are_disjoint(shapes_dir):
    # Without augmentation a training label is the stored mask: identify examples by it.
    cfg = no_aug(shapes_cfg(shapes_dir))
    builder = tfds.builder("synthetic_shapes/small", data_dir=shapes_dir)
    all_ids = {
        hashlib.sha1(ex["segmentation_mask"][..., 0].astype(np.int32).tobytes()).hexdigest()
        for ex in tfds.as_numpy(builder.as_dataset(split="train"))
    }
    assert len(all_ids) == 64

    def ids_of(it, steps):
        out = []
        for _ in range(steps):
            for lab in next(it)["label"]:
                out.append(hashlib.sha1(lab.astype(np.int32).tobytes()).hexdigest())
        return out

    # One host: an epoch (8 steps of 8) is a permutation of the split; epochs differ.
    one = ids_of(ip.make_train_iterator(cfg, 8, seed=0), 16)
    assert sorted(one[:64]) == sorted(all_ids) and sorted(one[64:]) == sorted(all_ids)
    assert one[:64] != one[64:]
    # Two hosts, global batch 8 -> 4 each: disjoint halves that together cover the data.
    h0 = ids_of(ip.make_train_iterator(cfg, 8, seed=0, process_index=0, process_count=2), 8)
    h1 = ids_of(ip.make_train_iterator(cfg, 8, seed=0, process_index=1, process_count=2), 8)
    assert len(set(h0)) == 32 and len(set(h1)) == 32
    assert not set(h0) & set(h1)
    assert set(h0) | set(h1) == all_ids
    with pytest.raises(ValueError, match="divisible"):
        ip.make_train_iterator(cfg, 7, seed=0, process_index=0, process_count=2)


@both_pipelines
def test_folder_sharding_disjoint_and_resume(tmp_path, pipe):
    make_id_folder(tmp_path, n=10)
    cfg = no_aug(folder_cfg(tmp_path, val_fraction=0.2, crop_size=(24, 32), scale=(32, 24)))
    info = pipe.get_dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples) == (8, 2)
    assert info.class_names == ["a", "b", "c"]

    def ids(batch):
        return [int(round(v / 10)) for v in unnormalize(batch["image"])[:, 0, 0, 0]]

    seen = []
    for p in range(2):
        it = pipe.make_train_iterator(cfg, 4, seed=1, process_index=p, process_count=2)
        seen.append([i for _ in range(2) for i in ids(next(it))])
    assert len(set(seen[0])) == 4 and len(set(seen[1])) == 4
    assert not set(seen[0]) & set(seen[1])
    train_ids = set(seen[0]) | set(seen[1])
    assert len(train_ids) == 8
    # Labels travel with their images: image i has label i % 3 everywhere.
    b = next(pipe.make_train_iterator(cfg, 4, seed=1))
    for i, lab in zip(ids(b), b["label"]):
        assert (lab == i % 3).all()
    # Resume at step 3 == the 4th batch of a fresh run.
    it = pipe.make_train_iterator(cfg, 4, seed=1)
    fourth = [next(it) for _ in range(4)][3]
    resumed = next(pipe.make_train_iterator(cfg, 4, seed=1, start_step=3))
    np.testing.assert_array_equal(resumed["image"], fourth["image"])


@both_pipelines
def test_augmentation_keeps_image_and_mask_aligned(tmp_path, pipe):
    # Class k is painted in a pure primary colour (red, green, blue). Every photometric
    # distortion of mmseg keeps that channel dominant, so after the train transforms
    # the argmax channel must equal the label wherever the label is locally constant.
    rng = np.random.default_rng(0)
    primaries = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    for i in range(6):
        h, w = (72, 96) if i % 2 else (96, 72)
        mask = blob_mask(rng, h, w, 3)
        save_png(str(tmp_path / "images" / f"x{i}.png"), primaries[mask])
        save_png(str(tmp_path / "masks" / f"x{i}.png"), mask)
    cfg = folder_cfg(
        tmp_path, val_fraction=0.0, num_classes=3, crop_size=(64, 64), scale=(96, 72), ratio_range=(0.5, 2.0)
    )
    it = pipe.make_train_iterator(cfg, 6, seed=0)
    checked = 0
    n_padded = 0
    n_flat = 0
    for _ in range(4):
        b = next(it)
        img, lab = b["image"], b["label"]
        pad = np.all(img == 0.0, axis=-1)
        n_padded += pad.sum()
        assert (lab[pad] == 255).all()
        real = lab != 255
        assert (real | pad).all()  # the only ignore pixels are padding here
        # Interior pixels: the 3x3 neighbourhood has a single label.
        lp = np.pad(lab, ((0, 0), (1, 1), (1, 1)), mode="edge")
        same = np.ones_like(real)
        for dy in range(3):
            for dx in range(3):
                same &= lp[:, dy : dy + lab.shape[1], dx : dx + lab.shape[2]] == lab
        interior = real & same
        pred = np.argmax(unnormalize(img), axis=-1)
        np.testing.assert_array_equal(pred[interior], lab[interior])
        checked += interior.sum()
        # Photometric distortion really changed colours (not always pure primaries).
        n_flat += (np.abs(unnormalize(img)[interior] - primaries[lab[interior]]) > 1).any(-1).sum()
    assert checked > 4 * 6 * 64 * 64 * 0.3
    assert n_padded > 0
    assert n_flat > 0


@both_pipelines
def test_random_crop_respects_cat_max_ratio(tmp_path, pipe):
    # 128x128 masks: class 0 everywhere, a 48x48 square of class 1 and a 16x16 square of
    # class 2. Crops are 64x64, no resize: many positions break cat_max_ratio=0.75.
    rng = np.random.default_rng(1)
    for i in range(8):
        mask = np.zeros((128, 128), np.uint8)
        y, x = rng.integers(0, 80, size=2)
        mask[y : y + 48, x : x + 48] = 1
        y, x = rng.integers(0, 112, size=2)
        mask[y : y + 16, x : x + 16] = 2
        save_png(str(tmp_path / "images" / f"m{i}.png"), np.stack([mask * 100] * 3, -1).astype(np.uint8))
        save_png(str(tmp_path / "masks" / f"m{i}.png"), mask)

    def max_ratios(cat_max_ratio):
        cfg = no_aug(folder_cfg(tmp_path, val_fraction=0.0, num_classes=3, crop_size=(64, 64), scale=(128, 128)))
        cfg.cat_max_ratio = cat_max_ratio
        it = pipe.make_train_iterator(cfg, 8, seed=0)
        out = []
        for _ in range(4):
            for lab in next(it)["label"]:
                counts = np.bincount(lab[lab != 255].ravel(), minlength=3)
                out.append((counts.max() / counts.sum(), (counts > 0).sum()))
        return out

    with_ratio = max_ratios(0.75)
    assert all(r < 0.75 and k > 1 for r, k in with_ratio), with_ratio
    plain = max_ratios(1.0)
    assert sum(r >= 0.75 or k <= 1 for r, k in plain) >= 5, plain


def test_train_transform_resize_scale_follows_mmseg():
    # ratio fixed to 1: a 60x40 (w x h) image with scale (2048, 512) -> factor
    # min(2048/60, 512/40) = 12.8 -> 768x512; crop 512x512 takes the whole height.
    cfg = no_aug(ip.default_data_config())
    cfg.scale = (2048, 512)
    cfg.crop_size = (600, 800)
    image = tf.zeros([40, 60, 3], tf.uint8)
    label = tf.ones([40, 60], tf.uint8)
    out = ip.train_transform(image, label, tf.constant([0, 0], tf.int64), cfg)
    lab = out["label"].numpy()
    assert lab.shape == (600, 800)
    assert (lab[:512, :768] == 1).all()
    assert (lab[512:] == 255).all() and (lab[:, 768:] == 255).all()
    # scale=None: the ratio applies to the image's own size (40x60 * 2 -> 80x120).
    cfg.scale = None
    cfg.ratio_range = (2.0, 2.0)
    cfg.crop_size = (100, 150)
    lab = ip.train_transform(image, label, tf.constant([0, 0], tf.int64), cfg)["label"].numpy()
    assert (lab[:80, :120] == 1).all() and (lab[80:] == 255).all() and (lab[:, 120:] == 255).all()


# ------------------------------------------------------------ eval pipeline


@both_pipelines
def test_eval_iterator_geometry_padding_and_valid(tmp_path, pipe):
    # Two train and three val images of different sizes; masks: left half 1, right half 2.
    for split, sizes in (("train", [(40, 60), (50, 50)]), ("val", [(40, 60), (60, 30), (64, 64)])):
        for i, (h, w) in enumerate(sizes):
            img = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = np.ones((h, w), np.uint8)
            mask[:, w // 2 :] = 2
            save_png(str(tmp_path / split / "images" / f"{i}.jpg"), img)
            save_png(str(tmp_path / split / "masks" / f"{i}.png"), mask)
    cfg = folder_cfg(tmp_path, num_classes=3, eval_scale=(64, 64), eval_pad_size=(72, 80))
    ev = pipe.make_eval_iterator(cfg, 2)
    assert len(ev) == 2
    batches = list(ev)
    assert len(batches) == 2 and list(ev)  # re-iterable
    img = np.concatenate([b["image"] for b in batches])
    lab = np.concatenate([b["label"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    size = np.concatenate([b["image_size"] for b in batches])
    assert img.shape == (4, 72, 80, 3) and lab.shape == (4, 72, 80) and lab.dtype == np.int32
    assert valid.tolist() == [True, True, True, False]
    # keep-ratio resize to (64, 64): 40x60 -> 43x64, 60x30 -> 64x32, 64x64 -> 64x64.
    assert size[:3].tolist() == [[43, 64], [64, 32], [64, 64]]
    for k in range(3):
        h, w = size[k]
        assert (lab[k, h:] == 255).all() and (lab[k, :, w:] == 255).all()
        assert (img[k, h:] == 0).all() and (img[k, :, w:] == 0).all()
        assert (lab[k, :h, : w // 2 - 1] == 1).all() and (lab[k, :h, w // 2 + 1 : w] == 2).all()
    assert (lab[3] == 255).all() and (img[3] == 0).all()
    # Sharded eval: 3 examples on 2 hosts -> both yield the same number of batches,
    # 2 + 1 valid examples, disjoint.
    ev0 = list(pipe.make_eval_iterator(cfg, 1, process_index=0, process_count=2))
    ev1 = list(pipe.make_eval_iterator(cfg, 1, process_index=1, process_count=2))
    assert len(ev0) == len(ev1) == 2
    assert [b["valid"][0] for b in ev0] == [True, True]
    assert [b["valid"][0] for b in ev1] == [True, False]
    np.testing.assert_array_equal(ev1[0]["image_size"][0], size[1])


@both_pipelines
def test_eval_without_resize_returns_original_pixels(tmp_path, pipe):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (20, 30), dtype=np.uint8)
    mask[0, :5] = 255
    for split in ("train", "val"):
        save_png(str(tmp_path / split / "images" / "a.png"), img)
        save_png(str(tmp_path / split / "masks" / "a.png"), mask)
    cfg = folder_cfg(tmp_path, eval_scale=None, eval_pad_size=None)
    (b,) = list(pipe.make_eval_iterator(cfg, 1))
    np.testing.assert_allclose(unnormalize(b["image"][0]), img, atol=1e-3)
    np.testing.assert_array_equal(b["label"][0], mask)
    assert pipe.get_dataset_info(cfg).num_classes == 4


# ------------------------------------------------------------ TFDS sources (mocked)


def _ade_expected(raw):
    raw = raw.astype(np.int32)
    out = raw - 1
    out[raw == 0] = 255
    out[raw == 255] = 255
    out[out >= 150] = 255  # ids outside the 150 classes are ignored
    return out


_CITYSCAPES_TRAIN_IDS = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def _cityscapes_expected(raw):
    out = np.full(raw.shape, 255, np.int32)
    for k, v in _CITYSCAPES_TRAIN_IDS.items():
        out[raw == k] = v
    return out


def _pet_expected(raw, boundary_as_ignore=False):
    out = np.full(raw.shape, 255, np.int32)
    out[raw == 1] = 0
    out[raw == 2] = 1
    out[raw == 3] = 255 if boundary_as_ignore else 2
    return out


def _consistent_mock(image_key, label_key, store, num_examples=2, label_values=None):
    """A `tfds.testing.mock_data` as_dataset_fn: TFDS's random fake examples, with the
    label resized to the image's shape (the default mock draws their sizes apart).
    The raw numpy examples are appended to ``store`` for the expected values. With
    ``label_values`` the label pixels are drawn from those values instead of 0..255."""
    from tensorflow_datasets.testing import mocking  # pylint: disable=import-outside-toplevel

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del split, read_config, shuffle_files
        features = self.info.features
        encoded = []
        store.clear()
        for ex in mocking.RandomFakeGenerator(features, num_examples=num_examples):
            h, w = ex[image_key].shape[:2]
            lab = ex[label_key]
            # Big (Cityscapes-sized) images: 16x16 blocks, so PNG coding stays fast.
            block = 16 if h * w > 100_000 else 1
            rows, cols = np.arange(h) // block, np.arange(w) // block
            ex[image_key] = ex[image_key][rows][:, cols]
            ex[label_key] = lab[rows % lab.shape[0]][:, cols % lab.shape[1]]
            if label_values is not None:
                pick = np.random.default_rng(len(store)).integers(0, len(label_values), lab.shape)
                ex[label_key] = np.asarray(label_values, np.uint8)[pick][rows % lab.shape[0]][:, cols % lab.shape[1]]
            for key, feature in features.items():
                if isinstance(feature, tfds.features.BBoxFeature):  # random boxes are invalid
                    ex[key] = tfds.features.BBox(ymin=0.1, xmin=0.2, ymax=0.5, xmax=0.6)
            enc = features.encode_example(ex)
            store.append((ex, enc[image_key]))
            encoded.append(enc)
        specs = features.get_serialized_info()
        ds = tf.data.Dataset.from_generator(
            lambda: iter(encoded),
            output_signature=tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.tf_dtype), specs),
        )
        return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))

    return as_dataset


@pytest.mark.parametrize(
    "name,image_key,label_key,expected_fn,num_classes,extra,n",
    [
        ("scene_parse150", "image", "annotation", _ade_expected, 150, {}, 2),
        ("cityscapes", "image_left", "segmentation_label", _cityscapes_expected, 19, {}, 1),
        ("oxford_iiit_pet", "image", "segmentation_mask", _pet_expected, 3, {}, 2),
        (
            "oxford_iiit_pet",
            "image",
            "segmentation_mask",
            lambda r: _pet_expected(r, True),
            2,
            {"pet_boundary_as_ignore": True},
            2,
        ),
    ],
)
def test_tfds_sources_label_mapping_under_mock(
    tmp_path, name, image_key, label_key, expected_fn, num_classes, extra, n
):
    # Mock labels are random 0..255 (pets: the trimap values and a few others), so
    # every id, incl. 0 and 255, goes through the mapping.
    raw = []
    values = [0, 1, 2, 3, 4, 255] if name == "oxford_iiit_pet" else None
    mock = _consistent_mock(image_key, label_key, raw, num_examples=n, label_values=values)
    with tfds.testing.mock_data(num_examples=n, as_dataset_fn=mock):
        cfg = ip.dataset_preset(name)
        cfg.data_dir = str(tmp_path)
        cfg.eval_scale = None
        cfg.eval_pad_size = None
        cfg.eval_size_divisor = 0  # the ids as stored, at the stored size
        for k, v in extra.items():
            setattr(cfg, k, v)
        info = ip.get_dataset_info(cfg)
        assert info.num_classes == num_classes == len(info.class_names)
        assert info.palette.shape == (num_classes, 3)
        assert info.num_eval_examples == n
        batches = list(ip.make_eval_iterator(cfg, 1))
    assert len(batches) == n and len(raw) == n
    for (ex, encoded_image), b in zip(raw, batches):
        np.testing.assert_array_equal(b["label"][0], expected_fn(ex[label_key][..., 0]))
        image = tf.io.decode_image(encoded_image, channels=3).numpy()  # jpeg for ADE/pets
        np.testing.assert_allclose(unnormalize(b["image"][0]), image, atol=1e-3)
    labels = np.concatenate([b["label"].ravel() for b in batches])
    assert labels.max() == 255 and labels.min() == 0
    present = set(np.unique(labels).tolist()) - {255}
    assert present <= set(range(num_classes))
    if num_classes < 50:  # all classes occur in the random labels
        assert present == set(range(num_classes))


def test_mapping_spot_values():
    ade = sources.reduce_zero_label(tf.constant([0, 1, 2, 150, 254, 255], tf.uint8)).numpy()
    assert ade.tolist() == [255, 0, 1, 149, 253, 255]
    city = sources.cityscapes_label_map(tf.constant([0, 7, 26, 33, 34, 255], tf.uint8)).numpy()
    assert city.tolist() == [255, 0, 13, 18, 255, 255]
    pet = sources.pet_label_map(tf.constant([0, 1, 2, 3, 4], tf.uint8)).numpy()
    assert pet.tolist() == [255, 0, 1, 2, 255]


def test_train_pipeline_under_mock_ade(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        cfg = ip.dataset_preset("scene_parse150")
        cfg.data_dir = str(tmp_path)
        cfg.crop_size = (32, 32)
        cfg.scale = (64, 32)
        cfg.num_parallel_calls = 2
        b = next(ip.make_train_iterator(cfg, 4, seed=0))
    assert b["image"].shape == (4, 32, 32, 3) and b["label"].shape == (4, 32, 32)
    assert set(np.unique(b["label"])) <= set(range(150)) | {255}
    assert b["label"].min() == 0 and b["label"].max() == 255


def test_missing_tfds_data_gives_instructions(tmp_path):
    ip.clear_source_cache()
    cfg = ip.dataset_preset("oxford_iiit_pet")
    cfg.data_dir = str(tmp_path / "empty")
    with pytest.raises(sources.DataNotFoundError) as e:
        ip.get_dataset_info(cfg)
    msg = str(e.value)
    assert "oxford_iiit_pet" in msg and "tfds build oxford_iiit_pet" in msg
    assert str(tmp_path / "empty") in msg
    cfg.name = "cityscapes"
    with pytest.raises(sources.DataNotFoundError, match="gtFine_trainvaltest.zip") as e:
        ip.make_eval_iterator(cfg, 1)
    assert "downloads/manual" in str(e.value)
    cfg.name = "scene_parse150"
    with pytest.raises(sources.DataNotFoundError, match="tfds build scene_parse150"):
        ip.make_train_iterator(cfg, 2, seed=0)


# ------------------------------------------------------------ folder: bad input


def test_folder_image_without_mask(tmp_path):
    make_id_folder(tmp_path, n=3)
    save_png(str(tmp_path / "images" / "orphan.jpg"), np.zeros((8, 8, 3), np.uint8))
    save_png(str(tmp_path / "images" / "orphan2.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(folder_lib.FolderDatasetError) as e:
        ip.get_dataset_info(folder_cfg(tmp_path))
    msg = str(e.value)
    assert "2 image(s)" in msg and "orphan.jpg" in msg and "orphan2.png" in msg
    assert str(tmp_path / "masks") in msg


def test_folder_mask_that_is_not_png(tmp_path):
    make_id_folder(tmp_path, n=3)
    os.remove(tmp_path / "masks" / "im01.png")
    PIL.Image.fromarray(np.ones((24, 32), np.uint8)).save(tmp_path / "masks" / "im01.jpg")
    with pytest.raises(folder_lib.FolderDatasetError, match=r"1 mask\(s\) .* are not PNG: im01.jpg"):
        ip.get_dataset_info(folder_cfg(tmp_path))


def test_folder_class_count_inferred_from_masks_is_checked(tmp_path, caplog):
    make_id_folder(tmp_path, n=6)  # ids 0, 1, 2
    os.remove(tmp_path / "class_names.txt")
    assert ip.get_dataset_info(folder_cfg(tmp_path)).num_classes == 3
    stray = np.zeros((24, 32), np.uint8)
    stray[0, 0] = 4  # one stray pixel: 5 classes, id 3 in no mask
    save_png(str(tmp_path / "masks" / "im00.png"), stray)
    ip.clear_source_cache()  # sources are cached per config
    with caplog.at_level(logging.WARNING, logger="segformer_jax"):
        assert ip.get_dataset_info(folder_cfg(tmp_path)).num_classes == 5
    assert "5 classes, but 1 of them occur in no mask (ids 3)" in caplog.text
    # Masks scaled for viewing (ids x 85): 171 "classes", 168 never seen: refused.
    for i in range(6):
        save_png(str(tmp_path / "masks" / f"im{i:02d}.png"), np.full((24, 32), 85 * (i % 3), np.uint8))
    ip.clear_source_cache()
    with pytest.raises(folder_lib.FolderDatasetError, match="171 classes, but 168 of them occur in no mask"):
        ip.get_dataset_info(folder_cfg(tmp_path))
    cfg = folder_cfg(tmp_path, num_classes=171)  # stated explicitly: accepted as it is
    assert ip.get_dataset_info(cfg).num_classes == 171


@both_pipelines
def test_folder_mask_ids_out_of_range(tmp_path, pipe):
    make_id_folder(tmp_path, n=3)  # class_names.txt: 3 classes
    bad = np.zeros((24, 32), np.uint8)
    bad[0, 0], bad[1, 1], bad[2, 2] = 7, 9, 255
    save_png(str(tmp_path / "masks" / "im01.png"), bad)
    with pytest.raises(folder_lib.FolderDatasetError) as e:
        pipe.get_dataset_info(folder_cfg(tmp_path))
    msg = str(e.value)
    assert "im01.png" in msg and "[7, 9]" in msg and "num_classes=3" in msg
    # With reduce_zero_label, raw ids 1..num_classes are valid (ADE20K style).
    ok = np.full((24, 32), 3, np.uint8)
    save_png(str(tmp_path / "masks" / "im01.png"), ok)
    cfg = folder_cfg(tmp_path, reduce_zero_label=True, eval_scale=None, eval_pad_size=(24, 32))
    assert pipe.get_dataset_info(cfg).num_classes == 3
    labels = np.concatenate([b["label"] for b in pipe.make_eval_iterator(cfg, 1)])
    assert set(np.unique(labels)) <= {2, 255}  # raw 3 -> 2, raw 0 -> 255


def test_folder_errors_missing_empty_mismatch(tmp_path):
    with pytest.raises(folder_lib.FolderDatasetError, match="does not exist"):
        ip.get_dataset_info(folder_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(folder_lib.FolderDatasetError, match="is empty"):
        ip.get_dataset_info(folder_cfg(tmp_path / "empty"))
    (tmp_path / "e2" / "images").mkdir(parents=True)
    (tmp_path / "e2" / "masks").mkdir(parents=True)
    with pytest.raises(folder_lib.FolderDatasetError, match="Empty images folder"):
        ip.get_dataset_info(folder_cfg(tmp_path / "e2"))
    root = tmp_path / "mm"
    make_id_folder(root, n=2)
    save_png(str(root / "masks" / "im00.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(folder_lib.FolderDatasetError) as e:
        ip.get_dataset_info(folder_cfg(root))
    assert "size mismatch" in str(e.value) and "im00.png is 32x24" in str(e.value)
    root = tmp_path / "nomask"
    (root / "images").mkdir(parents=True)
    save_png(str(root / "images" / "a.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(folder_lib.FolderDatasetError, match="Missing masks folder"):
        ip.get_dataset_info(folder_cfg(root))
    rgb_mask_root = tmp_path / "rgbmask"
    make_id_folder(rgb_mask_root, n=2)
    colour = np.zeros((24, 32, 3), np.uint8)
    colour[..., 0] = 1
    save_png(str(rgb_mask_root / "masks" / "im00.png"), colour)
    with pytest.raises(folder_lib.FolderDatasetError, match="colour"):
        ip.get_dataset_info(folder_cfg(rgb_mask_root))


@both_pipelines
def test_folder_grayscale_rgba_palette_converted(tmp_path, pipe):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    rgba = rng.integers(0, 256, (16, 20, 4), dtype=np.uint8)
    pal_idx = rng.integers(0, 3, (16, 20), dtype=np.uint8)
    palette = [10, 20, 30, 200, 100, 0, 0, 50, 250] + [0] * (256 * 3 - 9)
    pal_img = PIL.Image.fromarray(pal_idx, mode="P")
    pal_img.putpalette(palette)
    # Palette *mask*: class id = palette index (VOC style).
    pal_mask = PIL.Image.fromarray(pal_idx, mode="P")
    pal_mask.putpalette(palette)
    for split in ("train", "val"):
        d = tmp_path / split
        save_png(str(d / "images" / "g.png"), gray)
        save_png(str(d / "images" / "r.png"), rgba)
        os.makedirs(d / "masks", exist_ok=True)
        pal_img.save(str(d / "images" / "p.png"))
        for stem in "gpr":
            pal_mask.save(str(d / "masks" / f"{stem}.png"))
    cfg = folder_cfg(tmp_path, eval_scale=None, eval_pad_size=(16, 20))
    assert pipe.get_dataset_info(cfg).num_classes == 3
    out = {}
    for b, stem in zip(pipe.make_eval_iterator(cfg, 1), "gpr"):  # sorted stems
        out[stem] = (np.round(unnormalize(b["image"][0])).astype(np.int32), b["label"][0])
    np.testing.assert_array_equal(out["g"][0], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(out["r"][0], rgba[..., :3])  # alpha dropped
    np.testing.assert_array_equal(out["p"][0], np.array(palette[:9]).reshape(3, 3)[pal_idx])
    for stem in "gpr":
        np.testing.assert_array_equal(out[stem][1], pal_idx)
    # Direct loader checks as well.
    assert folder_lib.load_image(str(tmp_path / "train" / "images" / "g.png")).shape == (16, 20, 3)


def test_folder_fraction_split_is_deterministic(tmp_path):
    make_id_folder(tmp_path, n=10)
    a = folder_lib.scan_folder(str(tmp_path), val_fraction=0.3, split_seed=0)
    b = folder_lib.scan_folder(str(tmp_path), val_fraction=0.3, split_seed=0)
    c = folder_lib.scan_folder(str(tmp_path), val_fraction=0.3, split_seed=1)
    assert a == b
    assert len(a.train) == 7 and len(a.val) == 3
    assert not set(a.train.image_paths) & set(a.val.image_paths)
    assert [os.path.basename(p)[:-4] for p in a.val.image_paths] == [os.path.basename(p)[:-4] for p in a.val.mask_paths]
    assert a.val != c.val or a.train != c.train
    assert a.class_names == ("a", "b", "c")
    names = tmp_path / "names.txt"
    names.write_text("x\ny\nz\nw\n")
    d = folder_lib.scan_folder(str(tmp_path), class_names_file=str(names))
    assert d.class_names == ("x", "y", "z", "w")


def test_eval_transform_shrinks_to_fit_pad_size():
    # eval_scale (64, 64) makes a 20x40 image 32x64; it does not fit (16, 24): shrink
    # keeping the ratio by min(16/32, 24/64) = 0.375 -> 12x24, then pad to 16x24.
    cfg = ip.default_data_config()
    cfg.eval_scale = (64, 64)
    cfg.eval_pad_size = (16, 24)
    label = np.zeros((20, 40), np.uint8)
    label[:, 20:] = 1
    out = ip.eval_transform(tf.zeros([20, 40, 3], tf.uint8), tf.constant(label), cfg)
    assert out["image_size"].numpy().tolist() == [12, 24]
    lab = out["label"].numpy()
    assert lab.shape == (16, 24)
    assert (lab[:12, :12] == 0).all() and (lab[:12, 12:] == 1).all() and (lab[12:] == 255).all()


def test_eval_size_divisor_aligns_the_resized_size():
    # NVlabs AlignedResize: keep-ratio (64, 64) makes 20x40 -> 32x64, then 40x60 -> 43x64 is
    # rounded up to 48x64 (divisor 16); the label follows with nearest.
    cfg = ip.default_data_config()
    cfg.eval_scale = (64, 64)
    cfg.eval_pad_size = (64, 64)
    cfg.eval_size_divisor = 16
    label = np.zeros((40, 60), np.uint8)
    label[:, 30:] = 1
    out = ip.eval_transform(tf.zeros([40, 60, 3], tf.uint8), tf.constant(label), cfg)
    assert out["image_size"].numpy().tolist() == [48, 64]
    lab = out["label"].numpy()
    assert (lab[:48, :32] == 0).all() and (lab[:48, 32:] == 1).all() and (lab[48:] == 255).all()
    cfg.eval_pad_size = (72, 64)
    with pytest.raises(ValueError, match="not a multiple of eval_size_divisor=16"):
        ip.make_eval_dataset(cfg, 1)


def test_original_eval_dataset_yields_examples_as_stored_per_host(tmp_path):
    sizes = [(40, 60), (60, 30), (33, 47)]
    rng = np.random.default_rng(3)
    images, masks = [], []
    for split in ("train", "val"):
        for i, (h, w) in enumerate(sizes):
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            masks.append(rng.integers(0, 3, (h, w), dtype=np.uint8))
            masks[-1][0, :3] = 255
            save_png(str(tmp_path / split / "images" / f"{i}.png"), images[-1])
            save_png(str(tmp_path / split / "masks" / f"{i}.png"), masks[-1])
    cfg = folder_cfg(tmp_path, num_classes=3, eval_scale=(64, 64), eval_pad_size=(64, 64))
    ds, n = ip.make_original_eval_dataset(cfg)
    examples = list(ds.as_numpy_iterator())
    assert n == 3 and len(examples) == 3
    for k, ex in enumerate(examples):  # as stored: neither resized nor normalised nor padded
        np.testing.assert_array_equal(ex["image"], images[3 + k])
        np.testing.assert_array_equal(ex["label"], masks[3 + k])
    shards = [ip.make_original_eval_dataset(cfg, process_index=i, process_count=2) for i in range(2)]
    assert [s[1] for s in shards] == [2, 1]
    firsts = [[ex["label"].shape for ex in s[0].as_numpy_iterator()] for s in shards]
    assert firsts == [[(40, 60), (33, 47)], [(60, 30)]]
