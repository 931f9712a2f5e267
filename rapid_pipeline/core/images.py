"""The one image decoder. Every image any stage reads goes through `decode_image`.

Guards, in order, before any pixel is decoded: byte cap, format allowlist (from the header),
pixel count from the header (decompression-bomb guard). Then: full decode (a truncated file is
an error, never silently padded), EXIF orientation applied, and every mode (CMYK, 16-bit, palette,
alpha, greyscale) converted to 8-bit RGB (alpha composited on white).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 << 20
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    min_side: int = 1
    max_aspect: float = float("inf")


class ImageRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise ImageRejected("empty_image")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_many_bytes", f"{len(data)} > {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own header check fires first for > ~89 MP: same reason as our pixel cap.
        raise ImageRejected("too_many_pixels", str(exc)[:200]) from exc
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning, SyntaxError, ValueError) as exc:
        raise ImageRejected("undecodable", str(exc)[:200]) from exc
    if img.format not in limits.formats:
        raise ImageRejected("format_not_allowed", str(img.format))
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h} > {limits.max_pixels}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes → validated 8-bit RGB image, or `ImageRejected` with a reason code."""
    img = _open_header(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("undecodable", str(exc)[:200]) from exc
    w, h = img.size
    if min(w, h) < limits.min_side:
        raise ImageRejected("too_small", f"{w}x{h} < {limits.min_side}")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageRejected("bad_aspect", f"{w}x{h} > {limits.max_aspect}")
    return img
