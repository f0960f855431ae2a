"""Colour palettes for label maps: ADE20K (150 classes) and Cityscapes (19 train ids) as used by
mmseg / NVlabs SegFormer, and a generated palette for any number of classes."""

from __future__ import annotations

import numpy as np

_ADE20K_HEX = (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d "
    "787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 "
    "0907e6 dcdcdc ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 "
    "ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00 "
    "ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff 0bc8c8 ff5200 00fff5 003dff 00ff70 "
    "00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 "
    "ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 "
    "000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 "
    "08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff "
    "9900ff 47ff00 ff00a3 ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 "
    "00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 "
    "005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff "
)
_CITYSCAPES_HEX = (
    "804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 "
    "00008e 000046 003c64 005064 0000e6 770b20 "
)


def _parse(hex_colours: str) -> np.ndarray:
    return np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in hex_colours.split()], np.uint8)


ADE20K_PALETTE = _parse(_ADE20K_HEX)  # (150, 3) uint8
CITYSCAPES_PALETTE = _parse(_CITYSCAPES_HEX)  # (19, 3) uint8
PALETTES = {"ade20k": ADE20K_PALETTE, "cityscapes": CITYSCAPES_PALETTE}


def generated_palette(num_classes: int) -> np.ndarray:
    """Deterministic distinct colours for any number of classes (the PASCAL VOC bit-interleaving
    scheme: class i's bits are spread over the high bits of R, G and B). (num_classes, 3) uint8."""
    out = np.zeros((num_classes, 3), np.uint8)
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
            if c == 0:
                break
        out[i] = (r, g, b)
    return out


def get_palette(name: str | None, num_classes: int) -> np.ndarray:
    """name: 'ade20k', 'cityscapes', 'generated', or 'auto'/None (ADE20K for 150 classes, Cityscapes
    for 19, generated otherwise). A named palette with fewer colours than classes is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        name = {150: "ade20k", 19: "cityscapes"}.get(num_classes, "generated")
    if name == "generated":
        return generated_palette(num_classes)
    if name not in PALETTES:
        raise ValueError(f"unknown palette {name!r}; choose 'auto', 'ade20k', 'cityscapes' or 'generated'")
    palette = PALETTES[name]
    if len(palette) < num_classes:
        raise ValueError(
            f"palette {name!r} has {len(palette)} colours but the model has {num_classes} classes; "
            "use --palette generated"
        )
    return palette


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours (ids beyond the palette are black)."""
    labels = np.asarray(labels)
    padded = np.concatenate([palette, np.zeros((1, 3), np.uint8)])
    index = np.where((labels < 0) | (labels >= len(palette)), len(palette), labels).astype(np.int64)
    return padded[index]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-coded labels over an RGB uint8 image: (1 - alpha) * image + alpha * colour."""
    colours = colorize(labels, palette).astype(np.float32)
    return np.clip((1 - alpha) * np.asarray(image, np.float32) + alpha * colours + 0.5, 0, 255).astype(np.uint8)
