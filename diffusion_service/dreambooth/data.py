"""Training data: images to arrays with PIL and numpy, and the dataset.

Each image is decoded with the shared limits (:func:`decode_image`), its
shorter side resized to the training resolution (bicubic), center-cropped to
a square and scaled to [-1, 1] once, when the job starts. Random flips are
drawn per example from torch's generator (seeded by the trainer).

With ``cache_latents`` the frozen VAE encodes every (image, flip) pair once
and the dataset hands out the latent distribution (mean and std); the module
samples from it at each step, which is what encoding at each step would give
since the VAE never changes. Without it the dataset hands out pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dreamsight_server.images import ImageLimits, decode_image

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

# Instance images were checked against the service's limits when the job was
# created; the worker decodes them again with limits at least as large.
WORKER_IMAGE_LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=8192 * 8192)


def resize_and_crop(image: Image, size: int) -> np.ndarray:
    """An RGB image as a ``size`` x ``size`` x 3 uint8 array, center-cropped."""
    from PIL import Image as PILImage

    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.convert("RGB").resize((new_w, new_h), PILImage.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """HWC uint8 to CHW float32 in [-1, 1], as the VAE expects."""
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def flip(chw: np.ndarray) -> np.ndarray:
    """Mirror a CHW array left-right."""
    return chw[:, :, ::-1].copy()


def load_image_dir(directory: Path, size: int, pattern: str = "*") -> np.ndarray:
    """The files of a directory matching pattern (sorted by name), decoded,
    as N x 3 x size x size."""
    arrays = []
    for path in sorted(p for p in directory.glob(pattern) if p.is_file()):
        image = decode_image(path.read_bytes(), WORKER_IMAGE_LIMITS, path.name)
        arrays.append(to_model_range(resize_and_crop(image, size)))
    if not arrays:
        raise ValueError(f"no images in {directory}")
    return np.stack(arrays)


class ImageSet:
    """One set of training images (instance or class), as pixels or latents.

    ``variants[v]`` holds the unflipped (v = 0) and flipped (v = 1) version
    of every image: pixels (N x 3 x H x W) or, once :meth:`encode` ran, the
    VAE's latent mean and std (N x C x h x w each).
    """

    def __init__(self, pixels: np.ndarray, random_flip: bool) -> None:
        import torch

        self.random_flip = random_flip
        self.size = int(pixels.shape[0])
        straight = torch.from_numpy(pixels)
        self.pixels: list[torch.Tensor] = [straight]
        if random_flip:
            self.pixels.append(torch.from_numpy(np.stack([flip(p) for p in pixels])))
        self.latents: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def encode(self, vae: Any, batch_size: int = 8) -> None:
        """Cache the latent distribution of every image variant (VAE frozen)."""
        import torch

        self.latents = []
        with torch.no_grad():
            for pixels in self.pixels:
                means, stds = [], []
                for start in range(0, self.size, batch_size):
                    chunk = pixels[start : start + batch_size].to(vae.device, vae.dtype)
                    dist = vae.encode(chunk).latent_dist
                    means.append(dist.mean.float().cpu())
                    stds.append(dist.std.float().cpu())
                self.latents.append((torch.cat(means), torch.cat(stds)))
        self.pixels = []

    def example(self, index: int, flipped: bool) -> dict[str, torch.Tensor]:
        """One example: ``pixels`` or latent ``mean`` and ``std``."""
        variant = 1 if flipped and self.random_flip else 0
        if self.latents is not None:
            mean, std = self.latents[variant]
            return {"mean": mean[index], "std": std[index]}
        return {"pixels": self.pixels[variant][index]}


class DreamBoothDataset:
    """Pairs instance examples with class examples, as the diffusers script.

    Its length is the larger of the two sets; item i takes instance image
    i mod N and class image i mod M. A map-style dataset for torch's
    DataLoader (shuffled by the trainer).
    """

    def __init__(self, instances: ImageSet, classes: ImageSet | None) -> None:
        self.instances = instances
        self.classes = classes

    def __len__(self) -> int:
        return max(self.instances.size, self.classes.size if self.classes else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        flips = torch.rand(2) < 0.5
        item: dict[str, Any] = {
            "instance": self.instances.example(index % self.instances.size, bool(flips[0]))
        }
        if self.classes is not None:
            item["class"] = self.classes.example(index % self.classes.size, bool(flips[1]))
        return item


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch: instance examples first, then their class examples.

    ``num_instance`` tells the module where the class half starts (the
    diffusers script's ``torch.chunk`` in two, made explicit).
    """
    import torch

    rows = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    batch: dict[str, Any] = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    batch["num_instance"] = len(examples)
    return batch
