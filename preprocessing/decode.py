"""Decode any supported radiograph into one canonical grey form.

Canonical form: a 2-D ``uint8`` array, MONOCHROME2 (bone bright, air dark).

- PNG, JPEG, TIFF (8- or 16-bit, grey or colour) through OpenCV
  (``cv2.IMREAD_UNCHANGED``, so 16-bit data keep their depth until we map them);
  colour images become grey with OpenCV's luma weights.
- DICOM through pydicom: the modality LUT (RescaleSlope/RescaleIntercept or a
  Modality LUT Sequence) is applied, then the VOI LUT or window (WindowCenter /
  WindowWidth) when the file has one; MONOCHROME1 is inverted so bone is bright.
  Only pixels are read: no header value (names, ids, dates) leaves this module,
  apart from the image laterality that ``dicom_laterality`` returns on request.

Depth mapping (documented contract): an array that is already ``uint8`` is kept
as is. Any other array (16-bit, signed, float, or
rescaled DICOM values) is mapped linearly from its own minimum..maximum onto
0..255 and rounded: ``round((v - min) * 255 / (max - min))``. A constant image
maps to all zeros. MONOCHROME1 images are then inverted (``255 - v``).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from preprocessing.errors import FsweepError

DICOM_SUFFIXES = {".dcm", ".dicom"}
DICOM_MAGIC_OFFSET = 128  # DICOM Part 10 files carry b"DICM" after a 128-byte preamble


def decode_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to a 2-D uint8 MONOCHROME2 array; raises FsweepError("<path>: <reason>")."""
    path = Path(path)
    if not path.is_file():
        raise FsweepError(f"{path}: file not found")
    try:
        if is_dicom(path):
            return _decode_dicom(path)
        return _decode_raster(path)
    except OSError as exc:  # e.g. no read permission: the manifest contract rejects the row, it does not crash
        raise FsweepError(f"{path}: unreadable file ({exc.strerror or type(exc).__name__})") from None


def is_dicom(path: Path) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file with the DICOM Part 10 magic bytes."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as handle:
        handle.seek(DICOM_MAGIC_OFFSET)
        return handle.read(4) == b"DICM"


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Keep uint8 as is; map anything else linearly from its min..max onto 0..255 (see module doc)."""
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_grey(values: np.ndarray, path: Path, order: str) -> np.ndarray:
    """Collapse a colour array (``order`` 'bgr' from OpenCV, 'rgb' from pydicom) to one channel."""
    if values.ndim == 2:
        return values
    if values.ndim == 3 and values.shape[2] in (3, 4):
        code = {
            ("bgr", 3): cv2.COLOR_BGR2GRAY, ("bgr", 4): cv2.COLOR_BGRA2GRAY,
            ("rgb", 3): cv2.COLOR_RGB2GRAY, ("rgb", 4): cv2.COLOR_RGBA2GRAY,
        }[(order, values.shape[2])]
        if values.dtype not in (np.uint8, np.uint16, np.float32):
            values = values.astype(np.float32)
        return cv2.cvtColor(values, code)
    raise FsweepError(f"{path}: unsupported pixel array shape {values.shape}")


def _decode_raster(path: Path) -> np.ndarray:
    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if values is None or values.size == 0:
        raise FsweepError(f"{path}: not a decodable PNG, JPEG or TIFF image")
    return to_uint8(_to_grey(values, path, "bgr"))


def _decode_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(path, force=True)  # force: older files lack the Part 10 preamble
        stored = dataset.pixel_array
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        # malformed rescale/window values fail here, inside the try, so they reject the row too
        values = stored if stored.ndim == 3 else apply_voi_lut(apply_modality_lut(stored, dataset), dataset)
    except Exception as exc:  # pydicom raises many types for broken files; the reason is what matters
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise FsweepError(f"{path}: not a decodable DICOM image ({type(exc).__name__}: {reason})") from None
    if frames > 1:
        raise FsweepError(f"{path}: multi-frame DICOM is not supported (one radiograph per file)")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if stored.ndim == 3:
        return to_uint8(_to_grey(stored, path, "rgb"))
    grey = to_uint8(values)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def dicom_laterality(path: str | Path) -> str | None:
    """'left' / 'right' from the ImageLaterality or Laterality tag of a DICOM file, else None."""
    import pydicom

    path = Path(path)
    if not path.is_file() or not is_dicom(path):
        return None
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # an unreadable header simply has no laterality
        return None
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(dataset.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return "left" if value == "L" else "right"
    return None
