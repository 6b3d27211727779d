"""Decode uploaded bytes exactly like the dataset loader decodes files, behind size and format limits."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgcls.data.images import decode_pixels


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
    """Open the header (decoding comes later, at the storage size) or raise UploadError
    (413 too big, 415 not an allowed image, 400 corrupt)."""
    if not data:
        raise UploadError(400, f"{name}: empty file (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise UploadError(413, f"{name}: {len(data):,} bytes exceeds the {limits.max_file_bytes:,}-byte limit")
    image = _as_upload_error(name, lambda: Image.open(io.BytesIO(data)))
    if image.format not in limits.formats:
        raise UploadError(415, f"{name}: {image.format} images are not accepted "
                               f"(allowed: {', '.join(limits.formats)})")
    if image.width * image.height > limits.max_pixels:
        raise UploadError(413, f"{name}: {image.width}x{image.height} pixels exceeds the "
                               f"{limits.max_pixels:,}-pixel limit")
    return image


def _as_upload_error(name: str, step):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step()
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"{name}: too many pixels (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(400, f"{name}: truncated or corrupt image ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - plugins parsing hostile bytes raise struct/zlib/index errors too
        raise UploadError(400, f"{name}: corrupt image ({type(exc).__name__}: {exc})") from None


def decode_upload(data: bytes, name: str, channels: int, size: tuple[int, int],
                  limits: UploadLimits, policy: str = "squash") -> np.ndarray:
    """HxWxC uint8 at the training data's storage layout through data.images.decode_pixels, the
    dataset loader's own decode, so answers match batch predict. `policy`: the run's resize policy
    (squash for runs recorded before the policy was)."""
    image = open_upload(data, name, limits)
    return _as_upload_error(name, lambda: decode_pixels(image, channels, tuple(size), policy))
