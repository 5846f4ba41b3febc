"""Phantom family v2 (the default): a synthetic oblique cervical-spine data set in the manifest format.

The paper's radiographs are private, so fsweep ships this phantom. It is built so that the
label lives only in local anatomy, and so that each nuisance the paper's methods address is
present (each on by default, each switchable by a keyword argument of ``write_phantom``).
A second family, built differently (``family="height"``: the label in the foramen's height along
the spine), lives in ``preprocessing.phantom_height``; both share this module's writer, labels,
label noise, manifest and contact sheet.

Anatomy. Along a curved spine axis sit six vertebral bodies (C2-C7) and, beside them, a
bright posterior column with five dark elliptical foramina between the levels. Every foramen
draws its size, its elongation (short/long axis ratio), its darkness and its rim independently
of the label; the label is in its *orientation*: a normal foramen is tall (long axis along the
spine), a narrowed one is squeezed along the spine, narrower but longer sideways. A rotated
ellipse has the same pixels as before, so the dark area of a view, its grey-level histogram and
every other global intensity statistic of the spine box carry no label.

``overlap`` (on): foramen sizes vary widely, so normal and narrowed widths (their extent along
the spine) overlap; half of the abnormal views narrow only one or two of the five foramina; zero to
three dark distractor blobs (lucencies in the bodies) add dark area at random. Off: every
abnormal view narrows three to five foramina of near-equal size, with little wobble.
``difficulty`` (0 easy .. 1 hard) makes every foramen rounder and its orientation wobble more,
so narrowed and normal foramina look more alike; the default is the calibrated one (see
docs/phantom.md, "Calibration"). ``label_noise`` (default 4 %): that share of views, per
side, carry the opposite label of their anatomy (half flipped each way, so the abnormal share
is unchanged).

``exposure`` (on): each image has its own grey level, contrast and gamma, inside a narrow grey
range (about half of the 8-bit range: what histogram equalization is for). Off: one fixed exposure.

``pose`` (on): the patient's spine is tilted up to 25 degrees either way and curved (lordosis
to a slight kyphosis), and each view re-positions the patient by a few degrees (what the STN
is for). Off: an upright spine with one mild curvature.

``view_gap`` (on): the left view is the right-like drawing mirrored, but taken through another
projection: magnified, foreshortened sideways, blurrier and noisier. So Flip adds data from a
shifted domain, not duplicates. Off: the left view is the same projection, mirrored.

``paired_labels`` (on): a patient's two labels are correlated as in real cohorts (stenosis is
often bilateral); off: the sides are labelled independently. Either way exactly
``round(0.64 * patients)`` views of each side are abnormal, as in the paper.

Distractors that an ROI crop must remove lie outside the spine box: the skull at the top, the
mandible with teeth in front, the clavicle at the bottom and an L/R marker letter. The spine
box ``x0,y0,x1,y1`` encloses the bodies and the posterior column (with every foramen) tightly.
Same arguments, same bytes.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cluster.errors import FsweepError
from preprocessing import phantom_height
from preprocessing.vocab import LABEL_NAMES, VIEWS

ABNORMAL_FRACTION = 0.64  # the paper's share of abnormal views
BOTH_ABNORMAL_FRACTION = 0.52  # paired labels: patients abnormal on both sides (independent sides: 0.41)
DEFAULT_DIFFICULTY = 0.5  # calibrated: see the module docstring (and phantom_height's, whose scale is its own)
# phantom families, built differently: a data default must hold on both (docs/design.md, 'A testbed that can tell
# configurations apart')
FAMILIES = ("v2", "height")
DEFAULT_FAMILY = "v2"
DEFAULT_LABEL_NOISE = 0.04
LEVELS = 6  # vertebral bodies C2..C7
FORAMINA = LEVELS - 1  # one foramen between each pair of neighbouring levels
NARROWED_COUNT_P = (0.25, 0.25, 0.2, 0.15, 0.15)  # overlap on: P(1..5 narrowed foramina | abnormal)
MAX_TILT_DEG = 25.0
SHIFT = 4  # fractional bits for OpenCV drawing: sub-pixel accuracy on small images
SCALE = 1 << SHIFT
ELLIPSE_POINTS = 32
RIM = 0.05  # cortical rim of a foramen, in units
MAX_LONG = 0.44  # longest half-axis of a foramen, in units (they sit one unit apart)
CONTACT_SAMPLES = 4  # patients (both views each) shown on the contact sheet


@dataclass(frozen=True)
class Nuisances:
    """Which nuisances are drawn (all on by default) and the label-noise rate."""

    overlap: bool = True
    exposure: bool = True
    pose: bool = True
    view_gap: bool = True
    paired_labels: bool = True
    label_noise: float = DEFAULT_LABEL_NOISE


@dataclass(frozen=True)
class Projection:
    """One view's geometry in the right-like frame (before the left view is mirrored)."""

    unit: float  # vertebral pitch in pixels; every spine size is a multiple of it
    mid: tuple[float, float]  # (x, y) of the axis' middle point
    tilt: float  # axis angle from vertical, radians (positive leans the bottom right)
    bow: float  # curvature: peak sideways offset as a fraction of the axis length (lordosis > 0)
    squeeze: float  # sideways foreshortening of the projection (1 = none)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Apply the sideways foreshortening about the axis' middle point."""
        out = np.array(points, dtype=np.float64)
        out[..., 0] = self.mid[0] + self.squeeze * (out[..., 0] - self.mid[0])
        return out


@dataclass(frozen=True)
class Exposure:
    """One image's grey mapping: level + span * canvas**gamma, plus noise and blur."""

    level: float
    span: float
    gamma: float
    noise: float
    blur: float  # Gaussian sigma as a fraction of the image height


@dataclass(frozen=True)
class Foramen:
    """One foramen: area (as the geometric-mean radius, in units), shape, tone and orientation."""

    radius: float  # sqrt(long * short) half-axes, in units: fixes the area
    ratio: float  # short / long half-axis (1 = round)
    tone: float  # canvas value of the lumen (dark)
    angle: float  # degrees from the sideways direction to the long axis: ~90 normal, ~0 narrowed


def write_phantom(
    out: str | Path,
    patients: int = 200,
    seed: int = 0,
    difficulty: float = DEFAULT_DIFFICULTY,
    size: tuple[int, int] = (590, 1006),
    *,
    family: str = DEFAULT_FAMILY,
    overlap: bool = True,
    exposure: bool = True,
    pose: bool = True,
    view_gap: bool = True,
    paired_labels: bool = True,
    label_noise: float = DEFAULT_LABEL_NOISE,
) -> dict:
    """Write ``patients`` x 2 PNG images, ``manifest.csv`` and ``contact_sheet.png`` under ``out``.

    ``size`` is (width, height) in pixels. ``family`` is one of ``FAMILIES``: ``v2`` (this module) or
    ``height`` (``preprocessing.phantom_height``). The keyword switches turn single nuisances off (see the
    family's module docstring). Same arguments, same bytes. Returns a dict with ``images``, ``patients``,
    ``abnormal_fraction``, ``noisy_labels`` (views whose label contradicts their anatomy),
    ``manifest`` and ``contact_sheet`` (paths).
    """
    out = Path(out)
    _check_arguments(out, patients, seed, difficulty, size, label_noise, family)
    nuisances = Nuisances(overlap, exposure, pose, view_gap, paired_labels, float(label_noise))
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels = view_labels(patients, seed, nuisances.paired_labels)
    anatomy = _noisy_anatomy(labels, seed, nuisances.label_noise)
    rows, samples = [], []
    render = _family_renderer(family)
    for index in range(patients):
        rng = np.random.default_rng([seed, index])
        patient_id = f"P{index + 1:04d}"
        views = render(rng, {view: bool(anatomy[view][index]) for view in VIEWS}, difficulty, size, nuisances)
        for view in VIEWS:
            label = LABEL_NAMES[int(labels[view][index])]
            image, box = views[view]
            name = f"images/{patient_id}_{view}.png"
            if not cv2.imwrite(str(out / name), image):
                raise FsweepError(f"{out / name}: could not write the image")
            rows.append([name, patient_id, view, label, *box])
            if index < CONTACT_SAMPLES:
                samples.append((image, box, f"{patient_id} {view[0].upper()} {label[:3]}"))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "patient_id", "view", "label", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    sheet = out / "contact_sheet.png"
    cv2.imwrite(str(sheet), contact_sheet(samples))
    n_abnormal = int(sum(labels[view].sum() for view in VIEWS))
    noisy = int(sum((labels[view] != anatomy[view]).sum() for view in VIEWS))
    return {
        "images": len(rows),
        "patients": patients,
        "abnormal_fraction": n_abnormal / len(rows),
        "noisy_labels": noisy,
        "manifest": str(manifest),
        "contact_sheet": str(sheet),
    }


def _check_arguments(out: Path, patients: int, seed: int, difficulty: float, size: tuple[int, int],
                     label_noise: float, family: str) -> None:
    if family not in FAMILIES:
        raise FsweepError(f"--family {family!r}: unknown phantom family (valid: {', '.join(FAMILIES)})")
    if patients < 1:
        raise FsweepError(f"--patients must be at least 1, got {patients}")
    if seed < 0:
        raise FsweepError(f"--seed must be 0 or more, got {seed}")
    if not 0.0 <= difficulty <= 1.0:
        raise FsweepError(f"--difficulty must be between 0 and 1, got {difficulty}")
    if min(size) < 32:
        raise FsweepError(f"--size must be at least 32x32 pixels, got {size[0]}x{size[1]}")
    if not 0.0 <= label_noise <= 0.5:
        raise FsweepError(f"label_noise must be between 0 and 0.5, got {label_noise}")
    if out.exists() and not out.is_dir():
        raise FsweepError(f"{out}: exists and is not a directory")


def view_labels(patients: int, seed: int, paired: bool = True) -> dict[str, np.ndarray]:
    """Manifest labels per side: exactly round(0.64 * patients) abnormal views on each side.

    ``paired``: about BOTH_ABNORMAL_FRACTION of the patients are abnormal on both sides (the most the
    per-side counts allow at this size); otherwise each side is placed independently.
    """
    rng = np.random.default_rng([seed, 1_000_003])
    n_abnormal = round(ABNORMAL_FRACTION * patients)
    if not paired:
        labels = {}
        for view in VIEWS:
            flags = np.zeros(patients, dtype=bool)
            flags[rng.permutation(patients)[:n_abnormal]] = True
            labels[view] = flags
        return labels
    both = int(np.clip(round(BOTH_ABNORMAL_FRACTION * patients), max(0, 2 * n_abnormal - patients), n_abnormal))
    one_side = n_abnormal - both
    order = rng.permutation(patients)
    left, right = np.zeros(patients, dtype=bool), np.zeros(patients, dtype=bool)
    left[order[:both + one_side]] = True  # both, then left only
    right[order[:both]] = True
    right[order[both + one_side:both + 2 * one_side]] = True  # right only
    return {"left": left, "right": right}


def _noisy_anatomy(labels: dict[str, np.ndarray], seed: int, rate: float) -> dict[str, np.ndarray]:
    """What each view's anatomy shows: the manifest label, except round(rate * n / 2) views flipped each way."""
    rng = np.random.default_rng([seed, 2_000_003])
    anatomy = {}
    for view in VIEWS:
        flags = labels[view].copy()
        flips = round(rate * flags.size / 2)
        abnormal, normal = np.flatnonzero(flags), np.flatnonzero(~flags)
        flips = min(flips, abnormal.size, normal.size)
        flags[rng.choice(abnormal, flips, replace=False)] = False
        flags[rng.choice(normal, flips, replace=False)] = True
        anatomy[view] = flags
    return anatomy


def _family_renderer(family: str):
    """The function that draws both views of one patient for ``family`` (same call for every family)."""
    return phantom_height.render_patient if family == "height" else _v2_patient


def _v2_patient(rng: np.random.Generator, anatomy: dict[str, bool], difficulty: float, size: tuple[int, int],
                nuisances: Nuisances) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Both views of one v2 patient: ``{view: (uint8 image, spine box)}``; ``anatomy[view]`` is abnormal or not."""
    patient = _sample_patient(rng, size, nuisances.pose)
    views = {}
    for view in VIEWS:
        projection = _view_projection(patient, view, nuisances, rng)
        views[view] = render_view(projection, view, anatomy[view], difficulty, size, nuisances, rng)
    return views


def _sample_patient(rng: np.random.Generator, size: tuple[int, int], pose: bool) -> Projection:
    """A patient's right-like geometry; the spine box always fits well inside the image."""
    width, height = size
    unit = min(0.068 * height, 0.2 * width) * rng.uniform(0.92, 1.08)
    tilt = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)) if pose else 0.0
    bow = rng.uniform(-0.03, 0.12) if pose else 0.05
    mid = (width * rng.uniform(0.48, 0.52), height * rng.uniform(0.49, 0.52))
    return Projection(unit=unit, mid=mid, tilt=tilt, bow=bow, squeeze=1.0)


def _view_projection(patient: Projection, view: str, nuisances: Nuisances, rng: np.random.Generator) -> Projection:
    """The patient re-positioned for one view; the left view is taken through another projection."""
    tilt = patient.tilt + (math.radians(rng.normal(0.0, 2.0)) if nuisances.pose else 0.0)
    gap = nuisances.view_gap and view == "left"
    unit = patient.unit * (rng.uniform(1.05, 1.10) if gap else 1.0)  # magnification
    squeeze = rng.uniform(0.85, 0.92) if gap else 1.0  # another obliquity foreshortens sideways
    return Projection(unit=unit, mid=patient.mid, tilt=tilt, bow=patient.bow, squeeze=squeeze)


def render_view(
    projection: Projection,
    view: str,
    abnormal: bool,
    difficulty: float,
    size: tuple[int, int],
    nuisances: Nuisances,
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[int]]:
    """Draw one view whose anatomy is ``abnormal`` or not; returns the uint8 image and its spine box."""
    width = size[0]
    canvas = _background(size, rng)
    foramina = _foramina(abnormal, difficulty, nuisances.overlap, rng)
    spine = _draw_spine(canvas, projection, foramina, nuisances.overlap, rng)
    box = _tight_box(spine, size)
    _draw_distractors(canvas, box, size, rng)
    if view == "left":
        canvas = canvas[:, ::-1].copy()
        box = [width - box[2], box[1], width - box[0], box[3]]
    _draw_marker(canvas, "L" if view == "left" else "R", size)
    exposure = _sample_exposure(view, nuisances, rng)
    return _expose(canvas, exposure, size, rng), box


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Soft vertical exposure gradient in [0, 1] units (0 = air, 1 = dense bone)."""
    width, height = size
    ramp = np.linspace(rng.uniform(0.05, 0.15), rng.uniform(0.2, 0.3), height, dtype=np.float32)
    return np.repeat(ramp[:, None], width, axis=1)


def foramen_shape(difficulty: float, overlap: bool = True) -> tuple[tuple[float, float], float]:
    """(short/long axis ratio range, orientation jitter in degrees) of every foramen, label-free.

    Easy: elongated ellipses whose orientation barely wobbles; hard: rounder ones that wobble more,
    so a narrowed foramen (long axis sideways) and a normal one (long axis along the spine) look alike.
    """
    low = 0.3 + 0.3 * difficulty
    jitter = 10.0 + 20.0 * difficulty if overlap else 8.0
    return (low, min(low + 0.15, 1.0)), jitter


def _foramina(abnormal: bool, difficulty: float, overlap: bool, rng: np.random.Generator) -> list[Foramen]:
    """Five foramina; an abnormal view narrows some of them (orientation only: size and shape are label-free)."""
    radius = rng.uniform(0.16, 0.3, FORAMINA) if overlap else rng.uniform(0.23, 0.26, FORAMINA)
    tone = rng.uniform(0.06, 0.26, FORAMINA)
    (low, high), jitter = foramen_shape(difficulty, overlap)
    ratio = rng.uniform(low, high, FORAMINA)
    radius = np.minimum(radius, MAX_LONG * np.sqrt(ratio))  # neighbouring foramina never touch
    angle = 90.0 + rng.uniform(-jitter, jitter, FORAMINA)  # normal: tall, the long axis along the spine
    if abnormal:
        count = rng.choice(np.arange(1, FORAMINA + 1), p=NARROWED_COUNT_P) if overlap else rng.integers(3, FORAMINA + 1)
        narrowed = rng.choice(FORAMINA, size=count, replace=False)
        angle[narrowed] -= 90.0  # narrowed: squeezed along the spine, the long axis runs sideways
    return [Foramen(*values) for values in zip(radius, ratio, tone, angle)]


def _axis(p: Projection, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and unit right-hand normal of the spine axis at arc parameter s (before projection)."""
    length = LEVELS * p.unit
    direction = np.array([math.sin(p.tilt), math.cos(p.tilt)])
    normal = np.array([math.cos(p.tilt), -math.sin(p.tilt)])
    t = s / length
    # lordosis bows the neck forward (toward the bodies, i.e. -normal in the right-like view)
    point = np.array(p.mid) + (s - 0.5 * length) * direction - 4.0 * p.bow * length * t * (1.0 - t) * normal
    tangent = direction - 4.0 * p.bow * (1.0 - 2.0 * t) * normal
    tangent /= np.linalg.norm(tangent)
    return point, np.array([tangent[1], -tangent[0]])


def _quad(p: Projection, s0: float, s1: float, a0: float, a1: float) -> np.ndarray:
    """Projected polygon between arc positions s0..s1 and sideways offsets a0..a1 (in units)."""
    u = p.unit
    points = []
    for s in np.linspace(s0 * u, s1 * u, 6):
        point, normal = _axis(p, s)
        points.append(point + a0 * u * normal)
    for s in np.linspace(s1 * u, s0 * u, 6):
        point, normal = _axis(p, s)
        points.append(point + a1 * u * normal)
    return p.project(np.array(points))


def _ellipse(p: Projection, centre: np.ndarray, axes: tuple[float, float], direction: np.ndarray) -> np.ndarray:
    """Projected polygon of an ellipse with half-axes ``axes`` (pixels), the first along ``direction``."""
    phi = np.linspace(0.0, 2.0 * math.pi, ELLIPSE_POINTS, endpoint=False)
    other = np.array([-direction[1], direction[0]])
    points = centre + np.outer(axes[0] * np.cos(phi), direction) + np.outer(axes[1] * np.sin(phi), other)
    return p.project(points)


def _fill(canvas: np.ndarray, polygon: np.ndarray, value: float) -> None:
    cv2.fillPoly(canvas, [np.round(polygon * SCALE).astype(np.int32)], float(value), cv2.LINE_8, SHIFT)


def _rotate(vector: np.ndarray, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([c * vector[0] - s * vector[1], s * vector[0] + c * vector[1]])


def _draw_spine(canvas: np.ndarray, p: Projection, foramina: list[Foramen], overlap: bool,
                rng: np.random.Generator) -> list[np.ndarray]:
    """Neck soft tissue, bodies, posterior column and foramina; returns the spine polygons."""
    u = p.unit
    _fill(canvas, _quad(p, -1.5, LEVELS + 1.5, -2.6, 2.6), 0.42)
    polygons = []
    for level in range(LEVELS):
        body = _quad(p, level + 0.1, level + 0.9, -1.1, -0.05)
        _fill(canvas, body, 0.78)
        polygons.append(body)
    column = _quad(p, 0.15, LEVELS - 0.15, 0.05, 1.85)
    _fill(canvas, column, 0.68)
    polygons.append(column)
    for j, foramen in enumerate(foramina):
        point, normal = _axis(p, (j + 1) * u)
        centre = point + 0.95 * u * normal
        long, short = foramen.radius * u / math.sqrt(foramen.ratio), foramen.radius * u * math.sqrt(foramen.ratio)
        rim = RIM * u
        direction = _rotate(normal, foramen.angle)
        _fill(canvas, _ellipse(p, centre, (long + rim, short + rim), direction), 0.9)
        _fill(canvas, _ellipse(p, centre, (long, short), direction), foramen.tone)
    if overlap:
        _draw_lucencies(canvas, p, rng)
    return polygons


def _draw_lucencies(canvas: np.ndarray, p: Projection, rng: np.random.Generator) -> None:
    """Zero to three dark blobs inside the bodies: dark area that has nothing to do with the label."""
    u = p.unit
    for _ in range(rng.integers(0, 4)):
        point, normal = _axis(p, (rng.integers(0, LEVELS) + rng.uniform(0.35, 0.65)) * u)
        centre = point - rng.uniform(0.4, 0.7) * u * normal
        radius = rng.uniform(0.1, 0.2) * u
        _fill(canvas, _ellipse(p, centre, (radius, radius * rng.uniform(0.6, 1.0)), normal), rng.uniform(0.06, 0.26))


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
    x0, y0, _, y1 = box
    gap = 0.02 * height
    # skull: a bright shell whose lowest point stays above the box
    ry = 0.2 * height
    centre = np.array([x0 - 0.05 * width + rng.uniform(-0.03, 0.03) * width, y0 - gap - ry])
    flat = Projection(unit=1.0, mid=(0.0, 0.0), tilt=0.0, bow=0.0, squeeze=1.0)
    _fill(canvas, _ellipse(flat, centre, (0.42 * width, ry), np.array([1.0, 0.0])), 0.72)
    _fill(canvas, _ellipse(flat, centre, (0.42 * width - 0.03 * height, ry - 0.03 * height), np.array([1.0, 0.0])), 0.5)
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
    thickness = max(1, round(0.006 * height))
    (text_w, text_h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    origin = (int(width - text_w - 0.04 * width), int(0.02 * height + text_h))
    mask = np.zeros(canvas.shape, np.uint8)  # putText draws on 8-bit images only
    cv2.putText(mask, letter, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_8)
    canvas[mask > 0] = 1.0


def _sample_exposure(view: str, nuisances: Nuisances, rng: np.random.Generator) -> Exposure:
    """Per-image exposure (or a fixed one); the left view's projection is blurrier and noisier."""
    if nuisances.exposure:
        level, span, gamma = rng.uniform(25.0, 65.0), rng.uniform(110.0, 150.0), math.exp(rng.uniform(-0.2, 0.2))
    else:
        level, span, gamma = 40.0, 160.0, 1.0
    gap = nuisances.view_gap and view == "left"
    noise = rng.uniform(2.0, 4.0) * (1.5 if gap else 1.0)
    return Exposure(level=level, span=span, gamma=gamma, noise=noise, blur=0.0015 * (1.6 if gap else 1.0))


def _expose(canvas: np.ndarray, exposure: Exposure, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Blur, apply the gamma, squeeze into a narrow grey range, add noise, quantise to uint8."""
    sigma = max(0.5, exposure.blur * size[1])
    blurred = cv2.GaussianBlur(canvas, (0, 0), sigma)
    np.clip(blurred, 0.0, 1.0, out=blurred)
    grey = exposure.level + exposure.span * np.power(blurred, exposure.gamma)
    grey += rng.normal(0.0, exposure.noise, blurred.shape)
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def contact_sheet(samples: list[tuple[np.ndarray, list[int], str]], columns: int = 4) -> np.ndarray:
    """Tile sample images (BGR) with their boxes in green and a caption; at most 256 px tall each."""
    tiles = []
    for image, box, caption in samples:
        scale = min(1.0, 256.0 / image.shape[0])
        tile = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        tile = cv2.cvtColor(tile, cv2.COLOR_GRAY2BGR)
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        cv2.rectangle(tile, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), 1)
        cv2.putText(tile, caption, (3, tile.shape[0] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 255), 1)
        tiles.append(tile)
    shape = tiles[0].shape
    while len(tiles) % columns:
        tiles.append(np.zeros(shape, np.uint8))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)
