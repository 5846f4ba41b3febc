"""A synthetic oblique cervical-spine data set in the manifest format (DESIGN §4.1).

The paper's radiographs are private, so fsweep ships this phantom. Each patient has
a left and a right oblique view. Both are drawn from one "right-like" anatomy (the
patient's tilt, curvature, scale and position); the left view is that drawing
mirrored left-right, so a left-vs-right classifier has something to learn and the
paper's Flip turns a left image into a right-looking one.

Along a tilted, curved spine axis sit six vertebral bodies (C2-C7) and, beside
them, a bright posterior column with five dark oval foramina between the levels.
Foramina are the darkest structures in the spine box. A normal view has five
wide foramina (85-100 % of full width); an abnormal one has three to five
narrowed ones. ``difficulty`` moves the narrowed width toward the normal width
(0: about 25 % of full width, 0.5: about 50 %, 1: about 75 %), so the classes
overlap more as it grows. The labels of the two views are drawn independently; exactly
``round(0.64 * patients)`` views of each side are abnormal, as in the paper.

Distractors that an ROI crop must remove lie outside the spine box: the skull at
the top, the mandible with teeth in front, the clavicle at the bottom and an L/R
marker letter. The image uses a narrow grey range with noise so that histogram
equalization matters. The spine box ``x0,y0,x1,y1`` encloses the bodies and the
posterior column (with every foramen) tightly.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cluster.errors import FsweepError
from preprocessing.vocab import VIEWS

ABNORMAL_FRACTION = 0.64  # the paper's share of abnormal views
LEVELS = 6  # vertebral bodies C2..C7
FORAMINA = LEVELS - 1  # one foramen between each pair of neighbouring levels
SHIFT = 4  # fractional bits for OpenCV drawing: sub-pixel accuracy on small images
SCALE = 1 << SHIFT
CONTACT_SAMPLES = 4  # patients (both views each) shown on the contact sheet


@dataclass(frozen=True)
class Anatomy:
    """One patient's right-like geometry and exposure, shared by both views."""

    unit: float  # vertebral pitch in pixels; every spine size is a multiple of it
    top: tuple[float, float]  # (x, y) of the axis' top point
    tilt: float  # axis angle from vertical, radians (positive leans the bottom right)
    bow: float  # lordotic curvature: peak sideways offset as a fraction of the axis length
    level: float  # darkest grey value of the image
    span: float  # grey range above `level` (narrow on purpose)


def write_phantom(
    out: str | Path,
    patients: int = 200,
    seed: int = 0,
    difficulty: float = 0.5,
    size: tuple[int, int] = (590, 1006),
) -> dict:
    """Write ``patients`` x 2 PNG images, ``manifest.csv`` and ``contact_sheet.png`` under ``out``.

    ``size`` is (width, height) in pixels. Same arguments, same bytes. Returns a dict with
    ``images``, ``patients``, ``abnormal_fraction``, ``manifest`` and ``contact_sheet`` (paths).
    """
    out = Path(out)
    _check_arguments(out, patients, seed, difficulty, size)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels = _view_labels(patients, seed)
    rows, samples = [], []
    for index in range(patients):
        rng = np.random.default_rng([seed, index])
        anatomy = _sample_anatomy(rng, size)
        patient_id = f"P{index + 1:04d}"
        for view in VIEWS:
            abnormal = bool(labels[view][index])
            image, box = render_view(anatomy, view, abnormal, difficulty, size, rng)
            name = f"images/{patient_id}_{view}.png"
            if not cv2.imwrite(str(out / name), image):
                raise FsweepError(f"{out / name}: could not write the image")
            rows.append([name, patient_id, view, "abnormal" if abnormal else "normal", *box])
            if index < CONTACT_SAMPLES:
                samples.append((image, box, f"{patient_id} {view[0].upper()} {'abn' if abnormal else 'nor'}"))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "patient_id", "view", "label", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    sheet = out / "contact_sheet.png"
    cv2.imwrite(str(sheet), contact_sheet(samples))
    n_abnormal = int(labels["left"].sum() + labels["right"].sum())
    return {
        "images": len(rows),
        "patients": patients,
        "abnormal_fraction": n_abnormal / len(rows),
        "manifest": str(manifest),
        "contact_sheet": str(sheet),
    }


def _check_arguments(out: Path, patients: int, seed: int, difficulty: float, size: tuple[int, int]) -> None:
    if patients < 1:
        raise FsweepError(f"--patients must be at least 1, got {patients}")
    if seed < 0:
        raise FsweepError(f"--seed must be 0 or more, got {seed}")
    if not 0.0 <= difficulty <= 1.0:
        raise FsweepError(f"--difficulty must be between 0 and 1, got {difficulty}")
    if min(size) < 32:
        raise FsweepError(f"--size must be at least 32x32 pixels, got {size[0]}x{size[1]}")
    if out.exists() and not out.is_dir():
        raise FsweepError(f"{out}: exists and is not a directory")


def _view_labels(patients: int, seed: int) -> dict[str, np.ndarray]:
    """Per side, exactly round(0.64 * patients) abnormal views, placed independently per side."""
    rng = np.random.default_rng([seed, 1_000_003])
    n_abnormal = round(ABNORMAL_FRACTION * patients)
    labels = {}
    for view in VIEWS:
        flags = np.zeros(patients, dtype=bool)
        flags[rng.permutation(patients)[:n_abnormal]] = True
        labels[view] = flags
    return labels


def _sample_anatomy(rng: np.random.Generator, size: tuple[int, int]) -> Anatomy:
    """Draw a patient's geometry so that the spine box always fits well inside the image."""
    width, height = size
    unit = min(0.085 * height, 0.2 * width) * rng.uniform(0.92, 1.08)
    return Anatomy(
        unit=unit,
        top=(width * rng.uniform(0.50, 0.56), height * rng.uniform(0.22, 0.25)),
        tilt=math.radians(rng.uniform(-9.0, 9.0)),
        bow=rng.uniform(0.02, 0.08),
        level=rng.uniform(60.0, 90.0),
        span=rng.uniform(55.0, 75.0),
    )


def render_view(
    anatomy: Anatomy,
    view: str,
    abnormal: bool,
    difficulty: float,
    size: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[int]]:
    """Draw one view; returns the uint8 image and its spine box [x0, y0, x1, y1]."""
    width = size[0]
    canvas = _background(size, rng)
    widths = _foramen_widths(abnormal, difficulty, rng)
    spine = _draw_spine(canvas, anatomy, widths)
    box = _tight_box(spine, size)
    _draw_distractors(canvas, box, size, rng)
    if view == "left":
        canvas = canvas[:, ::-1].copy()
        box = [width - box[2], box[1], width - box[0], box[3]]
    _draw_marker(canvas, "L" if view == "left" else "R", size)
    image = _expose(canvas, anatomy, size, rng)
    return image, box


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Soft vertical exposure gradient in [0, 1] units (0 = air, 1 = dense bone)."""
    width, height = size
    ramp = np.linspace(rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.3), height, dtype=np.float32)
    return np.repeat(ramp[:, None], width, axis=1)


def _foramen_widths(abnormal: bool, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """Width of each foramen relative to a full one; abnormal views narrow 3 to 5 of them."""
    widths = rng.uniform(0.85, 1.0, FORAMINA)
    if abnormal:
        narrowed = rng.choice(FORAMINA, size=rng.integers(3, FORAMINA + 1), replace=False)
        widths[narrowed] = np.clip(0.25 + 0.5 * difficulty + rng.normal(0.0, 0.05, narrowed.size), 0.2, 0.85)
    return widths


def _axis(anatomy: Anatomy, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point, unit tangent and unit right-hand normal of the spine axis at arc parameter s."""
    length = LEVELS * anatomy.unit
    direction = np.array([math.sin(anatomy.tilt), math.cos(anatomy.tilt)])
    normal = np.array([math.cos(anatomy.tilt), -math.sin(anatomy.tilt)])
    t = s / length
    # lordosis bows the neck forward (toward the bodies, i.e. -normal in the right-like view)
    point = np.array(anatomy.top) + s * direction - 4.0 * anatomy.bow * length * t * (1.0 - t) * normal
    slope = -4.0 * anatomy.bow * (1.0 - 2.0 * t)
    tangent = direction + slope * normal
    tangent /= np.linalg.norm(tangent)
    return point, tangent, np.array([tangent[1], -tangent[0]])


def _quad(anatomy: Anatomy, s0: float, s1: float, a0: float, a1: float) -> np.ndarray:
    """Polygon between arc positions s0..s1 and sideways offsets a0..a1 (in units)."""
    u = anatomy.unit
    points = []
    for s in np.linspace(s0 * u, s1 * u, 6):
        p, _, n = _axis(anatomy, s)
        points.append(p + a0 * u * n)
    for s in np.linspace(s1 * u, s0 * u, 6):
        p, _, n = _axis(anatomy, s)
        points.append(p + a1 * u * n)
    return np.array(points)


def _fill(canvas: np.ndarray, polygon: np.ndarray, value: float) -> None:
    cv2.fillPoly(canvas, [np.round(polygon * SCALE).astype(np.int32)], float(value), cv2.LINE_8, SHIFT)


def _ellipse(canvas: np.ndarray, centre, axes, angle: float, value: float, thickness: int = -1) -> None:
    cv2.ellipse(
        canvas,
        (int(round(centre[0] * SCALE)), int(round(centre[1] * SCALE))),
        (int(round(axes[0] * SCALE)), int(round(axes[1] * SCALE))),
        angle, 0, 360, float(value), thickness, cv2.LINE_8, SHIFT,
    )


def _draw_spine(canvas: np.ndarray, anatomy: Anatomy, widths: np.ndarray) -> list[np.ndarray]:
    """Neck soft tissue, bodies, posterior column and foramina; returns the spine polygons."""
    u = anatomy.unit
    _fill(canvas, _quad(anatomy, -1.5, LEVELS + 1.5, -2.6, 2.4), 0.42)
    polygons = []
    for level in range(LEVELS):
        body = _quad(anatomy, level + 0.1, level + 0.9, -1.1, -0.05)
        _fill(canvas, body, 0.78)
        polygons.append(body)
    column = _quad(anatomy, 0.15, LEVELS - 0.15, 0.05, 1.4)
    _fill(canvas, column, 0.68)
    polygons.append(column)
    for j, width in enumerate(widths):
        centre, _, normal = _axis(anatomy, (j + 1) * u)
        centre = centre + 0.7 * u * normal
        angle = math.degrees(math.atan2(normal[1], normal[0]))
        across, along = 0.55 * u * width, 0.42 * u * (0.5 + 0.5 * width)  # stenosis shrinks mostly across
        _ellipse(canvas, centre, (across + 0.06 * u, along + 0.06 * u), angle, 0.9)  # cortical rim
        _ellipse(canvas, centre, (across, along), angle, 0.1)
    return polygons


def _tight_box(polygons: list[np.ndarray], size: tuple[int, int]) -> list[int]:
    """Integer box around every spine polygon, clipped to the image."""
    points = np.concatenate(polygons)
    width, height = size
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int)
    return [max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)]


def _draw_distractors(canvas: np.ndarray, box: list[int], size: tuple[int, int], rng: np.random.Generator) -> None:
    """Skull above, mandible with teeth in front, clavicle below: all outside the spine box."""
    width, height = size
    x0, y0, x1, y1 = box
    gap = 0.02 * height
    # skull: a bright shell whose lowest point stays above the box
    ry = 0.2 * height
    centre = (x0 - 0.05 * width + rng.uniform(-0.03, 0.03) * width, y0 - gap - ry)
    _ellipse(canvas, centre, (0.42 * width, ry), 0.0, 0.72)
    _ellipse(canvas, centre, (0.42 * width - 0.03 * height, ry - 0.03 * height), 0.0, 0.5)
    # mandible: a thick bright arc in front of the spine (left of the box in the right-like view)
    right = x0 - gap
    if right > 0.06 * width:
        jaw = np.array([[right, y0 - 0.5 * gap], [right * 0.75, y0 + 0.07 * height],
                        [right * 0.2, y0 + 0.1 * height], [0.0, y0 + 0.09 * height]])
        thickness = max(2, int(0.02 * height))
        cv2.polylines(canvas, [np.round(jaw).astype(np.int32)], False, 0.75, thickness)
        for k in range(4):  # teeth along the upper edge of the mandible body
            tx = right * (0.1 + 0.15 * k)
            ty = y0 + 0.09 * height - 0.02 * height
            _fill(canvas, np.array([[tx, ty], [tx + 0.1 * right, ty], [tx + 0.1 * right, ty - 0.03 * height],
                                    [tx, ty - 0.03 * height]]), 0.92)
    # clavicle: a thick bright band below the box
    top = y1 + gap + 0.015 * height + rng.uniform(0.0, 0.03) * height
    band = np.array([[0.0, top + 0.05 * height], [0.5 * width, top], [width, top + 0.03 * height],
                     [width, top + 0.06 * height], [0.5 * width, top + 0.035 * height],
                     [0.0, top + 0.09 * height]])
    _fill(canvas, band, 0.8)


def _draw_marker(canvas: np.ndarray, letter: str, size: tuple[int, int]) -> None:
    """The radiographer's side marker, readable (drawn after mirroring) in the top-right corner."""
    width, height = size
    scale = 0.0018 * height
    thickness = max(1, int(round(0.006 * height)))
    (text_w, text_h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    origin = (int(width - text_w - 0.04 * width), int(0.02 * height + text_h))
    mask = np.zeros(canvas.shape, np.uint8)  # putText draws on 8-bit images only
    cv2.putText(mask, letter, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_8)
    canvas[mask > 0] = 1.0


def _expose(canvas: np.ndarray, anatomy: Anatomy, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Blur, squeeze into a narrow grey range, add noise, quantise to uint8."""
    sigma = max(0.5, 0.0015 * size[1])
    blurred = cv2.GaussianBlur(canvas, (0, 0), sigma)
    grey = anatomy.level + anatomy.span * blurred + rng.normal(0.0, 3.0, blurred.shape)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def contact_sheet(samples: list[tuple[np.ndarray, list[int], str]], columns: int = 4) -> np.ndarray:
    """Tile sample images (BGR) with their boxes in green and a caption; at most 256 px tall each."""
    tiles = []
    for image, box, caption in samples:
        scale = min(1.0, 256.0 / image.shape[0])
        tile = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        cv2.rectangle(tile, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), 1)
        cv2.putText(tile, caption, (3, tile.shape[0] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 255), 1)
        tiles.append(tile)
    shape = tiles[0].shape
    while len(tiles) % columns:
        tiles.append(np.zeros(shape, np.uint8))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)
