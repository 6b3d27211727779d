"""Decode one image file to a uint8 array, with errors that name the file instead of PIL tracebacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgcls.errors import DataError

# Refuse decompression bombs: 64 Mpx is far beyond any classifier input, and PIL's own
# limit only warns below twice its value.
MAX_PIXELS = 64_000_000


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Convert any PIL mode to HxWxC uint8 with C = 1 (grey) or 3 (RGB)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode.startswith("I;16") or data.max(initial=0) > 255 else 255
        grey = (data.clip(0, peak) * 255 // peak).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    elif image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, the usual background of product photos.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    array = np.asarray(image.convert(target), dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def open_image(path: Path, location: str = "") -> Image.Image:
    """Open and fully decode an image; any failure becomes a DataError naming the file."""
    label = location or str(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{label}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"{label}: {image.width}x{image.height} pixels exceeds the "
                                f"{MAX_PIXELS:,}-pixel limit (possible decompression bomb)")
            image.load()
        return image
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{label}: image file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{label}: too many pixels, possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{label}: truncated or corrupt image ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - plugins parsing hostile bytes raise struct/zlib/index errors too
        raise DataError(f"{label}: corrupt image ({type(exc).__name__}: {exc})") from None


def image_channels(image: Image.Image) -> int:
    """1 for greyscale modes, 3 for everything else."""
    return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else 3


def load_image(path: Path, channels: int, size: tuple[int, int] | None, location: str = "") -> np.ndarray:
    """Decode, convert to `channels` and resize to `size` (H, W) when given."""
    image = open_image(path, location)
    if size is not None and (image.height, image.width) != tuple(size):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = Image.fromarray(to_array(image, channels)[:, :, 0] if channels == 1
                                    else to_array(image, channels))
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return to_array(image, channels)
