"""A deterministic judge: which colour and which shape an image shows.

    python -m dreamsight_demo.shapes.judge IMAGE [IMAGE ...]

No model: the image is scaled to 64x64; pixels with colour (chroma above a
threshold) are the foreground; a 3x3 majority filter removes speckle; the
largest connected blob is the shape. Its **colour** is the palette colour
whose hue most of the blob's pixels are nearest to. Its **shape** is the
template (circle, square, triangle, star, each scaled to fill its bounding
box) whose mask overlaps the blob's, scaled the same way, best
(intersection over union). Stripes show as alternating light and dark rows
inside the blob.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dreamsight_demo.shapes.scenes import ALL_COLOURS, ALL_SHAPES, draw_mask

WORK_SIZE = 64
TEMPLATE_SIZE = 32
MIN_CHROMA = 0.25
"""Foreground: max(R,G,B) - min(R,G,B) above this (0..1); white and grey are not."""
MIN_AREA = 0.01
"""A blob smaller than this fraction of the image is no shape."""
MAX_AREA = 0.8
"""A blob larger than this fraction of the image is a background, not a shape."""
MIN_SHAPE_IOU = 0.55
"""Below this overlap with every template the shape is not recognised."""
MIN_COLOUR_SHARE = 0.5
"""Below this share of the blob's pixels no palette colour is named."""


@dataclass(frozen=True)
class Verdict:
    """What the judge saw. ``colour`` and ``shape`` are None when unsure."""

    colour: str | None
    shape: str | None
    colour_share: float
    """Fraction of the blob's pixels whose hue is nearest ``colour``."""
    shape_iou: float
    """Overlap of the blob with the best template."""
    coverage: float
    """The blob's area as a fraction of the image."""
    blobs: int
    """Connected foreground blobs (one shape drawn cleanly makes 1)."""
    striped: bool

    def matches(self, colour: str | None = None, shape: str | None = None) -> bool:
        """Whether the verdict agrees with the given colour and/or shape."""
        return (colour is None or self.colour == colour) and (shape is None or self.shape == shape)


def hue_degrees(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), chroma and value (0..1) of an ... x 3 array in 0..1."""
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    chroma = mx - mn
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6,
        np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    return hue * 60.0, chroma, mx


@functools.cache
def _palette() -> tuple[tuple[str, ...], np.ndarray]:
    names = tuple(ALL_COLOURS)
    rgb = np.array([ALL_COLOURS[n] for n in names], dtype=np.float64) / 255
    hues, _, _ = hue_degrees(rgb)
    return names, hues


@functools.cache
def _templates() -> dict[str, np.ndarray]:
    side = 256
    out = {}
    for shape in ALL_SHAPES:
        mask = np.asarray(draw_mask(shape, side / 2, side / 2, side * 0.9, side, side)) > 127
        out[shape] = _normalise(mask)
    return out


def _normalise(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box and scaled to TEMPLATE_SIZE square."""
    rows, cols = np.nonzero(mask)
    crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    image = Image.fromarray(crop.astype(np.uint8) * 255)
    scaled = image.resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(scaled) > 127


def _majority(mask: np.ndarray) -> np.ndarray:
    """Keep pixels with at least 5 of their 3x3 neighbourhood set (speckle out)."""
    padded = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    count = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return np.asarray(count >= 5)


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """Connected (4-neighbour) components, largest first, as boolean masks."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    sizes: list[int] = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        label = len(sizes) + 1
        labels[y, x] = label
        queue = deque([(int(y), int(x))])
        size = 0
        while queue:
            cy, cx = queue.popleft()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        sizes.append(size)
    order = np.argsort(sizes)[::-1]
    return [labels == (i + 1) for i in order]


def _striped(value: np.ndarray, blob: np.ndarray) -> bool:
    """Alternating light and dark rows inside the blob."""
    rows = [value[y][blob[y]].mean() for y in range(blob.shape[0]) if blob[y].sum() >= 3]
    if len(rows) < 8:
        return False
    low, high = np.percentile(rows, [10, 90])
    if high - low < 0.12:
        return False
    profile = np.array(rows) - (low + high) / 2
    swing = np.abs(profile) > (high - low) / 4
    signs = np.sign(profile[swing])
    changes = int((signs[1:] != signs[:-1]).sum())
    return changes >= 3


def judge(image: Image.Image) -> Verdict:
    """The colour and shape of the main shape in an image."""
    rgb = image.convert("RGB")
    if rgb.size != (WORK_SIZE, WORK_SIZE):
        shrink = min(rgb.size) > WORK_SIZE
        method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
        rgb = rgb.resize((WORK_SIZE, WORK_SIZE), method)
    pixels = np.asarray(rgb, dtype=np.float64) / 255
    hue, chroma, value = hue_degrees(pixels)
    blobs = _blobs(_majority(chroma > MIN_CHROMA))
    none = Verdict(None, None, 0.0, 0.0, 0.0, len(blobs), False)
    if not blobs or blobs[0].mean() < MIN_AREA:
        return none
    blob = blobs[0]
    names, palette = _palette()
    distance = np.abs(hue[blob][:, None] - palette[None, :])
    distance = np.minimum(distance, 360 - distance)
    votes = np.bincount(distance.argmin(axis=1), minlength=len(names))
    best = int(votes.argmax())
    share = float(votes[best] / votes.sum())
    normalised = _normalise(blob)
    scores = {
        shape: float((template & normalised).sum() / (template | normalised).sum())
        for shape, template in _templates().items()
    }
    shape = max(scores, key=lambda s: scores[s])
    iou = scores[shape]
    return Verdict(
        colour=names[best] if share >= MIN_COLOUR_SHARE else None,
        shape=shape if iou >= MIN_SHAPE_IOU and blob.mean() <= MAX_AREA else None,
        colour_share=share,
        shape_iou=iou,
        coverage=float(blob.mean()),
        blobs=len(blobs),
        striped=_striped(value, blob),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.images:
        verdict = judge(Image.open(path))
        print(json.dumps({"image": str(path), **asdict(verdict)}))


if __name__ == "__main__":
    main()
