"""Image decode / resize / encode for preparation, and decode for training."""

from __future__ import annotations

import io

from PIL import Image, ImageOps

RESIZE_MODES = ("pad", "crop")


def load_resized(path: str, size: int, mode: str = "pad") -> Image.Image:
    """Open an image (JPEG/PNG, any bit depth) as 8-bit grayscale ``size`` x ``size``.

    ``pad`` keeps the whole film (aspect kept, black borders); ``crop`` fills the square and
    cuts the long side's edges. Raises OSError/ValueError for a missing or undecodable file.
    """
    with Image.open(path) as im:
        # JPEG DCT scaling: decode directly at >= the target size (several times faster).
        im.draft("L", (size, size))
        im.load()
        if im.mode in ("I;16", "I;16B", "I"):  # 16-bit PNGs: scale to 8 bits by the data range
            im = im.point(lambda v: v * (1 / 256)).convert("L")
        else:
            im = im.convert("L")
        if mode == "crop":
            return ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
        if mode != "pad":
            raise ValueError(f"resize mode {mode!r} is invalid; allowed: {' | '.join(RESIZE_MODES)}")
        return ImageOps.pad(im, (size, size), method=Image.Resampling.BILINEAR, color=0)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
