"""data.name='hf': a Hugging Face `datasets` dataset the test builds and saves (save_to_disk and
parquet), read offline through the same recipe, order, resume and host sharding as the other sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets", reason="pip install -e '.[hf]'")

from segformer_jax.data import input_pipeline as ip  # noqa: E402
from segformer_jax.data import sources  # noqa: E402


def _rows(n, seed, size=(40, 48)):
    """Image i: all pixels 10*i (red channel), mask i: class (i % 3) everywhere, id 255 in one corner."""
    from PIL import Image

    rows = {"image": [], "mask": []}
    for i in range(n):
        h, w = size
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0] = 10 * (i + 1)
        mask = np.full((h, w), i % 3, np.uint8)
        mask[:2, :2] = 255
        rows["image"].append(Image.fromarray(img))
        rows["mask"].append(Image.fromarray(mask, mode="L"))
    return rows


def _features():
    return datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfds")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(_rows(10, 0), features=_features()),
            "validation": datasets.Dataset.from_dict(_rows(3, 1), features=_features()),
        }
    )
    dd.save_to_disk(str(root / "disk"))
    dd["train"].to_parquet(str(root / "train.parquet"))
    (root / "id2label.json").write_text(json.dumps({"0": "sky", "1": "road", "2": "car"}))
    return root


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ip.clear_source_cache()


def _cfg(path, **kw):
    c = ip.dataset_preset("hf")
    c.hf_path = str(path)
    c.hf_label_column = "mask"
    c.hf_id2label_file = ""
    c.num_classes = 3
    c.crop_size, c.scale, c.eval_scale, c.eval_pad_size = (32, 32), (48, 40), (48, 40), (48, 48)
    c.ratio_range, c.photometric, c.flip_prob, c.cat_max_ratio = None, False, 0.0, 1.0
    c.shuffle_buffer = 16
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _ids(batch):
    mean, std = ip.default_data_config().mean[0], ip.default_data_config().std[0]
    return [int(round((v * std + mean) / 10)) - 1 for v in batch["image"][:, 5, 5, 0]]


def test_info_batches_resume_and_host_shards(saved):
    cfg = _cfg(saved / "disk", hf_id2label_file=str(saved / "id2label.json"))
    info = ip.get_dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.class_names) == (10, 3, ["sky", "road", "car"])

    it = ip.make_train_iterator(cfg, 4, seed=7)
    run = [next(it) for _ in range(5)]  # crosses the epoch boundary (10 rows, 4 a batch)
    first_epoch = [i for b in run[:2] for i in _ids(b)] + _ids(run[2])[:2]
    assert sorted(first_epoch) == list(range(10))
    for b in run:  # labels travel with their images
        for i, lab in zip(_ids(b), b["label"]):
            assert (lab[lab != 255] == i % 3).all()
    for k in (1, 3):  # kill and resume: start_step=k gives batch k, bit for bit
        resumed = next(ip.make_train_iterator(cfg, 4, seed=7, start_step=k))
        for key in run[k]:
            np.testing.assert_array_equal(resumed[key], run[k][key])

    shards = []
    for p in range(2):
        host = ip.make_train_iterator(cfg, 4, seed=7, process_index=p, process_count=2)
        shards.append([i for _ in range(2) for i in _ids(next(host))])
    assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 8

    ev = list(ip.make_eval_iterator(cfg, 2))
    labels = np.concatenate([b["label"] for b in ev])[:3]
    assert [int(np.median(lab[lab != 255])) for lab in labels] == [0, 1, 2]


def test_parquet_file_and_reduce_zero_label(saved):
    cfg = _cfg(saved / "train.parquet", eval_split="train", reduce_zero_label=True, num_classes=2)
    info = ip.get_dataset_info(cfg)
    assert info.num_train_examples == 10 and info.class_names == ["class_0", "class_1"]
    b = next(ip.make_train_iterator(cfg, 4, seed=0))
    for i, lab in zip(_ids(b), b["label"]):
        assert set(np.unique(lab)) <= {255, (i % 3) - 1 if i % 3 else 255}


def test_class_names_from_class_label_features(tmp_path):
    feats = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.List(datasets.List(datasets.ClassLabel(names=["a", "b", "c"])))}
    )
    rows = _rows(4, 0, size=(32, 32))
    rows["mask"] = [np.asarray(m).astype(np.int64).clip(0, 2).tolist() for m in rows["mask"]]
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "d"))
    cfg = _cfg(tmp_path / "d", num_classes=0, eval_split="train")
    assert ip.get_dataset_info(cfg).class_names == ["a", "b", "c"]
    b = next(ip.make_train_iterator(cfg, 2, seed=0))
    assert b["label"].shape == (2, 32, 32)


def test_bad_datasets_say_what_is_wrong(saved, tmp_path):
    with pytest.raises(sources.HFDatasetError, match=r"no column\(s\) \['segmentation'\].*\['image', 'mask'\]"):
        ip.get_dataset_info(_cfg(saved / "disk", hf_label_column="segmentation"))
    with pytest.raises(sources.HFDatasetError, match="no split 'test'"):
        ip.get_dataset_info(_cfg(saved / "disk", train_split="test"))
    with pytest.raises(sources.HFDatasetError, match="needs data.hf_path"):
        ip.get_dataset_info(_cfg(""))

    rows = _rows(2, 0)
    small = {"image": rows["image"], "mask": [m.resize((10, 10)) for m in rows["mask"]]}
    datasets.Dataset.from_dict(small, features=_features()).save_to_disk(str(tmp_path / "size"))
    with pytest.raises(sources.HFDatasetError, match="label 'mask' is 10x10 but image 'image' is 40x48"):
        ip.get_dataset_info(_cfg(tmp_path / "size"))

    floats = {"image": rows["image"], "mask": [np.zeros((40, 48), np.float32).tolist() for _ in range(2)]}
    datasets.Dataset.from_dict(floats).save_to_disk(str(tmp_path / "float"))
    with pytest.raises(sources.HFDatasetError, match="must be an integer class-id mask"):
        ip.get_dataset_info(_cfg(tmp_path / "float"))
