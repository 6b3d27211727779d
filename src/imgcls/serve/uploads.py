"""Decode uploaded bytes exactly like the dataset loader decodes files, behind size and format limits."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgcls.data.images import to_array


@dataclass(frozen=True)
class UploadLimits:
    """What one request may carry; defaults sized for photos, far above any classifier input."""

    max_file_bytes: int = 8 * 1024 * 1024
    max_request_bytes: int = 32 * 1024 * 1024
    max_files: int = 32
    max_pixels: int = 4096 * 4096  # 16.7 Mpx: larger is almost surely a mistake or a decompression bomb
    formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")

    def to_json(self) -> dict:
        return {"max_file_bytes": self.max_file_bytes, "max_request_bytes": self.max_request_bytes,
                "max_files": self.max_files, "max_pixels": self.max_pixels, "formats": list(self.formats)}


class UploadError(Exception):
    """A rejected upload: HTTP status and one line naming the file."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def open_upload(data: bytes, name: str, limits: UploadLimits) -> Image.Image:
    """Fully decode the bytes or raise UploadError (413 too big, 415 not an allowed image, 400 corrupt)."""
    if not data:
        raise UploadError(400, f"{name}: empty file (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise UploadError(413, f"{name}: {len(data):,} bytes exceeds the {limits.max_file_bytes:,}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in limits.formats:
                raise UploadError(415, f"{name}: {image.format} images are not accepted "
                                       f"(allowed: {', '.join(limits.formats)})")
            if image.width * image.height > limits.max_pixels:
                raise UploadError(413, f"{name}: {image.width}x{image.height} pixels exceeds the "
                                       f"{limits.max_pixels:,}-pixel limit")
            image.load()
        return image
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"{name}: too many pixels (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(400, f"{name}: truncated or corrupt image ({exc})") from None


def decode_upload(data: bytes, name: str, channels: int, size: tuple[int, int],
                  limits: UploadLimits) -> np.ndarray:
    """HxWxC uint8 at the training data's layout; mirrors data.images.load_image so answers match batch predict."""
    image = open_upload(data, name, limits)
    if (image.height, image.width) != tuple(size):
        if image.mode not in ("L", "RGB", "RGBA"):
            array = to_array(image, channels)
            image = Image.fromarray(array[:, :, 0] if channels == 1 else array)
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return to_array(image, channels)
