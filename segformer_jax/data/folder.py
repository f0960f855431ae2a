"""A user's own segmentation dataset stored as image/mask files in a folder.

Layout (either one)::

    root/                               root/
      images/  a.jpg b.png ...            train/images/ ...   train/masks/ ...
      masks/   a.png b.png ...            val/images/ ...     val/masks/ ...
      class_names.txt   (optional)        class_names.txt     (optional)

* An image and its mask share the file stem (``images/a.jpg`` <-> ``masks/a.png``).
  Images may be JPEG/PNG/BMP/GIF/TIFF/WebP (``IMAGE_EXTENSIONS``); masks must be
  PNG (lossless) holding one class id per pixel (8-bit grayscale ``L``, palette
  ``P`` -- the palette *index* is the class id, as in Pascal VOC -- 1-bit, or 16-bit
  ``I;16`` with ids < 256). 255 means "ignore". An RGB mask whose three channels are
  equal is accepted; a colour-coded RGB mask is rejected (convert it to ids first).
* Images are converted to RGB: grayscale (``L``/``I;16``) is replicated to 3
  channels, palette images are expanded through their palette, RGBA/LA drop the
  alpha channel (no compositing), CMYK/YCbCr are converted by PIL. EXIF orientation
  is NOT applied (pixels are used as stored, so masks drawn on the stored pixels
  stay aligned).
* Class names: one per line in ``class_names.txt`` at the root (or the file given
  by ``class_names_file``); blank lines are skipped. Without a names file the number
  of classes is ``num_classes`` if given, else (max id found in the masks) + 1, and
  the names are ``class_0, class_1, ...``; ids below the max that occur in no mask are
  warned about (stray pixels), or refused when they are most of the classes (masks
  scaled for viewing, e.g. 0, 85, 170).
* Train/val split: the ``train/`` and ``val/`` (or ``validation/``) sub-folders if
  they exist; otherwise a deterministic split of ``images/``: the stems are sorted,
  permuted with ``numpy.random.default_rng(split_seed)`` and the last
  ``round(N * val_fraction)`` (at least 1 when N > 1 and val_fraction > 0) go to val.

Every problem is reported up front by :func:`scan_folder` with a
:class:`FolderDatasetError` saying what is wrong, where, and what to do: missing
folder, empty folder, images without masks (listed), masks that are not PNG, masks without images, masks
with ids >= num_classes other than 255 (file and ids), image/mask size mismatch,
unreadable files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png",)
IGNORE_INDEX = 255
_MAX_LISTED = 10  # how many offending files an error message lists

logger = logging.getLogger("segformer_jax")


class FolderDatasetError(ValueError):
    """A folder dataset is missing, empty or inconsistent (message says how to fix)."""


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    image_paths: tuple[str, ...]
    mask_paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.image_paths)


@dataclasses.dataclass(frozen=True)
class FolderDataset:
    root: str
    class_names: tuple[str, ...]
    train: FolderSplit
    val: FolderSplit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _list(paths: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(paths[:limit])
    if len(paths) > limit:
        shown += f", ... ({len(paths) - limit} more)"
    return shown


def _index_dir(directory: str, extensions: Sequence[str], what: str) -> dict[str, str]:
    """{stem: path} of the files with one of ``extensions`` in ``directory``."""
    if not os.path.isdir(directory):
        raise FolderDatasetError(
            f"Missing {what} folder: {directory!r} does not exist or is not a folder. "
            "A folder dataset needs images/ and masks/ (or train/images, train/masks, "
            "val/images, val/masks) under the dataset root."
        )
    index: dict[str, str] = {}
    duplicates = []
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions or name.startswith("."):
            continue
        if stem in index:
            duplicates.append(name)
            continue
        index[stem] = os.path.join(directory, name)
    if duplicates:
        raise FolderDatasetError(
            f"Several {what} files share a stem in {directory!r}: {_list(duplicates)}. Keep one file per stem."
        )
    if not index:
        raise FolderDatasetError(
            f"Empty {what} folder: {directory!r} holds no {'/'.join(extensions)} files. "
            "Put the files there (an image and its mask share the file stem)."
        )
    return index


def _pair(images_dir: str, masks_dir: str) -> tuple[list[str], list[str], list[str]]:
    """Returns (stems, image_paths, mask_paths) of the matched files, sorted by stem."""
    images = _index_dir(images_dir, IMAGE_EXTENSIONS, "images")
    masks = _index_dir(masks_dir, MASK_EXTENSIONS, "masks")
    no_mask = sorted(os.path.basename(images[s]) for s in images if s not in masks)
    if no_mask:
        # Listed again only on this error path: a mask of another type is a different mistake.
        other_files = {os.path.splitext(n)[0]: n for n in sorted(os.listdir(masks_dir)) if not n.startswith(".")}
        not_png = sorted(other_files[s] for s in images if s not in masks and s in other_files)
        if not_png:
            raise FolderDatasetError(
                f"{len(not_png)} mask(s) in {masks_dir!r} are not PNG: {_list(not_png)}. Masks must be "
                "lossless PNG files of class ids (JPEG compression changes the ids at every edge); "
                "save them as PNG with the same file stem."
            )
        raise FolderDatasetError(
            f"{len(no_mask)} image(s) in {images_dir!r} have no mask in {masks_dir!r}: "
            f"{_list(no_mask)}. Each image needs a PNG mask with the same file stem "
            "(images/x.jpg -> masks/x.png); add the masks or remove those images."
        )
    no_image = sorted(os.path.basename(masks[s]) for s in masks if s not in images)
    if no_image:
        raise FolderDatasetError(
            f"{len(no_image)} mask(s) in {masks_dir!r} have no image in {images_dir!r}: "
            f"{_list(no_image)}. Add the images or remove those masks."
        )
    stems = sorted(images)
    return stems, [images[s] for s in stems], [masks[s] for s in stems]


def read_class_names(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FolderDatasetError(
            f"Class-names file {path!r} does not exist. Give a text file with one "
            "class name per line (line i = class id i), or leave class_names_file empty."
        )
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise FolderDatasetError(f"Class-names file {path!r} is empty: one name per line.")
    return names


def load_image(path: str) -> np.ndarray:
    """Reads an image file as RGB uint8 [H, W, 3] (conversions documented above)."""
    with PIL.Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im).astype(np.float64)
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
            return np.repeat(arr[..., None], 3, axis=-1)
        if im.mode == "P":
            im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode != "RGB":
            im = im.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, 1, F
        return np.asarray(im, dtype=np.uint8).copy()


def load_mask(path: str) -> np.ndarray:
    """Reads a mask PNG as class ids uint8 [H, W] (palette index for ``P`` masks)."""
    with PIL.Image.open(path) as im:
        mode = im.mode
        arr = np.asarray(im)
    if mode in ("L", "P"):
        return arr.astype(np.uint8)
    if mode == "1":
        return arr.astype(np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        if arr.size and (arr.max() > 255 or arr.min() < 0):
            raise FolderDatasetError(
                f"Mask {path!r} has class ids outside 0..255 "
                f"(min {int(arr.min())}, max {int(arr.max())}). Masks hold one id per "
                "pixel in 0..num_classes-1 (255 = ignore)."
            )
        return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA", "LA"):
        chans = arr[..., :3] if mode != "LA" else arr[..., :1]
        if mode == "LA" or (
            np.array_equal(chans[..., 0], chans[..., 1]) and np.array_equal(chans[..., 0], chans[..., 2])
        ):
            return chans[..., 0].astype(np.uint8)
        raise FolderDatasetError(
            f"Mask {path!r} is a colour ({mode}) image. Masks must hold one class id per "
            "pixel: save them as 8-bit grayscale (L) or palette (P) PNGs whose pixel "
            "values are the class ids (255 = ignore)."
        )
    raise FolderDatasetError(
        f"Mask {path!r} has unsupported PNG mode {mode!r}; use 8-bit grayscale (L) or palette (P) PNGs of class ids."
    )


def _check_split(
    split_name: str,
    image_paths: Sequence[str],
    mask_paths: Sequence[str],
    num_classes: int | None,
    reduce_zero_label: bool = False,
) -> set[int]:
    """Validates sizes and ids of every pair; returns the raw ids seen (excl. 255).

    With ``reduce_zero_label`` the raw ids are 0 (ignored) and 1..num_classes.
    """
    limit = None if num_classes is None else num_classes + int(reduce_zero_label)
    mismatched, unreadable, bad_ids = [], [], []
    seen: set[int] = set()
    for img_path, mask_path in zip(image_paths, mask_paths):
        try:
            with PIL.Image.open(img_path) as im:
                img_size = im.size  # (w, h), header only
        except Exception as e:  # pylint: disable=broad-except
            unreadable.append(f"{img_path} ({type(e).__name__}: {e})")
            continue
        try:
            mask = load_mask(mask_path)
        except FolderDatasetError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            unreadable.append(f"{mask_path} ({type(e).__name__}: {e})")
            continue
        if (mask.shape[1], mask.shape[0]) != img_size:
            mismatched.append(
                f"{os.path.basename(img_path)} is {img_size[0]}x{img_size[1]} but "
                f"{os.path.basename(mask_path)} is {mask.shape[1]}x{mask.shape[0]}"
            )
            continue
        ids = np.unique(mask)
        ids = ids[ids != IGNORE_INDEX]
        if ids.size:
            seen.update(int(i) for i in ids)
            if limit is not None and ids.max() >= limit:
                bad = [int(i) for i in ids if i >= limit]
                bad_ids.append(f"{mask_path}: ids {bad}")
    if unreadable:
        raise FolderDatasetError(
            f"Cannot read {len(unreadable)} file(s) of the {split_name} split: "
            f"{_list(unreadable)}. Replace or remove them."
        )
    if mismatched:
        raise FolderDatasetError(
            f"Image/mask size mismatch in the {split_name} split ({len(mismatched)} "
            f"pair(s)): {_list(mismatched)}. A mask must have exactly its image's "
            "width and height."
        )
    if bad_ids:
        raise FolderDatasetError(
            f"{len(bad_ids)} mask(s) of the {split_name} split hold class ids >= "
            f"{limit} (num_classes={num_classes}"
            f"{', reduce_zero_label: raw ids 1..num_classes' if reduce_zero_label else ''}"
            f"; 255 = ignore): {_list(bad_ids)}. "
            "Fix the masks, map those ids to 255, or add class names / raise num_classes."
        )
    return seen


def _check_inferred_classes(root: str, seen: set[int], num_classes: int, reduce_zero_label: bool) -> None:
    """With no class names and no num_classes, the count is (max id + 1): ids that never occur
    are then classes that score nan, which is either a few stray pixels or a wrong encoding."""
    present = {i - int(reduce_zero_label) for i in seen} - {-1}
    absent = [c for c in range(num_classes) if c not in present]
    if not absent:
        return
    message = (
        f"Dataset folder {root!r} has no class_names.txt and data.num_classes is 0, so the classes "
        f"are inferred from the masks' largest id: {num_classes} classes, but {len(absent)} of them "
        f"occur in no mask (ids {_list([str(c + int(reduce_zero_label)) for c in absent])}). "
    )
    if len(absent) * 2 > num_classes:
        raise FolderDatasetError(
            message + "That looks like masks saved for viewing (ids scaled, e.g. 0, 85, 170: one of "
            "them may even land on 255, the ignore id) rather than class ids: map the masks to ids "
            "0..K-1 (255 = ignore). If the classes are right, state them with class_names.txt (one "
            "name per line) or data.num_classes."
        )
    logger.warning(
        "%s",
        message + "Check those masks for stray ids, or state the classes with "
        "class_names.txt (one name per line) or data.num_classes.",
    )


def scan_folder(
    root: str,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    class_names_file: str = "",
    num_classes: int = 0,
    reduce_zero_label: bool = False,
) -> FolderDataset:
    """Finds, pairs and validates the files of a folder dataset (see module doc).

    Reads every mask once (to check ids and sizes) and every image's header. With
    ``reduce_zero_label`` (ADE20K-style masks) raw id 0 is "ignore" and raw ids
    1..num_classes are the classes.
    Raises :class:`FolderDatasetError` on any problem.
    """
    root = os.path.expanduser(str(root))
    if not root or not os.path.isdir(root):
        raise FolderDatasetError(
            f"Dataset folder {root!r} does not exist. Set data.folder to a folder "
            "holding images/ and masks/ (or train/ and val/ with images/ and masks/)."
        )
    val_dir = None
    for name in ("val", "validation"):
        if os.path.isdir(os.path.join(root, name)):
            val_dir = os.path.join(root, name)
            break
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir) or val_dir is not None:
        if not os.path.isdir(train_dir) or val_dir is None:
            raise FolderDatasetError(
                f"{root!r} has only one of train/ and val/: a sub-folder split needs both "
                "train/{images,masks} and val/{images,masks} (or neither, to split "
                "images/ by val_fraction)."
            )
        _, tr_img, tr_mask = _pair(os.path.join(train_dir, "images"), os.path.join(train_dir, "masks"))
        _, va_img, va_mask = _pair(os.path.join(val_dir, "images"), os.path.join(val_dir, "masks"))
    else:
        if not os.path.isdir(os.path.join(root, "images")) and not os.listdir(root):
            raise FolderDatasetError(
                f"Dataset folder {root!r} is empty. Put images/ and masks/ (same file "
                "stems) in it, or train/ and val/ sub-folders each with images/ and masks/."
            )
        stems, img, mask = _pair(os.path.join(root, "images"), os.path.join(root, "masks"))
        n = len(stems)
        if not 0.0 <= val_fraction < 1.0:
            raise FolderDatasetError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        n_val = int(round(n * val_fraction))
        if val_fraction > 0 and n > 1:
            n_val = max(n_val, 1)
        n_val = min(n_val, n - 1)
        order = np.random.default_rng(split_seed).permutation(n)
        val_idx = sorted(order[n - n_val :].tolist())
        train_idx = sorted(order[: n - n_val].tolist())
        tr_img, tr_mask = [img[i] for i in train_idx], [mask[i] for i in train_idx]
        va_img, va_mask = [img[i] for i in val_idx], [mask[i] for i in val_idx]

    names: list[str] | None = None
    if class_names_file:
        names = read_class_names(os.path.expanduser(class_names_file))
    elif os.path.isfile(os.path.join(root, "class_names.txt")):
        names = read_class_names(os.path.join(root, "class_names.txt"))
    n_classes = len(names) if names else (num_classes or None)
    if names and num_classes and num_classes != len(names):
        raise FolderDatasetError(
            f"num_classes={num_classes} but the class-names file lists {len(names)} "
            "names; make them agree (or set num_classes to 0)."
        )
    seen = _check_split("train", tr_img, tr_mask, n_classes, reduce_zero_label)
    if va_img:
        seen |= _check_split("val", va_img, va_mask, n_classes, reduce_zero_label)
    if names is None:
        if not n_classes:
            n_classes = max(max(seen, default=-1) + 1 - int(reduce_zero_label), 1)
            _check_inferred_classes(root, seen, n_classes, reduce_zero_label)
        names = [f"class_{i}" for i in range(n_classes)]
    return FolderDataset(
        root=root,
        class_names=tuple(names),
        train=FolderSplit(tuple(tr_img), tuple(tr_mask)),
        val=FolderSplit(tuple(va_img), tuple(va_mask)),
    )


def check_binary_masks(root: str, field: str = "model.binary") -> None:
    """A binary (one logit channel) model trains on masks of 0 (background), 1 (foreground) and 255
    (ignore) only; raises :class:`FolderDatasetError` naming `field` and the offending masks otherwise
    (e.g. masks saved for viewing as 0 / 255, or with more classes). Reads every mask under ``root``."""
    root = os.path.expanduser(str(root))
    bad = []
    for directory, _, files in sorted(os.walk(root)):
        if os.path.basename(directory) != "masks":
            continue
        for name in sorted(files):
            if not name.lower().endswith(MASK_EXTENSIONS):
                continue
            path = os.path.join(directory, name)
            ids = np.unique(load_mask(path))
            other = [int(i) for i in ids if i not in (0, 1, IGNORE_INDEX)]
            if other:
                bad.append(f"{path}: values {other[:8]}{' ...' if len(other) > 8 else ''}")
    if bad:
        raise FolderDatasetError(
            f"{field}=True (one sigmoid logit) needs masks of 0 (background), 1 (foreground) and 255 "
            f"(ignore) only, but {len(bad)} mask(s) under {root!r} hold other values: {_list(bad)}. Map "
            f"the foreground to 1 (a mask saved as 0 / 255 for viewing marks it as ignored), or set "
            f"{field}=False to train one softmax channel per class."
        )
