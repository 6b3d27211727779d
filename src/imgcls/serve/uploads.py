"""Decode uploaded bytes exactly like the dataset loader decodes files, behind size and format limits."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header  # imgcls[serve]; what Starlette reads headers with

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


def header_text(raw: bytes | None) -> str | None:
    """A header parameter as Starlette's form parser decodes it: UTF-8, else Latin-1."""
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def multipart_parts(body: bytes, content_type: str, max_parts: int) -> list[tuple[str | None, str | None, bytes]]:
    """(field name, filename or None for a text field, content) for each part of a multipart/form-data
    body, already whole in memory (the server caps its size first). Slicing the bytes in place costs a
    fraction of a streaming parser's per-part objects and temporary files (README, "Serving"); a
    malformed body is a 400, more than `max_parts` parts a 413 (found before the rest is parsed)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise UploadError(400, "multipart/form-data without a (valid) boundary parameter")
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        position = len(delimiter)
    else:  # a preamble before the first delimiter, which then follows a line break
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise UploadError(400, "malformed multipart body: the boundary never appears")
        position = found + 2 + len(delimiter)
    parts, closing = [], b"\r\n" + delimiter
    while not body.startswith(b"--", position):
        if len(parts) == max_parts:
            raise UploadError(413, f"more than {max_parts} parts in one request; the limit is {max_parts} files")
        line_end = body.find(b"\r\n", position)
        head_end = body.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0 or body[position:line_end].strip():
            raise UploadError(400, "malformed multipart body: a part has no header block")
        end = body.find(closing, head_end + 4)
        if end < 0:
            raise UploadError(400, "malformed multipart body: a part is not closed by the boundary")
        disposition = b""
        for line in body[line_end + 2:head_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-disposition":
                disposition = value.strip()
        fields = parse_options_header(disposition)[1]
        parts.append((header_text(fields.get(b"name")), header_text(fields.get(b"filename")), body[head_end + 4:end]))
        position = end + len(closing)
    return parts
