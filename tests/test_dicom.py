"""DICOM wherever images are read (issue 14): modality and VOI LUTs, MONOCHROME1 inversion, any
bit depth, and a reject with its reason (never a crash) for a DICOM that cannot be used."""

from __future__ import annotations

import numpy as np
import pytest

from components.data.images import ImageRejected, load_gray, read_or_reason

from . import formats


def gray(src) -> np.ndarray:
    return np.asarray(load_gray(src), np.int16)


def test_a_12_bit_dicom_uses_its_whole_range_and_monochrome1_is_inverted(tmp_path):
    film = formats.film12()
    plain = gray(formats.dicom_bytes(film, photometric="MONOCHROME2"))
    assert plain.min() == 0 and plain.max() == 255  # 12 bits scaled by their range, not by 65536
    inverted = gray(formats.dicom_bytes(4095 - film, photometric="MONOCHROME1"))
    assert np.abs(inverted - plain).max() <= 1  # white = low values: shown the same way up
    path = formats.write_dicom(tmp_path / "a.dcm", film)
    assert np.array_equal(gray(str(path)), plain)  # a file and its bytes read the same
    deep = gray(formats.dicom_bytes((film.astype(np.uint32) * 16).astype(np.uint16), bits_stored=16))
    assert np.abs(deep - plain).max() <= 1  # any bit depth


def test_the_voi_window_is_applied_as_a_viewer_shows_it():
    film = formats.film12()
    windowed = gray(formats.dicom_bytes(film, window=(1000, 400)))  # 800..1200 spans black..white
    assert (windowed == 0).mean() > 0.05 and (windowed == 255).mean() > 0.3
    assert not np.array_equal(windowed, gray(formats.dicom_bytes(film)))


@pytest.mark.parametrize(
    "kw,reason",
    [
        ({"pixel_data": False}, "DICOM without pixel data"),
        ({"syntax": "1.2.840.10008.1.2.4.90"}, "DICOM pixel data in JPEG 2000"),  # no JPEG 2000 decoder here
    ],
)
def test_an_unusable_dicom_is_a_reject_with_its_reason(tmp_path, kw, reason):
    data = formats.dicom_bytes(formats.film12(), **kw)
    with pytest.raises(ImageRejected, match=reason):
        load_gray(data)
    path = tmp_path / "bad.dcm"
    path.write_bytes(data)
    image, why = read_or_reason(str(path), 32)
    assert image is None and why.startswith(reason)
    image, why = read_or_reason(b"\0" * 128 + b"DICM" + b"garbage", 32)
    assert image is None and why == "DICOM without pixel data (no PixelData element)"  # a header, nothing else


def test_prepare_reads_a_folder_of_dicom_files(tmp_path):
    from components.data.manifest import Manifest
    from components.data.prepare import PrepareOptions, prepare_dataset

    formats.cxr_lt_2023(tmp_path / "src", as_dicom=True)
    opts = PrepareOptions("cxr-lt-2023", str(tmp_path / "src"), image_size=32, rows_per_shard=4)
    summary = prepare_dataset(opts, tmp_path / "data", log=lambda *_: None)
    manifest = Manifest.load(tmp_path / "data")
    assert manifest.split("train").num_images + manifest.split("val").num_images == 9, summary
