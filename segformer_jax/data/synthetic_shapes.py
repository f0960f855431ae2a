"""`synthetic_shapes`: a procedurally generated segmentation dataset (TFDS builder).

This is the built-in default dataset: it needs no download, is generated in a few
seconds, is deterministic given the builder config's ``seed`` and goes through
TFDS exactly as ADE20K (``scene_parse150``) does, so the default training path
exercises the same code as a real run.

Each example is an RGB ``uint8`` image on a textured, noisy background with 2-5
random shapes (random position, size, rotation, colour jitter; later shapes occlude
earlier ones) and a ``uint8`` mask of class ids:

====  ==========  ===============================  =========================
 id    class       colour family (hue)              texture
====  ==========  ===============================  =========================
 0     background  grey / low saturation            smooth blotches + noise
 1     circle      red (~0 deg)                     radial shading
 2     square      green (~125 deg)                 checkerboard
 3     triangle    blue (~212 deg)                  smooth gradient
 4     ring        yellow (~58 deg)                 flat; the hole is background
 5     stripes     magenta (~295 deg)               stripes (rotated rectangle)
====  ==========  ===============================  =========================

Shapes are large (radius >= ~10 px at 128x128: sizes scale with the image size),
so a SegFormer-b0 trained from scratch learns the data in minutes.

Builder configs (``tfds.builder('synthetic_shapes/<config>')``):

* ``default``: 128x128, 2000 train / 200 validation examples.
* ``small``: 64x64, 64 train / 16 validation examples (tests).

Usage::

    from segformer_jax.data import synthetic_shapes
    builder = synthetic_shapes.ensure_prepared(data_dir)      # generates if needed
    ds = builder.as_dataset(split='train')                   # {'image', 'segmentation_mask'}
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

CLASS_NAMES = ("background", "circle", "square", "triangle", "ring", "stripes")
NUM_CLASSES = len(CLASS_NAMES)

# Display palette (one RGB colour per class), close to each class's colour family.
PALETTE = np.array(
    [
        [120, 120, 120],  # background
        [220, 40, 40],  # circle
        [40, 180, 60],  # square
        [50, 80, 220],  # triangle
        [230, 210, 40],  # ring
        [200, 50, 200],  # stripes
    ],
    dtype=np.uint8,
)

# Hue (in [0, 1)) of each shape class's colour family; index = class id.
_HUES = (None, 0.0, 125.0 / 360.0, 212.0 / 360.0, 58.0 / 360.0, 295.0 / 360.0)
_HUE_JITTER = 0.03  # +-11 degrees


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Builder config: image size, number of examples per split and generator seed."""

    image_size: int = 128
    num_train: int = 2000
    num_validation: int = 200
    seed: int = 0


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB, all inputs/outputs in [0, 1]; returns [..., 3]."""
    h = np.asarray(h, np.float64) % 1.0
    s = np.asarray(s, np.float64)
    v = np.asarray(v, np.float64)
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1] of shape [size, size]: bilinear upsampling of a
    (cells+1)^2 random grid."""
    grid = rng.random((cells + 1, cells + 1))
    coords = np.linspace(0.0, cells, size, endpoint=False)
    i0 = np.floor(coords).astype(np.int64)
    f = coords - i0
    i1 = np.minimum(i0 + 1, cells)
    rows = grid[i0] * (1 - f)[:, None] + grid[i1] * f[:, None]  # [size, cells+1]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def _class_colour(rng: np.random.Generator, cls: int):
    """A random (h, s, v) inside the colour family of shape class ``cls``."""
    h = _HUES[cls] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
    s = rng.uniform(0.6, 0.95)
    v = rng.uniform(0.55, 0.95)
    return h, s, v


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def generate_example(rng: np.random.Generator, size: int = 128):
    """Generates one (image uint8 [size,size,3], mask uint8 [size,size]) pair."""
    yy, xx = _pixel_grid(size)

    # Background: low-saturation colour with smooth blotches and fine noise.
    base_h = rng.random()
    base_s = rng.uniform(0.0, 0.2)
    base_v = rng.uniform(0.3, 0.75)
    blotch = _smooth_noise(rng, size, int(rng.integers(3, 7))) - 0.5
    v_field = np.clip(base_v + 0.3 * blotch, 0.05, 1.0)
    # For a fixed hue and saturation, HSV -> RGB is linear in the value channel.
    image = v_field[..., None].astype(np.float32) * _hsv_to_rgb(base_h, base_s, 1.0).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)

    num_shapes = int(rng.integers(2, 6))
    for _ in range(num_shapes):
        cls = int(rng.integers(1, NUM_CLASSES))
        r = rng.uniform(0.09, 0.24) * size  # >= 11.5 px at 128x128
        if cls == 4:  # rings need room for the hole
            r = max(r, 0.13 * size)
        elif cls == 3:  # a triangle covers less of its circle than the other shapes
            r *= 1.25
        cy, cx = rng.uniform(0.1, 0.9, size=2) * size
        theta = rng.uniform(0, 2 * np.pi)
        h, s, v = _class_colour(rng, cls)
        # Work inside the shape's bounding box only (all shapes fit in radius 1.2 r).
        y0, y1 = max(int(cy - 1.2 * r) - 1, 0), min(int(cy + 1.2 * r) + 2, size)
        x0, x1 = max(int(cx - 1.2 * r) - 1, 0), min(int(cx + 1.2 * r) + 2, size)
        if y1 <= y0 or x1 <= x0:
            continue
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        # Coordinates in the shape's rotated frame.
        u = dx * np.cos(theta) + dy * np.sin(theta)
        w = -dx * np.sin(theta) + dy * np.cos(theta)
        dist = np.sqrt(dx * dx + dy * dy)
        shade = np.zeros_like(dist)
        if cls == 1:  # circle, radial shading
            region = dist <= r
            shade = -0.25 * (dist / r) ** 2
        elif cls == 2:  # rotated square, checkerboard texture
            region = (np.abs(u) <= r * 0.7) & (np.abs(w) <= r * 0.7)
            period = max(3.0, r / 3.0)
            checker = ((np.floor(u / period) + np.floor(w / period)) % 2) * 2 - 1
            shade = 0.1 * checker
        elif cls == 3:  # equilateral triangle, linear gradient
            # Three half-planes at 120 degrees around the centre.
            region = np.ones(dist.shape, bool)
            for k in range(3):
                a = theta + k * 2 * np.pi / 3
                region &= (dx * np.cos(a) + dy * np.sin(a)) <= r * 0.5
            shade = 0.2 * (u / r)
        elif cls == 4:  # ring: annulus, hole stays background
            inner = r * rng.uniform(0.4, 0.55)
            region = (dist <= r) & (dist >= inner)
        else:  # stripes: rotated rectangle with a stripe texture
            aspect = rng.uniform(0.5, 0.7)
            region = (np.abs(u) <= r * 0.95) & (np.abs(w) <= r * aspect)
            period = max(4.0, r / 2.5)
            shade = np.where((np.floor(w / period) % 2) == 0, 0.12, -0.18)
        if not region.any():
            continue
        colour = np.clip(v + shade[region], 0.1, 1.0)[:, None] * _hsv_to_rgb(h, s, 1.0)
        image[y0:y1, x0:x1][region] = colour
        mask[y0:y1, x0:x1][region] = cls

    # Moderate per-pixel noise everywhere.
    image *= 255.0
    image += 7.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image, mask


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Procedurally generated shapes for semantic segmentation (no download)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Hues spread further apart, larger triangles.",
    }
    BUILDER_CONFIGS = [
        SyntheticShapesConfig(
            name="default",
            description="128x128, 2000 train / 200 validation examples.",
            image_size=128,
            num_train=2000,
            num_validation=200,
        ),
        SyntheticShapesConfig(
            name="small",
            description="64x64, 64 train / 16 validation examples (for tests).",
            image_size=64,
            num_train=64,
            num_validation=16,
        ),
    ]
    DEFAULT_CONFIG_NAME = "default"
    # TFDS derives `code_path` through `importlib_resources`, which is not always
    # installed (it is only needed to locate checksums of downloads, and this builder
    # downloads nothing). A plain path keeps `download_and_prepare` working without it.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "segmentation_mask": tfds.features.Image(
                        shape=(size, size, 1), encoding_format="png", use_colormap=True
                    ),
                }
            ),
            supervised_keys=("image", "segmentation_mask"),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples(split_id=0, num=cfg.num_train),
            "validation": self._generate_examples(split_id=1, num=cfg.num_validation),
        }

    def _generate_examples(self, split_id: int, num: int):
        cfg = self.builder_config
        for i in range(num):
            rng = np.random.default_rng([cfg.seed, split_id, i])
            image, mask = generate_example(rng, cfg.image_size)
            # Encoded here with PIL (TFDS accepts encoded bytes): much faster than
            # TFDS's own TF-op encoder. The mask is a plain 8-bit grayscale PNG.
            yield i, {"image": _png_bytes(image), "segmentation_mask": _png_bytes(mask)}


def ensure_prepared(data_dir: str | None = None, config: str = "default") -> tfds.core.DatasetBuilder:
    """Returns the ``synthetic_shapes/<config>`` builder, generating the data into
    ``data_dir`` (default ``~/tensorflow_datasets``) first if it is not there yet.

    Nothing is downloaded: the examples are generated locally in a few seconds.
    """
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
    builder = tfds.builder(f"synthetic_shapes/{config}", data_dir=data_dir)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
            )
        except Exception:  # pylint: disable=broad-except
            # Another process may have generated the same data concurrently (TFDS writes
            # to a temporary folder and renames it): use its result if it is complete.
            builder = tfds.builder(f"synthetic_shapes/{config}", data_dir=data_dir)
            if not builder.is_prepared():
                raise
    return builder
