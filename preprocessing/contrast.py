"""Contrast step of the store: ``he`` is ``off``, ``global`` (the paper's eq. 1-4) or ``clahe``.

``global`` is exactly the paper's histogram equalization (Park et al. 2023, eq. 1-4):
h(g) = N_g, p(g) = h(g) / (w*h), cdf(g) = sum_{i<=g} p(i), y = round(cdf(g) * L_max)
with L_max = 255 and round half up. It is computed with OpenCV (``cv2.calcHist`` and a
``cv2.LUT`` table). ``cv2.equalizeHist`` is not used as is: it also subtracts the cdf of
the darkest grey present (y = round((cdf(g) - cdf(g_min)) / (1 - cdf(g_min)) * L_max)),
so its output starts at 0 where eq. 4 starts at round(p(g_min) * L_max); on a radiograph
with a large dark background the two differ by many grey levels.
"""
from __future__ import annotations

import cv2
import numpy as np

from cluster.errors import FsweepError
from preprocessing.vocab import HE_MODES

L_MAX = 255  # highest grey level of uint8 images (eq. 4)
CLAHE_CLIP = 2.0  # OpenCV's usual clip limit: limits noise amplification in flat regions
CLAHE_TILES = (8, 8)  # OpenCV's default tile grid


def equalize(img: np.ndarray, mode: str) -> np.ndarray:
    """Return ``img`` (2-D uint8) with histogram equalization ``mode`` applied (off/global/clahe)."""
    _check_grey(img)
    if mode == "off":
        return img
    if mode == "global":
        return cv2.LUT(img, _paper_lut(img))
    if mode == "clahe":
        return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(img)
    raise FsweepError(f"he={mode!r}: unknown histogram equalization (valid: {', '.join(HE_MODES)})")


def equalize_reference(img: np.ndarray) -> np.ndarray:
    """The paper's eq. 1-4 written out directly in numpy (the test oracle of ``equalize(img, 'global')``)."""
    _check_grey(img)
    height, width = img.shape
    h = np.bincount(img.ravel(), minlength=L_MAX + 1)  # eq. 1: h(g) = N_g
    p = h / (width * height)  # eq. 2
    cdf = np.cumsum(p)  # eq. 3
    y = np.floor(cdf[img] * L_MAX + 0.5)  # eq. 4, round half up
    return y.astype(np.uint8)


def _paper_lut(img: np.ndarray) -> np.ndarray:
    """Lookup table g -> round(cdf(g) * L_max) in exact integer arithmetic."""
    counts = cv2.calcHist([img], [0], None, [L_MAX + 1], [0, L_MAX + 1]).ravel().astype(np.int64)
    total = img.size
    cumulative = np.cumsum(counts)
    # round(c * L / n) half up == floor((2 c L + n) / 2n), exact for integers
    return ((2 * cumulative * L_MAX + total) // (2 * total)).astype(np.uint8)


def _check_grey(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
        got = f"{img.dtype} array of shape {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise FsweepError(f"histogram equalization needs a 2-D uint8 image, got {got}")
