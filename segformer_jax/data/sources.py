"""Dataset sources: where examples come from and how labels map to train ids.

A source yields, per split, a tf.data.Dataset of cheap *records* in a fixed,
deterministic order (encoded image/label bytes for TFDS, file paths for a folder),
and a graph function ``decode(record) -> (image uint8 [H, W, 3], label uint8 [H, W])``
where the label already holds train ids in 0..num_classes-1 and 255 = ignore.
Decoding is separate from reading so the input pipeline can shuffle, skip (resume)
and shard records without decoding them.

Sources (``data_config.name``):

``synthetic_shapes``
    Built-in TFDS dataset (:mod:`segformer_jax.data.synthetic_shapes`), generated
    into ``data_dir`` on first use (no download). Splits ``train`` / ``validation``.
    6 classes: background, circle, square, triangle, ring, stripes.
``scene_parse150`` (ADE20K, 150 classes)
    TFDS ``scene_parse150``: splits ``train`` (20,210) / ``test`` (2,000: the ADE20K
    validation images). Label = channel 0 (R) of the annotation PNG. With
    ``reduce_zero_label`` (default for this dataset, as mmseg): 0 -> 255, k -> k-1,
    255 stays 255; ids that are still >= 150 become 255 (all TFDS sources map ids
    outside 0..num_classes-1 to 255). Note: TFDS builds this dataset from the 2017 challenge archive
    ``annotations_instance``; if your copy holds the ADEChallengeData2016 semantic
    PNGs instead, point a ``folder`` source at them (``reduce_zero_label=True``).
``cityscapes`` (19 classes)
    TFDS ``cityscapes/semantic_segmentation`` (fine annotations, ``*_labelIds``):
    splits ``train`` (2,975) / ``validation`` (500). Label ids are mapped to the 19
    train ids of the Cityscapes benchmark (``CITYSCAPES_ID_TO_TRAIN_ID``), every
    other id to 255.
``oxford_iiit_pet`` (3 classes)
    TFDS ``oxford_iiit_pet`` ``segmentation_mask`` trimap: 1 (pet) -> 0 ``pet``,
    2 (background) -> 1 ``background``, 3 (border / not classified) -> 2
    ``boundary``; anything else -> 255. With ``pet_boundary_as_ignore`` the border
    becomes 255 and there are 2 classes (pet, background). Splits ``train`` (3,680)
    / ``test`` (3,669).
``folder``
    A user's images/ + masks/ folder (:mod:`segformer_jax.data.folder`).
``hf``
    A Hugging Face ``datasets`` dataset: ``hf_path`` is a Hub id, a ``save_to_disk``
    directory, a local data folder (imagefolder, parquet files) or a ``.parquet`` file;
    ``hf_image_column`` / ``hf_label_column`` (default ``image`` / ``label``) hold the
    image and its integer class-id mask of the same size (an L / P image or a 2-D
    integer array); class names from ``hf_id2label_file`` (id2label.json or one name a
    line), else a ClassLabel feature of the label column, else ``num_classes``. Splits
    ``train`` / ``validation`` unless ``train_split`` / ``eval_split``. Records are row
    indices, so shuffling, resuming and per-host sharding are those of the other sources.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from segformer_jax.data import folder as folder_lib
from segformer_jax.data import palettes, synthetic_shapes
from segformer_jax.data.config import DEFAULT_REDUCE_ZERO_LABEL, IGNORE_INDEX


class DataNotFoundError(FileNotFoundError):
    """The requested dataset is not prepared; the message says how to prepare it."""


ADE20K_CLASS_NAMES = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)
assert len(ADE20K_CLASS_NAMES) == 150

CITYSCAPES_CLASS_NAMES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
# Cityscapes label id -> train id (labelIds PNG values; all other ids -> 255).
CITYSCAPES_ID_TO_TRAIN_ID = {
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
CITYSCAPES_PALETTE = np.array(
    [
        [128, 64, 128],
        [244, 35, 232],
        [70, 70, 70],
        [102, 102, 156],
        [190, 153, 153],
        [153, 153, 153],
        [250, 170, 30],
        [220, 220, 0],
        [107, 142, 35],
        [152, 251, 152],
        [70, 130, 180],
        [220, 20, 60],
        [255, 0, 0],
        [0, 0, 142],
        [0, 0, 70],
        [0, 60, 100],
        [0, 80, 100],
        [0, 0, 230],
        [119, 11, 32],
    ],
    dtype=np.uint8,
)

PET_CLASS_NAMES = ("pet", "background", "boundary")
PET_PALETTE = np.array([[200, 60, 60], [40, 40, 40], [240, 240, 240]], dtype=np.uint8)


def make_palette(num_classes: int) -> np.ndarray:
    """The colours `segformer_jax.predict` uses by default for this many classes (ADE20K's for 150,
    Cityscapes' for 19, generated otherwise), so that training's eval images and predict's overlays
    agree."""
    return palettes.get_palette("auto", num_classes)


def reduce_zero_label(label: tf.Tensor) -> tf.Tensor:
    """mmseg's reduce_zero_label on a uint8 label: 0 -> 255, k -> k-1, 255 -> 255."""
    label = tf.cast(label, tf.int32)
    out = tf.where(label == 0, IGNORE_INDEX, label - 1)
    out = tf.where(label == IGNORE_INDEX, IGNORE_INDEX, out)
    return tf.cast(out, tf.uint8)


def _lookup(table: np.ndarray) -> Callable[[tf.Tensor], tf.Tensor]:
    table = tf.constant(np.asarray(table, np.uint8))

    def fn(label):
        return tf.gather(table, tf.cast(label, tf.int32))

    return fn


def cityscapes_label_map(label: tf.Tensor) -> tf.Tensor:
    table = np.full(256, IGNORE_INDEX, np.uint8)
    for k, v in CITYSCAPES_ID_TO_TRAIN_ID.items():
        table[k] = v
    return _lookup(table)(label)


def pet_label_map(label: tf.Tensor, boundary_as_ignore: bool = False) -> tf.Tensor:
    table = np.full(256, IGNORE_INDEX, np.uint8)
    table[1], table[2] = 0, 1
    table[3] = IGNORE_INDEX if boundary_as_ignore else 2
    return _lookup(table)(label)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_label_png(encoded: tf.Tensor) -> tf.Tensor:
    """First channel of a (grayscale or RGB) PNG as uint8 [H, W]."""
    label = tf.io.decode_png(encoded, channels=0, dtype=tf.uint8)
    return label[:, :, 0]


@dataclasses.dataclass
class Source:
    """A dataset: its classes, splits, records and decoder (see module doc)."""

    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray
    train_split: str
    eval_split: str
    # records(split) -> tf.data.Dataset of records, deterministic order.
    records: Callable[[str], tf.data.Dataset]
    # decode(record) -> (image uint8 [H,W,3], label uint8 [H,W] train ids / 255).
    decode: Callable[[dict], tuple[tf.Tensor, tf.Tensor]]
    # num_examples(split) -> int
    num_examples: Callable[[str], int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- TFDS

_PREPARE_HINTS = {
    "scene_parse150": (
        "Prepare it once on a machine with network access (about 1 GB download):\n"
        "  tfds build scene_parse150 --data_dir {data_dir}\n"
        "or in Python: tfds.builder('scene_parse150', data_dir='{data_dir}')"
        ".download_and_prepare()\n"
        "then copy {data_dir}/scene_parse150 to this machine's data_dir."
    ),
    "cityscapes": (
        "Cityscapes needs a manual download (registration): get "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
        "https://www.cityscapes-dataset.com/downloads/, put them in "
        "{data_dir}/downloads/manual/ and run:\n"
        "  tfds build cityscapes/semantic_segmentation --data_dir {data_dir} "
        "--manual_dir {data_dir}/downloads/manual"
    ),
    "oxford_iiit_pet": (
        "Prepare it once on a machine with network access (about 800 MB download):\n"
        "  tfds build oxford_iiit_pet --data_dir {data_dir}\n"
        "then copy {data_dir}/oxford_iiit_pet to this machine's data_dir."
    ),
}


def _default_data_dir(data_dir: str | None) -> str:
    if data_dir:
        return os.path.expanduser(str(data_dir))
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")))


def _tfds_source(
    *,
    name: str,
    builder_name: str,
    data_dir: str | None,
    image_key: str,
    label_key: str,
    train_split: str,
    eval_split: str,
    class_names,
    palette,
    label_map: Callable[[tf.Tensor], tf.Tensor],
) -> Source:
    data_dir = _default_data_dir(data_dir)
    dataset = builder_name.split("/")[0]

    def not_found(err: Exception) -> DataNotFoundError:
        hint = _PREPARE_HINTS.get(dataset, "Prepare it with `tfds build {name}`.")
        return DataNotFoundError(
            f"TFDS dataset {builder_name!r} is not prepared in data_dir {data_dir!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).\n"
            + hint.format(data_dir=data_dir, name=builder_name)
        )

    def builder():
        try:
            return tfds.builder(builder_name, data_dir=data_dir)
        except Exception as e:  # pylint: disable=broad-except
            raise not_found(e) from None

    def records(split: str) -> tf.data.Dataset:
        b = builder()
        try:
            ds = b.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={image_key: tfds.decode.SkipDecoding(), label_key: tfds.decode.SkipDecoding()},
            )
        except AssertionError as e:  # TFDS: "could not find data in ..."
            raise not_found(e) from None
        except (FileNotFoundError, tf.errors.NotFoundError) as e:
            raise not_found(e) from None
        return ds.map(
            lambda ex: {"image": ex[image_key], "label": ex[label_key]},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    num_classes = len(class_names)

    def decode(record):
        image = decode_image(record["image"])
        label = label_map(decode_label_png(record["label"]))
        # Ids the dataset should not contain (>= num_classes) are ignored, never trained on.
        label = tf.where(label >= num_classes, tf.constant(IGNORE_INDEX, tf.uint8), label)
        return image, label

    def num_examples(split: str) -> int:
        b = builder()
        try:
            n = b.info.splits[split].num_examples
            if n:
                return int(n)
        except Exception:  # pylint: disable=broad-except
            pass  # unknown split sizes (not prepared, or under tfds.testing.mock_data)
        n = int(records(split).cardinality().numpy())
        if n < 0:
            n = int(records(split).reduce(0, lambda c, _: c + 1).numpy())
        return n

    return Source(
        name=name,
        class_names=tuple(class_names),
        palette=np.asarray(palette, np.uint8),
        train_split=train_split,
        eval_split=eval_split,
        records=records,
        decode=decode,
        num_examples=num_examples,
    )


# --------------------------------------------------------------------------- folder


def _folder_source(cfg, rzl: bool) -> Source:
    if not cfg.get("folder"):
        raise folder_lib.FolderDatasetError(
            "data.name='folder' needs data.folder: the path of a folder holding images/ "
            "and masks/ (see segformer_jax/data/folder.py)."
        )
    fd = folder_lib.scan_folder(
        cfg.folder,
        val_fraction=float(cfg.get("val_fraction", 0.1)),
        split_seed=int(cfg.get("split_seed", 0)),
        class_names_file=cfg.get("class_names_file", "") or "",
        num_classes=int(cfg.get("num_classes", 0) or 0),
        reduce_zero_label=rzl,
    )
    splits = {"train": fd.train, "val": fd.val, "validation": fd.val}

    def get_split(split: str) -> folder_lib.FolderSplit:
        if split not in splits:
            raise ValueError(f"Folder datasets have splits 'train' and 'val', not {split!r}.")
        return splits[split]

    def records(split: str) -> tf.data.Dataset:
        s = get_split(split)
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": list(s.image_paths) or tf.zeros([0], tf.string),
                "label": list(s.mask_paths) or tf.zeros([0], tf.string),
            }
        )

    def _load(image_path, mask_path):
        image = folder_lib.load_image(image_path.decode())
        mask = folder_lib.load_mask(mask_path.decode())
        return image, mask

    def decode(record):
        image, label = tf.numpy_function(
            _load, [record["image"], record["label"]], [tf.uint8, tf.uint8], stateful=False
        )
        image = tf.ensure_shape(image, [None, None, 3])
        label = tf.ensure_shape(label, [None, None])
        if rzl:
            label = reduce_zero_label(label)
        return image, label

    return Source(
        name="folder",
        class_names=fd.class_names,
        palette=make_palette(fd.num_classes),
        train_split="train",
        eval_split="val",
        records=records,
        decode=decode,
        num_examples=lambda split: len(get_split(split)),
    )


# --------------------------------------------------------------------- Hugging Face datasets


class HFDatasetError(ValueError):
    """A Hugging Face dataset that cannot feed segmentation training (columns, labels, splits)."""


def _load_hf_split(path: str, name: str, split: str):
    """One split of a Hub id, a save_to_disk directory, a local data folder (imagefolder, parquet...)
    or a .parquet file, as a datasets.Dataset (memory-mapped Arrow; rows decoded on access)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("data.name='hf' needs the datasets package: pip install -e '.[hf]'") from None
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded) and (
        os.path.isfile(os.path.join(expanded, "dataset_dict.json"))
        or os.path.isfile(os.path.join(expanded, "state.json"))
    ):
        loaded = datasets.load_from_disk(expanded)
    elif os.path.isfile(expanded) and expanded.endswith(".parquet"):
        loaded = datasets.load_dataset("parquet", data_files={"train": expanded})
    else:
        try:
            loaded = datasets.load_dataset(expanded if os.path.exists(expanded) else path, name or None)
        except FileNotFoundError as e:
            raise DataNotFoundError(
                f"data.hf_path={path!r}: not a local dataset (save_to_disk directory, data folder, .parquet file) "
                f"and not loadable as a Hugging Face Hub dataset ({e}); offline (HF_HUB_OFFLINE=1 / "
                "HF_DATASETS_OFFLINE=1) only cached datasets load"
            ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if split not in loaded:
        raise HFDatasetError(f"data.hf_path={path!r} has no split {split!r}; it has {sorted(loaded)}")
    return loaded[split]


def _class_label_names(feature):
    """Names of a ClassLabel feature, also nested (Sequence / List of ClassLabel masks)."""
    while feature is not None:
        if hasattr(feature, "names") and getattr(feature, "names", None):
            return tuple(feature.names)
        feature = getattr(feature, "feature", None)
    return None


def _read_id2label_file(path: str) -> tuple[str, ...]:
    import json

    with open(os.path.expanduser(path)) as f:
        text = f.read()
    if path.endswith(".json"):
        table = {int(k): str(v) for k, v in json.loads(text).items()}
        if sorted(table) != list(range(len(table))):
            raise HFDatasetError(f"{path}: id2label ids must be 0..n-1, got {sorted(table)[:10]}...")
        return tuple(table[i] for i in range(len(table)))
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _as_array(value, what: str, index: int, column: str) -> np.ndarray:
    if value is None:
        raise HFDatasetError(f"row {index}: column {column!r} is empty")
    if hasattr(value, "mode"):  # PIL image
        mode = value.mode
        if what == "image":
            return np.asarray(value.convert("RGB"))
        arr = np.asarray(value)
        if mode in ("RGB", "RGBA"):
            if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
                raise HFDatasetError(
                    f"row {index}: label column {column!r} holds a colour ({mode}) image; labels must be "
                    "integer class-id masks (grayscale L / palette P images or 2-D integer arrays)"
                )
            arr = arr[..., 0]
        return arr
    return np.asarray(value)


def _hf_source(cfg, rzl: bool) -> Source:
    path = cfg.get("hf_path", "") or ""
    if not path:
        raise HFDatasetError(
            "data.name='hf' needs data.hf_path: a Hugging Face Hub dataset id, a directory written by "
            "Dataset(Dict).save_to_disk, or a local imagefolder / parquet path"
        )
    name = cfg.get("hf_name", "") or ""
    image_col = cfg.get("hf_image_column", "") or "image"
    label_col = cfg.get("hf_label_column", "") or "label"
    train_split = cfg.get("train_split", "") or "train"
    eval_split = cfg.get("eval_split", "") or "validation"
    splits: dict = {}

    def get_split(split: str):
        if split not in splits:
            ds = _load_hf_split(path, name, split)
            missing = [c for c in (image_col, label_col) if c not in ds.column_names]
            if missing:
                raise HFDatasetError(
                    f"data.hf_path={path!r} split {split!r} has no column(s) {missing}; its columns are "
                    f"{ds.column_names}: set data.hf_image_column / data.hf_label_column"
                )
            splits[split] = ds
        return splits[split]

    def load_row(index: int):
        ds = get_split(_current[index[0]])
        row = ds[int(index[1])]
        image = _as_array(row[image_col], "image", int(index[1]), image_col)
        label = _as_array(row[label_col], "label", int(index[1]), label_col)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise HFDatasetError(
                f"row {int(index[1])}: {image_col!r} is not an RGB image ({image.shape}, {image.dtype})"
            )
        if label.ndim == 3 and label.shape[-1] == 1:
            label = label[..., 0]
        if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer) and label.dtype != np.bool_:
            raise HFDatasetError(
                f"row {int(index[1])}: label column {label_col!r} is {label.dtype} of shape {label.shape}; it must "
                "be an integer class-id mask [H, W] (an L / P image or a 2-D integer array)"
            )
        if label.shape != image.shape[:2]:
            raise HFDatasetError(
                f"row {int(index[1])}: label {label_col!r} is {label.shape[0]}x{label.shape[1]} but image "
                f"{image_col!r} is {image.shape[0]}x{image.shape[1]}; masks must be the image's size"
            )
        if label.size and (label.min() < 0 or label.max() > 255):
            raise HFDatasetError(
                f"row {int(index[1])}: label ids outside 0..255 (min {label.min()}, max {label.max()}); "
                "class ids are 0..num_classes-1, 255 = ignore"
            )
        return image, label.astype(np.uint8)

    _current: list[str] = []  # split names by the integer stored in records (tf.data cannot hold strings cheaply)

    def split_id(split: str) -> int:
        if split not in _current:
            _current.append(split)
        return _current.index(split)

    train = get_split(train_split)
    id2label_file = cfg.get("hf_id2label_file", "") or cfg.get("class_names_file", "") or ""
    class_names = _read_id2label_file(id2label_file) if id2label_file else _class_label_names(train.features[label_col])
    if class_names is None:
        n = int(cfg.get("num_classes", 0) or 0)
        if not n:
            raise HFDatasetError(
                f"data.hf_path={path!r}: the class names are not in the dataset's features (column {label_col!r} "
                f"is {type(train.features[label_col]).__name__}); give data.hf_id2label_file (id2label.json or one "
                "name per line) or data.num_classes"
            )
        class_names = tuple(f"class_{i}" for i in range(n))
    if rzl and id2label_file == "" and _class_label_names(train.features[label_col]) is not None:
        class_names = class_names[1:]  # the dataset names id 0 (background / other), which becomes ignore
    load_row((split_id(train_split), 0)) if len(train) else None  # the first row: clear errors before training
    num_classes = len(class_names)

    def records(split: str) -> tf.data.Dataset:
        n = len(get_split(split))
        sid = split_id(split)
        return tf.data.Dataset.range(n).map(lambda i: {"index": tf.stack([tf.constant(sid, tf.int64), i])})

    def decode(record):
        image, label = tf.numpy_function(
            lambda idx: load_row(tuple(idx)), [record["index"]], [tf.uint8, tf.uint8], stateful=False
        )
        image = tf.ensure_shape(image, [None, None, 3])
        label = tf.ensure_shape(label, [None, None])
        if rzl:
            label = reduce_zero_label(label)
        label = tf.where(label >= num_classes, tf.constant(IGNORE_INDEX, tf.uint8), label)
        return image, label

    return Source(
        name="hf",
        class_names=tuple(class_names),
        palette=make_palette(num_classes),
        train_split=train_split,
        eval_split=eval_split,
        records=records,
        decode=decode,
        num_examples=lambda split: len(get_split(split)),
    )


# -------------------------------------------------------------------------- factory


def get_source(cfg) -> Source:
    """The :class:`Source` described by a data config (see input_pipeline)."""
    name = cfg.name
    if name not in DEFAULT_REDUCE_ZERO_LABEL:
        raise ValueError(f"Unknown dataset name {name!r}; expected one of {sorted(DEFAULT_REDUCE_ZERO_LABEL)}.")
    rzl = cfg.get("reduce_zero_label", None)
    rzl = DEFAULT_REDUCE_ZERO_LABEL[name] if rzl is None else bool(rzl)
    data_dir = cfg.get("data_dir", None) or None
    tfds_config = cfg.get("tfds_config", "") or ""

    def maybe_rzl(fn):
        return (lambda label: reduce_zero_label(fn(label))) if rzl else fn

    identity = lambda label: label  # pylint: disable=unnecessary-lambda-assignment

    if name == "folder":
        src = _folder_source(cfg, rzl)
    elif name == "hf":
        src = _hf_source(cfg, rzl)
    elif name == "synthetic_shapes":
        config = tfds_config or "default"
        if cfg.get("auto_prepare", True):
            synthetic_shapes.ensure_prepared(_default_data_dir(data_dir), config)
        src = _tfds_source(
            name=name,
            builder_name=f"synthetic_shapes/{config}",
            data_dir=data_dir,
            image_key="image",
            label_key="segmentation_mask",
            train_split="train",
            eval_split="validation",
            class_names=synthetic_shapes.CLASS_NAMES,
            palette=synthetic_shapes.PALETTE,
            label_map=maybe_rzl(identity),
        )
    elif name == "scene_parse150":
        src = _tfds_source(
            name=name,
            builder_name="scene_parse150" + (f"/{tfds_config}" if tfds_config else ""),
            data_dir=data_dir,
            image_key="image",
            label_key="annotation",
            train_split="train",
            eval_split="test",
            class_names=ADE20K_CLASS_NAMES if rzl else ("other",) + ADE20K_CLASS_NAMES,
            palette=make_palette(150 if rzl else 151),
            label_map=maybe_rzl(identity),
        )
    elif name == "cityscapes":
        src = _tfds_source(
            name=name,
            builder_name="cityscapes/" + (tfds_config or "semantic_segmentation"),
            data_dir=data_dir,
            image_key="image_left",
            label_key="segmentation_label",
            train_split="train",
            eval_split="validation",
            class_names=CITYSCAPES_CLASS_NAMES,
            palette=CITYSCAPES_PALETTE,
            label_map=maybe_rzl(cityscapes_label_map),
        )
    else:  # oxford_iiit_pet
        ignore_boundary = bool(cfg.get("pet_boundary_as_ignore", False))
        n = 2 if ignore_boundary else 3
        src = _tfds_source(
            name=name,
            builder_name="oxford_iiit_pet" + (f"/{tfds_config}" if tfds_config else ""),
            data_dir=data_dir,
            image_key="image",
            label_key="segmentation_mask",
            train_split="train",
            eval_split="test",
            class_names=PET_CLASS_NAMES[:n],
            palette=PET_PALETTE[:n],
            label_map=maybe_rzl(lambda label: pet_label_map(label, ignore_boundary)),
        )
    if cfg.get("train_split", ""):
        src.train_split = cfg.train_split
    if cfg.get("eval_split", ""):
        src.eval_split = cfg.eval_split
    return src
