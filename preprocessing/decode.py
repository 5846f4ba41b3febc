"""Decode any supported radiograph into one canonical grey form.

Canonical form: a 2-D ``uint8`` array, MONOCHROME2 (bone bright, air dark).

- PNG, JPEG, TIFF (8- or 16-bit, grey or colour) through OpenCV
  (``cv2.IMREAD_UNCHANGED``, so 16-bit data keep their depth until we map them);
  colour images become grey with OpenCV's luma weights.
- DICOM through pydicom and its decoder plugins (pylibjpeg with libjpeg, openjpeg
  and RLE; GDCM): uncompressed, RLE, JPEG baseline, extended (12-bit), lossless,
  JPEG-LS and JPEG 2000. When every pydicom plugin refuses a grey image, GDCM is
  asked directly: it reads 12-bit JPEG streams with a misplaced marker that pydicom
  will not hand it (they decode to within 1 grey level of libjpeg's result).
  A file without the Part 10 meta header is read when pydicom can parse it (its
  transfer syntax is the encoding pydicom found). The modality LUT
  (RescaleSlope/RescaleIntercept or a Modality LUT Sequence) is applied, then the
  VOI LUT or window (WindowCenter / WindowWidth) when the file has one;
  MONOCHROME1 is inverted so bone is bright; PALETTE COLOR goes through its palette.
  Only pixels are read: no header value (names, ids, dates) leaves this module,
  apart from what ``dicom_laterality`` and ``read_dicom_header`` return on request.

Depth mapping (documented contract): an array that is already ``uint8`` is kept
as is. Any other array (16-bit, signed, float, or
rescaled DICOM values) is mapped linearly from its own minimum..maximum onto
0..255 and rounded: ``round((v - min) * 255 / (max - min))``. A constant image
maps to all zeros. MONOCHROME1 images are then inverted (``255 - v``).

A file that cannot become one radiograph raises ``DecodeError``: ``kind`` is a short
plain reason (``no pixel data``, ``truncated file``, ``multi-frame``, ``no decoder``,
``not a DICOM file``, ``undecodable image`` ...) and ``detail`` says more in plain
words, never a Python exception's text. Library warnings (pydicom, numpy) and what
C decoders write to stderr are recorded per file, not printed: ``decode_with_warnings``
returns them, ``DecodeError.warnings`` carries them.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from cluster.errors import FsweepError
from preprocessing.vocab import VIEW_ALIASES

DICOM_SUFFIXES = {".dcm", ".dicom"}
DICOM_MAGIC_OFFSET = 128  # DICOM Part 10 files carry b"DICM" after a 128-byte preamble
META_START = DICOM_MAGIC_OFFSET + 4 + 12  # preamble, "DICM", then the 12-byte group length element
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# a parsed data set with none of these is not DICOM, whatever pydicom made of the bytes
DICOM_MARKERS = ("SOPClassUID", "Modality", "PatientID", "StudyInstanceUID", "Rows", *PIXEL_KEYWORDS)
PIXEL_MODULE = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PhotometricInterpretation",
                "PixelRepresentation")


class DecodeError(FsweepError):
    """A file that does not give one radiograph: ``kind`` is counted by ingest, ``detail`` explains."""

    def __init__(self, path: Path, kind: str, detail: str = ""):
        super().__init__(f"{path}: {kind}: {detail}" if detail else f"{path}: {kind}")
        self.path, self.kind, self.detail = path, kind, detail
        self.warnings: list[str] = []  # what the libraries said while trying; filled by decode_with_warnings

    def __reduce__(self):
        # Ray and multiprocessing pickle exceptions; the default rebuilds them from the message alone
        return (type(self), (self.path, self.kind, self.detail), {"warnings": self.warnings})


def decode_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to a 2-D uint8 MONOCHROME2 array; raises DecodeError("<path>: <reason>")."""
    return decode_with_warnings(path)[0]


def decode_with_warnings(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``decode_image`` plus the warnings heard while decoding (one text each; nothing is printed)."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "file not found")
    heard: list[str] = []
    try:
        with _quiet(heard) as caught:
            pixels = _decode(path, caught)
    except DecodeError as exc:
        exc.warnings = heard
        raise
    except OSError as exc:  # e.g. no read permission: the manifest contract rejects the row, it does not crash
        error = DecodeError(path, "unreadable file", exc.strerror or "no permission or I/O failure")
        error.warnings = heard
        raise error from None
    return pixels, heard


@contextmanager
def _quiet(heard: list[str]):
    """Record Python warnings and C decoders' stderr lines into ``heard`` instead of the terminal.

    Yields the live list of caught warnings so a reader can look at them before the block ends.
    """
    with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryFile() as sink:
        warnings.simplefilter("always")
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)  # openjpeg and GDCM print from C, below Python's warnings
        try:
            yield caught
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            heard.extend(str(w.message).splitlines()[0] for w in caught if str(w.message))
            sink.seek(0)
            heard.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def is_dicom(path: Path) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file with the DICOM Part 10 magic bytes."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return _has_magic(path)


def _has_magic(path: Path) -> bool:
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
    raise DecodeError(path, "undecodable image", f"unsupported pixel array shape {values.shape}")


def _decode(path: Path, caught: list) -> np.ndarray:
    """DICOM by name or magic; else a raster image; else a DICOM file written without its header."""
    if is_dicom(path):
        dataset = _read_dicom(path, caught)
        if dataset is None:
            raise DecodeError(path, "not a DICOM file")
        return _decode_dicom(path, dataset)
    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if values is not None and values.size:
        return to_uint8(_to_grey(values, path, "bgr"))
    dataset = _read_dicom(path, caught)
    if dataset is None:
        raise DecodeError(path, "undecodable image", "not a decodable PNG, JPEG or TIFF image, nor DICOM")
    return _decode_dicom(path, dataset)


def _read_dicom(path: Path, caught: list):
    """The whole data set (force: older files lack the Part 10 header), or None when the bytes are not DICOM."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, force=True)
    except OSError:
        raise
    except Exception:  # pydicom raises many types for bytes it cannot parse; the file is what matters
        dataset = None
    magic = _has_magic(path)
    # pydicom makes some data set of any bytes: without the DICM marker, only known elements make it DICOM
    plausible = dataset is not None and (_has_elements(dataset) if magic else
                                         _names_dicom(dataset))
    if not (plausible or magic):
        return None
    if _truncated(path, dataset, caught):
        raise DecodeError(path, "truncated file", "the file ends before its last data element does")
    if not plausible:  # the DICM marker says DICOM, but nothing after it can be read
        raise DecodeError(path, "undecodable image", "not a decodable DICOM image (no readable header after DICM)")
    return dataset


def _names_dicom(dataset) -> bool:
    """True when a parsed data set holds an element only DICOM has (pydicom parses any bytes into something)."""
    return any(keyword in dataset for keyword in DICOM_MARKERS)


def _has_elements(dataset) -> bool:
    meta = getattr(dataset, "file_meta", None)
    return len(dataset) > 0 or (meta is not None and len(meta) > 0)


def _truncated(path: Path, dataset, caught: list) -> bool:
    """True when the file stops inside its meta header, its last element, or encapsulated pixel data."""
    if any("End of file reached" in str(w.message) for w in caught):  # pydicom's word for a cut sequence
        return True
    if dataset is None:
        return False
    size = path.stat().st_size
    meta = getattr(dataset, "file_meta", None)
    group_length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    if dataset.preamble is not None and group_length is not None and size < META_START + int(group_length):
        return True
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    tags = list(dataset.keys())
    if not tags or (syntax is not None and "Deflate" in syntax.name):  # deflated offsets are not file offsets
        return False
    last = dataset.get_item(tags[-1])
    tell = getattr(last, "value_tell", None)
    return tell is not None and last.length != UNDEFINED_LENGTH and tell + last.length > size


def _decode_dicom(path: Path, dataset) -> np.ndarray:
    """One grey radiograph from a parsed data set, or a DecodeError in plain words."""
    if not header_has_pixels(dataset):
        raise DecodeError(path, "no pixel data", describe_object(dataset))
    frames = _frames(path, dataset)
    if frames > 1:
        raise DecodeError(path, "multi-frame", f"{frames} frames (one radiograph per row)")
    _infer_transfer_syntax(dataset)
    stored = _pixels(path, dataset)
    return _to_monochrome2(path, dataset, stored)


def _frames(path: Path, dataset) -> int:
    raw = dataset.get("NumberOfFrames", 1)
    try:
        return int(str(raw).strip() or 1)
    except ValueError:
        raise DecodeError(path, "undecodable image", f"not a decodable DICOM image (Number of Frames is {raw!r})") \
            from None


def _infer_transfer_syntax(dataset) -> None:
    """A file without meta header: its transfer syntax is the encoding pydicom parsed (native pixels only)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        dataset.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = dataset.original_encoding
    if implicit is not None and little is not None:
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _pixels(path: Path, dataset) -> np.ndarray:
    """pydicom's decoders (all installed plugins), then GDCM directly for a grey image."""
    try:
        return dataset.pixel_array
    except Exception:  # each plugin fails its own way; what matters is whether GDCM itself can read it
        fallback = _gdcm_pixels(path, dataset)
    if fallback is not None:
        return fallback
    raise DecodeError(path, *_why_not_decoded(dataset))


def _gdcm_pixels(path: Path, dataset) -> np.ndarray | None:
    """GDCM's own reading of a compressed grey image, or None (not compressed, colour, or GDCM fails)."""
    try:
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        if syntax is None or not syntax.is_compressed or int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
            return None
        import gdcm

        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        if not reader.Read():
            return None
        image = reader.GetImage()
        dtype = {gdcm.PixelFormat.UINT8: np.uint8, gdcm.PixelFormat.INT8: np.int8,
                 gdcm.PixelFormat.UINT16: np.uint16, gdcm.PixelFormat.INT16: np.int16,
                 gdcm.PixelFormat.UINT32: np.uint32, gdcm.PixelFormat.INT32: np.int32}.get(
            image.GetPixelFormat().GetScalarType())
        # GDCM's Python buffer is a str that carries the raw bytes (the documented way back to bytes)
        raw = image.GetBuffer().encode("utf-8", "surrogateescape")
        shape = (int(dataset.Rows), int(dataset.Columns))
        if dtype is None or len(raw) != shape[0] * shape[1] * np.dtype(dtype).itemsize:
            return None
        return np.frombuffer(raw, dtype).reshape(shape)
    except Exception:  # an unknown syntax, GDCM missing or refusing: the caller gives the plain reason
        return None


def _why_not_decoded(dataset) -> tuple[str, str]:
    """(kind, detail) for pixel data that no decoder read: no decoder, a missing element, or damaged data."""
    from pydicom.datadict import dictionary_description
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        return "undecodable image", "not a decodable DICOM image (no transfer syntax for its pixel data)"
    name = syntax.name if syntax.name != str(syntax) else f"unknown transfer syntax {syntax}"
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom knows no decoder at all for this UID
        available = False
    if not available:
        return "no decoder", f"compressed with {name}"
    missing = [keyword for keyword in PIXEL_MODULE if keyword not in dataset]
    if missing:
        return "undecodable image", f"not a decodable DICOM image (missing {dictionary_description(missing[0])})"
    return "undecodable image", f"not a decodable DICOM image (its {name} pixel data is damaged)"


def _to_monochrome2(path: Path, dataset, stored: np.ndarray) -> np.ndarray:
    """Palette, colour or grey pixels as one uint8 MONOCHROME2 image (LUTs and window applied)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if photometric == "PALETTE COLOR" and stored.ndim == 2:
            stored = apply_color_lut(stored, dataset)
        if stored.ndim == 3:
            return to_uint8(_to_grey(stored, path, "rgb"))
        values = apply_voi_lut(apply_modality_lut(stored, dataset), dataset)
    except DecodeError:
        raise
    except Exception:  # malformed rescale, window or palette values: the row is rejected, not the run
        raise DecodeError(path, "undecodable image",
                          "not a decodable DICOM image (its rescale, window or palette values cannot be applied)") \
            from None
    grey = to_uint8(values)
    return 255 - grey if photometric == "MONOCHROME1" else grey


def read_dicom_header(path: str | Path):
    """The header of a DICOM file (pixel data not loaded) and the warnings heard, or (None, warnings).

    Used by the manifest writer, which needs PatientID and the view tags; files without the
    Part 10 header are read when pydicom can parse them. Nothing is printed.
    """
    import pydicom

    path = Path(path)
    heard: list[str] = []
    try:
        with _quiet(heard):
            dataset = pydicom.dcmread(path, force=True, defer_size="64 KB")  # big values (pixels) stay on disk
    except Exception:  # unreadable or unparsable: the caller reports "not a DICOM file"
        return None, heard
    if not _names_dicom(dataset):
        return None, heard
    return dataset, heard


def header_has_pixels(dataset) -> bool:
    """True when a header from ``read_dicom_header`` has a pixel data element."""
    return any(keyword in dataset for keyword in PIXEL_KEYWORDS)


def header_laterality(dataset) -> str | None:
    """'left' / 'right' from the ImageLaterality or Laterality tag of a parsed header, else None."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(dataset.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):  # the tags' code values; "LEFT" is not one
            return VIEW_ALIASES[value.lower()]
    return None


def describe_object(dataset) -> str:
    """The SOP class name without ' Storage' (e.g. 'RT Plan'), else the Modality, else ''."""
    meta = getattr(dataset, "file_meta", None)
    sop = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    name = str(sop.name) if sop is not None and sop.is_valid and sop.name != str(sop) else ""
    name = name.removesuffix(" Storage").strip()
    return name or str(dataset.get("Modality", "") or "").strip()


def dicom_laterality(path: str | Path) -> str | None:
    """'left' / 'right' from the ImageLaterality or Laterality tag of a DICOM file, else None."""
    path = Path(path)
    if not path.is_file() or not is_dicom(path):
        return None
    dataset, _ = read_dicom_header(path)
    return header_laterality(dataset) if dataset is not None else None
