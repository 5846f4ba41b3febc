"""A store variant's recipe and content key, and the recipe applied to one image.

A variant is one recipe (``VariantSpec``: HE mode, size, aspect handling, detector,
margin) applied to one data set. Its key hashes the data set's decoded-pixel hashes,
splits and labels, the detector's weights, every recipe parameter and ``CODE_VERSION``
(and, for a variant cropped by one fold's own detector, that fold: ``spec_key``),
so any change gives a new variant and nothing else does. ``fsweep predict`` applies the
same recipe to a new radiograph, so training and deployment crop alike.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from preprocessing.artifact import content_key
from preprocessing.contrast import equalize
from preprocessing.decode import decode_image
from preprocessing.ingest import load_dataset
from preprocessing.roi import RoiDetector, crop_box, detector_sha256, full_frame_box
from preprocessing.splits import dataset_folds, fold_column
from preprocessing.vocab import ASPECTS, HE_MODES

CODE_VERSION = "store-1"  # bump whenever the same inputs would give different arrays
KEY_COLUMNS = ["image_id", "pixel_sha256", "patient", "view", "label", "split"]  # what a variant's key hashes


@dataclass(frozen=True)
class VariantSpec:
    """One preprocessing recipe (no defaults here: the config's ``data``/``roi`` keys own them)."""

    he: str  # histogram equalization: off / global (paper eq. 1-4) / clahe
    size: int  # square output size in pixels
    aspect: str  # stretch (plain resize, the paper) or pad (keep the crop's aspect, black borders)
    roi_dir: str | None  # ROI_DIR of the YOLO detector; None = full frame, no detection
    margin: float  # crop margin, fraction of the box size per side (used only with a detector)

    def check(self) -> VariantSpec:
        """Return self, or raise FsweepError naming the bad field."""
        if self.he not in HE_MODES:
            raise FsweepError(f"he={self.he!r}: unknown histogram equalization (valid: {', '.join(HE_MODES)})")
        if self.aspect not in ASPECTS:
            raise FsweepError(f"aspect={self.aspect!r}: unknown (valid: {', '.join(ASPECTS)})")
        if not isinstance(self.size, int) or self.size < 8:
            raise FsweepError(f"size={self.size!r}: must be an integer of at least 8")
        if not 0 <= self.margin <= 1:
            raise FsweepError(f"margin={self.margin!r}: must be within [0, 1]")
        return self


def variant_key(dataset_dir: str | Path, spec: VariantSpec, fold: int | None = None) -> str:
    """Content key of ``spec`` applied to DATASET (no decoding: uses dataset.parquet's pixel hashes).

    ``fold``: the fold whose own detector ``spec.roi_dir`` is (``preprocessing.fold_roi``); None for one split.
    """
    spec.check()
    return spec_key(read_dataset(dataset_dir), spec, detector_sha256(spec.roi_dir) if spec.roi_dir else None, fold)


def spec_key(rows: pd.DataFrame, spec: VariantSpec, detector: str | None, fold: int | None = None) -> str:
    """Content key of ``spec`` applied to ``read_dataset``'s rows, with detector weights of sha256 ``detector``.

    A variant cropped by fold k's own detector (``fold`` = k) has the key ``fold<k>-<16 hex>``, the fold
    hashed in too; without ``fold`` (one split, or a fold without a detector) it is the 16 hex alone.
    """
    folds = [fold_column(k) for k in range(dataset_folds(rows.columns))]  # folds live in the variant's index
    images = hashlib.sha256(rows[KEY_COLUMNS + folds].to_csv(index=False).encode()).hexdigest()
    payload = {
        "code": CODE_VERSION,
        "images": images,
        "detector": detector,
        "margin": spec.margin if spec.roi_dir else None,  # no detector: no crop, so the margin changes nothing
        "he": spec.he,
        "size": spec.size,
        "aspect": spec.aspect,
    }
    if fold is None:
        return content_key(payload)
    return f"fold{int(fold)}-{content_key({**payload, 'fold': int(fold)})}"


def read_dataset(dataset_dir: str | Path) -> pd.DataFrame:
    """DATASET/dataset.parquet (checked by ``ingest.load_dataset``) in a canonical order (split, view, image_id)."""
    rows = load_dataset(dataset_dir)
    return rows.sort_values(["split", "view", "image_id"], kind="stable").reset_index(drop=True)


def locate_roi(img: np.ndarray, detector: RoiDetector | None):
    """``(box, conf, fallback)``: the detector's best box, or the full frame (fallback when it found none)."""
    if detector is None:
        return full_frame_box(img), math.nan, False
    found = detector.detect(img)
    if found is None:
        return full_frame_box(img), math.nan, True
    return found[0], found[1], False


def to_square(img: np.ndarray, size: int, aspect: str) -> np.ndarray:
    """Resize to ``size`` x ``size``: ``stretch``, or ``pad`` (centre on black, keep the aspect ratio)."""
    if aspect == "pad":
        height, width = img.shape
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        img = cv2.copyMakeBorder(img, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0)
    interpolation = cv2.INTER_AREA if max(img.shape) > size else cv2.INTER_LINEAR  # AREA avoids aliasing when shrinking
    return cv2.resize(img, (size, size), interpolation=interpolation)


def finish_crop(crop: np.ndarray, spec: VariantSpec) -> np.ndarray:
    """The steps after the crop, in the paper's order: equalize the crop, then make it S x S."""
    return to_square(equalize(np.ascontiguousarray(crop), spec.he), spec.size, spec.aspect)


def preprocess_decoded(img: np.ndarray, spec: VariantSpec, detector: RoiDetector | None = None):
    """The recipe on a decoded image: ``(S x S uint8, box used, fallback)`` (detect, crop, equalize, resize)."""
    box, _, fallback = locate_roi(img, detector)
    return finish_crop(crop_box(img, box, spec.margin), spec), box, fallback


def preprocess_image(path: str, spec: VariantSpec, detector: RoiDetector | None = None) -> np.ndarray:
    """The whole recipe for one raw file: decode, then ``preprocess_decoded`` (the store's unit of work)."""
    return preprocess_decoded(decode_image(path), spec, detector)[0]


def describe_spec(spec: VariantSpec) -> str:
    """One line naming the recipe, for build logs and errors."""
    roi = f"roi={spec.roi_dir}, margin={spec.margin}" if spec.roi_dir else "roi=none"
    return f"he={spec.he}, size={spec.size}, aspect={spec.aspect}, {roi}"
