"""Image decoding with limits, shared by the services that accept images.

Checks the byte size before decoding and the pixel count from the header
before any pixel is decompressed, so a decompression bomb costs nothing.
Animated images keep their first frame; any mode (CMYK, 16-bit, palette,
alpha) becomes RGB.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dreamsight_server.errors import InvalidArgument
from dreamsight_server.settings import setting

if TYPE_CHECKING:
    from PIL.Image import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    """The largest image a service accepts."""

    max_bytes: int = setting(
        20 * 1024 * 1024, "largest encoded image in bytes", flag="max-image-bytes", minimum=1
    )
    max_pixels: int = setting(
        4096 * 4096, "largest decoded image in pixels", flag="max-image-pixels", minimum=1
    )
    max_side: int = 8192


def decode_image(data: bytes, limits: ImageLimits, field: str) -> Image:
    """Decode bytes to an RGB PIL image or raise InvalidArgument naming field."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidArgument(field, "image is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(
            field, f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes"
        )
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidArgument(
                    field,
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{limits.max_pixels} pixels",
                )
            if max(width, height) > limits.max_side or min(width, height) < 1:
                raise InvalidArgument(
                    field,
                    f"image is {width}x{height}; each side must be 1 to {limits.max_side} pixels",
                )
            image.seek(0)
            image.load()
            return image.convert("RGB")
    except InvalidArgument:
        raise
    except Image.DecompressionBombError:
        raise InvalidArgument(
            field, f"image has far more pixels than the limit of {limits.max_pixels} pixels"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidArgument(
            field, f"cannot decode image (accepted formats: {', '.join(ALLOWED_FORMATS)})"
        ) from None
