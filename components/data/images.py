"""Image decode / resize / encode for preparation, prediction and serving.

Sources are files or their bytes: PNG, JPEG (anything PIL reads) or DICOM. Every source image
becomes 8-bit grayscale: 8-bit images as they are, 16-bit and 32-bit integer
and float images scaled by their actual range (a 12-bit film stored in a 16-bit PNG uses 0..4095,
so dividing by 256 would leave it near black), colour and alpha dropped. Images too small, too
thin or too large are refused with the reason (``ImageRejected``), not decoded blindly. DICOM
pixels go through the modality LUT (rescale slope/intercept) and the VOI LUT (window) as a viewer
shows them, MONOCHROME1 (white = low values) is inverted, then range-scaled like any deep image;
a DICOM without pixel data or in a transfer syntax that cannot be decoded here is a reject.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def is_dicom(head: bytes, name: str = "") -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble; bare datasets only a suffix."""
    return head[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _head(src) -> bytes:
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src[:132])
    with open(src, "rb") as f:
        return f.read(132)


def dicom_gray8(src) -> Image.Image:
    """A DICOM file (path or bytes) as 8-bit grayscale, as a viewer displays it."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(bytes(src)) if not isinstance(src, str) else src, force=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a reject with its reason
        raise ImageRejected(f"not a readable DICOM file: {type(exc).__name__}: {str(exc)[:200]}") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageRejected("DICOM without pixel data (no PixelData element)")
    check_size(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)))
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        a = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - no decoder for this syntax, truncated data, ...
        what = f"{syntax.name} ({syntax})" if syntax else "an unknown transfer syntax"
        raise ImageRejected(
            f"DICOM pixel data in {what} cannot be decoded: {' '.join(str(exc).split())[:240]}"
        ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        a = a[0]  # a multi-frame object: its first frame
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if a.ndim == 3:  # colour (RGB after pydicom's conversion): luminance, no LUTs apply
        a = a.astype(np.float64).mean(axis=2)
    else:
        a = apply_voi_lut(apply_modality_lut(a, ds), ds).astype(np.float64)
        if photometric == "MONOCHROME1":  # white is the lowest value: invert, so bone is bright
            a = a.max() + a.min() - a
    return to_gray8(Image.fromarray(a.astype(np.float32), mode="F"))


def load_gray(src, draft_size: int | None = None) -> Image.Image:
    """Open an image (a path, or the file's bytes) as 8-bit grayscale after the size checks.
    ``draft_size`` lets a JPEG decode directly at >= that size (DCT scaling: several times faster)."""
    if is_dicom(_head(src), src if isinstance(src, str) else ""):
        return dicom_gray8(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        try:
            with Image.open(src if isinstance(src, str) else io.BytesIO(bytes(src))) as im:
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


def load_resized(src, size: int, mode: str = "pad") -> Image.Image:
    """An image (a path, or the file's bytes) as 8-bit grayscale ``size`` x ``size``. Raises
    FileNotFoundError, ImageRejected (with the reason) or OSError/ValueError for an undecodable file."""
    gray = load_gray(src, size)
    out = fit_square(gray, size, mode)
    out.info["upscaled"] = max(gray.size) < size  # drafting never goes below ``size``: it was smaller
    return out


def read_or_reason(path, size: int, mode: str = "pad", root: str | None = None):
    """(8-bit ``size`` x ``size`` image, "") or (None, why it cannot be used), for a path or the
    file's bytes. ``root``: the real path of the dataset root, which a file reached through a link
    must not leave."""
    import os

    if root is not None and isinstance(path, str):
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            return None, f"outside the dataset root (a link to {real})"
    try:
        return load_resized(path, size, mode), ""
    except FileNotFoundError:
        return None, "missing file"
    except ImageRejected as exc:
        return None, str(exc)
    except UnidentifiedImageError:
        return None, "undecodable: not a known image format (PNG, JPEG, DICOM, ...)"
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / undecodable
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"undecodable: {type(exc).__name__}: {first}".rstrip(": ")


def square_gray8(image, size: int, mode: str = "pad"):
    """A uint8 array (H, W) or (1, H, W) of any size as the ``size`` x ``size`` uint8 array that
    the same pixels read from a file would give (the same PIL resize as prepare and predict)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ImageRejected(f"pixel arrays must be uint8 (0..255), got {a.dtype}")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ImageRejected(f"pixel arrays must be (H, W) or (1, H, W), got shape {a.shape}")
    if a.shape == (size, size):
        return a
    check_size(a.shape[1], a.shape[0])
    return np.asarray(fit_square(Image.fromarray(a, mode="L"), size, mode), np.uint8)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def encode_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    pixel_data: bool = True,
    syntax: str | None = None,
    window: tuple[float, float] | None = None,
) -> bytes:
    """A DICOM Part 10 file of ``pixels``, as a modality writes one: 16-bit words holding
    ``bits_stored`` bits (for tests and benches: DICOM test files, made here, not downloaded).
    ``syntax``: a compressed transfer syntax UID, for which the pixels are only encapsulated."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data and syntax:  # a compressed syntax: one frame, encapsulated (its codestream is not checked here)
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([pixels.astype("<u2").tobytes()])
        ds["PixelData"].VR = "OB"
    elif pixel_data:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
