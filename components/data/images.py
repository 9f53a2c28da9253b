"""Image decode / resize / encode for preparation and prediction.

Every source image becomes 8-bit grayscale: 8-bit images as they are, 16-bit and 32-bit integer
and float images scaled by their actual range (a 12-bit film stored in a 16-bit PNG uses 0..4095,
so dividing by 256 would leave it near black), colour and alpha dropped. Images too small, too
thin or too large are refused with the reason (``ImageRejected``), not decoded blindly.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("pad", "crop")
MIN_SIDE = 32  # px: smaller is not a radiograph (icons, placeholders, 1x1 pixels)
MAX_ASPECT = 8.0  # longest / shortest side: a thinner image is a strip, not a film
MAX_PIXELS = 100_000_000  # refused before decoding (PIL's own bomb limit is ~179 MP)


class ImageRejected(ValueError):
    """An image that decodes but is not usable; the message is the reason."""


def check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageRejected(f"too large: {width}x{height} px (limit {MAX_PIXELS // 1_000_000} megapixels)")
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(f"too small: {width}x{height} px (at least {MIN_SIDE} px a side)")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageRejected(f"degenerate shape: {width}x{height} px (aspect ratio above {MAX_ASPECT:g})")


def to_gray8(im: Image.Image) -> Image.Image:
    """8-bit grayscale; deeper images scaled by their actual min..max range."""
    if im.mode in ("L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "1"):
        return im.convert("L")
    a = np.asarray(im, dtype=np.float64)  # I;16, I;16B, I, F: one channel of any depth
    if a.ndim == 3:
        a = a.mean(axis=2)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = np.zeros_like(a) if hi <= lo else (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def load_gray(path: str, draft_size: int | None = None) -> Image.Image:
    """Open an image file as 8-bit grayscale after the size checks. ``draft_size`` lets a JPEG
    decode directly at >= that size (DCT scaling: several times faster)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        try:
            with Image.open(path) as im:
                check_size(*im.size)
                if draft_size:
                    im.draft("L", (draft_size, draft_size))
                im.load()
                return to_gray8(im)
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"too large: {exc}") from None


def fit_square(im: Image.Image, size: int, mode: str = "pad") -> Image.Image:
    """``pad`` keeps the whole film (aspect kept, black borders); ``crop`` fills the square and
    cuts the long side's edges."""
    if mode == "crop":
        return ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
    if mode != "pad":
        raise ValueError(f"resize mode {mode!r} is invalid; allowed: {' | '.join(RESIZE_MODES)}")
    return ImageOps.pad(im, (size, size), method=Image.Resampling.BILINEAR, color=0)


def load_resized(path: str, size: int, mode: str = "pad") -> Image.Image:
    """An image file as 8-bit grayscale ``size`` x ``size``. Raises FileNotFoundError, ImageRejected
    (with the reason) or OSError/ValueError for an undecodable file."""
    gray = load_gray(path, size)
    out = fit_square(gray, size, mode)
    out.info["upscaled"] = max(gray.size) < size  # drafting never goes below ``size``: it was smaller
    return out


def read_or_reason(path: str, size: int, mode: str = "pad", root: str | None = None):
    """(8-bit ``size`` x ``size`` image, "") or (None, why it cannot be used). ``root``: the real
    path of the dataset root, which a file reached through a link must not leave."""
    import os

    if root is not None:
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            return None, f"outside the dataset root (a link to {real})"
    try:
        return load_resized(path, size, mode), ""
    except FileNotFoundError:
        return None, "missing file"
    except ImageRejected as exc:
        return None, str(exc)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / undecodable
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"undecodable: {type(exc).__name__}: {first}".rstrip(": ")


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
