"""Decode one image to a uint8 array at the storage size: one function for files and uploads alike.

`decode_pixels` is the only place pixels are made: the dataset cache (train, evaluate, predict)
and the server's uploads both call it, so a model sees the same pixels everywhere. Errors name
the file instead of surfacing PIL tracebacks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.config import RESIZE_POLICIES
from imgcls.errors import DataError, OptionError

# Refuse decompression bombs: 64 Mpx is far beyond any classifier input, and PIL's own
# limit only warns below twice its value.
MAX_PIXELS = 64_000_000

# How an image of another shape is fitted to the storage shape (fastai's names):
# crop = scale the shorter side to fit, cut the centre; squash = scale each side, aspect lost;
# pad = scale the longer side to fit, pad the rest with black.
DEFAULT_RESIZE = "crop"

# JPEG decodes at 1/2, 1/4 or 1/8 scale for a fraction of the cost of a full decode. A reduced
# decode may come out this much below the resized size (then it is scaled up by at most 1/0.85),
# so that 500x375 photos decode at 1/4 scale (125x94) for a 110-px storage side, not at 1/2.
DRAFT_MIN_FRACTION = 0.85

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def check_resize(policy: str) -> str:
    if policy not in RESIZE_POLICIES:
        raise OptionError(f"unknown resize policy {policy!r}; valid: {', '.join(RESIZE_POLICIES)}")
    return policy


def image_channels(image: Image.Image) -> int:
    """1 for greyscale modes, 3 for everything else."""
    return 1 if image.mode in GREY_MODES else 3


def displayed(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images scaled to the 0-255 range a viewer shows; transparency on white."""
    if image.mode == "F":
        data = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        # Float images are in [0, 1] by convention (scientific TIFFs); larger values are read as 0-255.
        scale = 255.0 if data.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.rint(data.clip(0, 255 / scale) * scale).astype(np.uint8), mode="L")
    if image.mode.startswith("I"):
        data = np.asarray(image, dtype=np.int64)
        peak = 65535 if image.mode.startswith("I;16") or data.max(initial=0) > 255 else 255
        return Image.fromarray((data.clip(0, peak) * 255 // peak).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, the usual background of product photos.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Convert any PIL mode to HxWxC uint8 with C = 1 (grey) or 3 (RGB)."""
    array = np.asarray(displayed(image).convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def resize_plan(width: int, height: int, size: tuple[int, int], policy: str
                ) -> tuple[tuple[int, int], tuple[float, float, float, float], tuple[int, int]]:
    """(resized width, height), the source box it is taken from, and its offset on the canvas."""
    out_h, out_w = size
    if policy == "squash":
        return (out_w, out_h), (0, 0, width, height), (0, 0)
    if policy == "crop":
        scale = max(out_w / width, out_h / height)
        box_w, box_h = out_w / scale, out_h / scale
        left, top = (width - box_w) / 2, (height - box_h) / 2
        return (out_w, out_h), (left, top, left + box_w, top + box_h), (0, 0)
    scale = min(out_w / width, out_h / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return (new_w, new_h), (0, 0, width, height), ((out_w - new_w) // 2, (out_h - new_h) // 2)


def turned_sideways(image: Image.Image) -> bool:
    """EXIF orientations 5-8 swap width and height (read from the header, never decoding pixels)."""
    return has_orientation_tag(image) and image.getexif().get(0x0112, 1) in (5, 6, 7, 8)


def request_draft(image: Image.Image, size: tuple[int, int], policy: str) -> None:
    """Ask a JPEG for a reduced-scale decode that still covers the resized size (no-op elsewhere)."""
    if image.format != "JPEG":
        return
    turned = turned_sideways(image)
    width, height = (image.height, image.width) if turned else image.size
    (new_w, new_h), box, _ = resize_plan(width, height, size, policy)
    need_w = new_w * width / (box[2] - box[0]) * DRAFT_MIN_FRACTION
    need_h = new_h * height / (box[3] - box[1]) * DRAFT_MIN_FRACTION
    if turned:
        need_w, need_h = need_h, need_w
    if need_w * 2 <= image.width and need_h * 2 <= image.height:
        image.draft(image.mode, (max(1, int(need_w)), max(1, int(need_h))))


def fit(image: Image.Image, channels: int, size: tuple[int, int] | None, policy: str) -> np.ndarray:
    """A decoded, upright image as HxWxC uint8 at `size` (H, W) by the resize policy."""
    if size is None or (image.height, image.width) == tuple(size):
        return to_array(image, channels)
    image = displayed(image).convert("L" if channels == 1 else "RGB")
    (new_w, new_h), box, (left, top) = resize_plan(image.width, image.height, size, policy)
    image = image.resize((new_w, new_h), Image.BILINEAR, box=box)
    if (new_h, new_w) != tuple(size):
        canvas = Image.new(image.mode, (size[1], size[0]), 0)
        canvas.paste(image, (left, top))
        image = canvas
    return to_array(image, channels)


def decode_pixels(image: Image.Image, channels: int, size: tuple[int, int] | None,
                  policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """An opened (not yet loaded) image -> upright HxWxC uint8 at `size`: the one decode path."""
    if size is not None:
        request_draft(image, size, policy)
    image.load()
    if has_orientation_tag(image):
        image = ImageOps.exif_transpose(image)
    return fit(image, channels, size, policy)


def has_orientation_tag(image: Image.Image) -> bool:
    """Whether EXIF data (or TIFF tags) may rotate the image; cheap: PNG's getexif() would decode it."""
    return image.format == "TIFF" or "exif" in image.info


def open_lazily(path: Path, label: str) -> Image.Image:
    """Open the header only, refusing empty files and decompression bombs."""
    if path.stat().st_size == 0:
        raise DataError(f"{label}: empty file (0 bytes)")
    image = Image.open(path)
    if image.width * image.height > MAX_PIXELS:
        raise DataError(f"{label}: {image.width}x{image.height} pixels exceeds the "
                        f"{MAX_PIXELS:,}-pixel limit (possible decompression bomb)")
    return image


def decode_errors(label: str, step):
    """Run step() and turn every decoding failure into one DataError line naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step()
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


def open_image(path: Path, location: str = "") -> Image.Image:
    """Open and fully decode an image; any failure becomes a DataError naming the file."""
    def step() -> Image.Image:
        image = open_lazily(path, location or str(path))
        image.load()
        return image
    return decode_errors(location or str(path), step)


def load_image(path: Path, channels: int, size: tuple[int, int] | None, location: str = "",
               policy: str = DEFAULT_RESIZE) -> np.ndarray:
    """Decode a file to `channels` at `size` (H, W) by the resize policy, upright per its EXIF tag."""
    label = location or str(path)

    def step() -> np.ndarray:
        with open_lazily(path, label) as image:
            return decode_pixels(image, channels, size, policy)
    return decode_errors(label, step)
