"""Phantom family ``height``: the label in the foramen's height along the spine, built apart from v2.

What stenosis is: the foramen is narrowed cranio-caudally (disc-height loss, facet and uncovertebral
hypertrophy bring its upper and lower margins together). Here each of the five foramina is a rounded
box (a superellipse) in the posterior column whose *height* along the spine is the label: a normal
foramen is taller than wide, a narrowed one is squat. Its area is drawn label-free and kept when it is
narrowed (it bulges sideways) and its rim thickens so that the rim's bright area is kept too, so dark
and bright area, histograms and other global statistics carry (almost: with every nuisance off a linear
probe still reaches about 0.64, tests/test_phantom_shortcut.py) no label; squareness and darkness are label-free. ``difficulty`` (0 easy .. 1 hard) brings the
narrowed heights towards the normal ones.

How it differs from v2, so a default tuned on one is tested on the other: superellipses and rounded
polygons in a curved spine frame (an S-curve), drawn at twice the size and averaged down, not
sub-pixel ellipses; an X-ray-like exposure (attenuation ``exp(-mu * density)``, a sigmoid detector
response, a heel-effect gradient, signal-dependent noise) instead of level + span * gamma; and its
own nuisances, each behind the switch of the same name in ``write_phantom``:

``overlap`` (on): heights vary enough that normal and narrowed ones overlap; most abnormal views narrow
one or two foramina; disc spaces of random height (dark gaps that are not the label); osteophyte-like
bright spurs on body corners and the column's back; a soft-tissue overlay (smooth density blobs and the
trachea's air column) over the spine. Off: three to five clearly narrowed foramina, no spurs or overlay.
``exposure`` (on): per-image beam hardness, dose, detector curve and heel direction. Off: one setting.
``pose`` (on): tilt up to 15 degrees, size 0.85-1.15, an S-shaped curvature, and each view re-positioned
by a few degrees. Off: upright, one size and curvature.
``view_gap`` (on): the left view is sheared sideways (another obliquity), lower-resolution and noisier;
off: the same projection, mirrored.
``paired_labels`` and ``label_noise`` work as in v2 (the labels come from the same functions).
The skull base, the shoulder and a side-marker tag lie outside the spine box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from preprocessing.vocab import VIEWS

LEVELS = 6  # vertebral bodies C2..C7
FORAMINA = LEVELS - 1
SUPERSAMPLE = 2  # drawn at twice the size, then averaged down (the anti-aliasing of this family)
MAX_TILT_DEG = 15.0
NARROWED_COUNT_P = (0.25, 0.25, 0.2, 0.15, 0.15)  # overlap on: P(1..5 narrowed foramina | abnormal)
RIM = 0.06  # cortical rim around a foramen, in units (the vertebral pitch)
MAX_HALF_HEIGHT = 0.4  # foramina sit one unit apart: with their rims they never touch
CONTOUR_POINTS = 40
OVERLAY_STEP = 4  # pixels per sample of the smooth soft-tissue overlay


@dataclass(frozen=True)
class Pose:
    """One view's geometry: pitch in pixels, centre, tilt, S-curve, sideways shear."""

    unit: float
    mid: tuple[float, float]
    tilt: float  # radians from vertical
    bow: float  # single (lordotic) curvature, fraction of the spine length
    wave: float  # S-shaped second curvature, fraction of the spine length
    shear: float  # sideways shear of the left view's projection (0 = none)


@dataclass(frozen=True)
class HeightForamen:
    """One foramen: half-height and half-width (units), squareness exponent, lumen density, rim thickness (units)."""

    half_height: float
    half_width: float
    power: float  # superellipse exponent: 2 = ellipse, 4 = rounded box
    density: float
    rim: float


def foramen_heights(difficulty: float, overlap: bool = True) -> tuple[tuple[float, float], tuple[float, float]]:
    """(normal height/width ratio range, narrowing factor range) of a foramen, both label-free in shape and area.

    A narrowed foramen's height/width ratio is the normal one times the factor (its area is kept).
    Harder: the factor comes closer to 1, so narrowed and normal heights look more alike.
    """
    if not overlap:
        return (2.0, 2.4), (0.3, 0.4)
    return (1.6, 2.6), (0.2 + 0.3 * difficulty, 0.4 + 0.3 * difficulty)


def height_foramina(abnormal: bool, difficulty: float, overlap: bool, rng: np.random.Generator) -> list[HeightForamen]:
    """Five foramina; an abnormal view lowers the height of some of them, keeping the area of lumen and rim.

    A lower, wider foramen of the same area has a shorter outline, so a rim of the same thickness would hold
    less bright bone: a narrowed foramen's rim thickens (sclerotic margins) until the rim's area is the normal
    one's. Lumen area, rim area, squareness and darkness are then label-free; only the shape carries the label.
    """
    (q_low, q_high), (f_low, f_high) = foramen_heights(difficulty, overlap)
    radius = rng.uniform(0.19, 0.27, FORAMINA) if overlap else rng.uniform(0.22, 0.24, FORAMINA)  # sqrt(area)
    ratio = rng.uniform(q_low, q_high, FORAMINA)  # height / width, normal: taller than wide
    radius = np.minimum(radius, MAX_HALF_HEIGHT / np.sqrt(ratio))  # neighbours never touch; capped before any
    # narrowing, so the area stays label-free
    power = rng.uniform(2.5, 4.0, FORAMINA)
    density = rng.uniform(0.05, 0.22, FORAMINA)
    factor = rng.uniform(f_low, f_high, FORAMINA)
    # rim area over the squareness factor: (h + t)(w + t) - h w = t (h + w) + t**2, with t = RIM before any narrowing
    rim_area = RIM * radius * (np.sqrt(ratio) + 1.0 / np.sqrt(ratio)) + RIM**2
    if abnormal:
        p = NARROWED_COUNT_P if overlap else (0.0, 0.0, 1 / 3, 1 / 3, 1 / 3)
        narrowed = rng.choice(FORAMINA, size=rng.choice(np.arange(1, FORAMINA + 1), p=p), replace=False)
        ratio[narrowed] *= factor[narrowed]
    height, width = radius * np.sqrt(ratio), radius / np.sqrt(ratio)
    rim = 0.5 * (np.sqrt((height + width) ** 2 + 4.0 * rim_area) - (height + width))  # the t that keeps it
    return [HeightForamen(*values) for values in zip(height, width, power, density, rim)]


def sample_pose(rng: np.random.Generator, size: tuple[int, int], pose: bool) -> Pose:
    """A patient's geometry; the spine and its box stay well inside the image."""
    width, height = size
    scale = rng.uniform(0.85, 1.15) if pose else 1.0
    unit = min(0.066 * height, 0.19 * width) * scale
    tilt = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG)) if pose else 0.0
    bow, wave = (rng.uniform(-0.04, 0.1), rng.uniform(-0.04, 0.04)) if pose else (0.04, 0.0)
    mid = (width * rng.uniform(0.47, 0.53), height * rng.uniform(0.48, 0.52))
    return Pose(unit=unit, mid=mid, tilt=tilt, bow=bow, wave=wave, shear=0.0)


def view_pose(patient: Pose, view: str, pose: bool, view_gap: bool, rng: np.random.Generator) -> Pose:
    """The patient re-positioned for one view; the left view is sheared sideways when the gap is on."""
    tilt = patient.tilt + (math.radians(rng.normal(0.0, 3.0)) if pose else 0.0)
    shear = rng.uniform(0.06, 0.12) if view_gap and view == "left" else 0.0
    return Pose(patient.unit, patient.mid, tilt, patient.bow, patient.wave, shear)


class Frame:
    """Maps spine coordinates (s along the axis, a sideways, both in units) to supersampled pixels."""

    def __init__(self, pose: Pose):
        self.pose = pose
        self.scale = SUPERSAMPLE

    def __call__(self, s: np.ndarray, a: np.ndarray) -> np.ndarray:
        p = self.pose
        length = LEVELS * p.unit
        t = np.asarray(s, float) * p.unit / length
        offset = (p.bow * np.sin(math.pi * t) + p.wave * np.sin(2 * math.pi * t)) * length
        direction = np.array([math.sin(p.tilt), math.cos(p.tilt)])
        normal = np.array([math.cos(p.tilt), -math.sin(p.tilt)])
        along = (t - 0.5) * length
        side = np.asarray(a, float) * p.unit - offset  # the curve bows forward, towards the bodies
        points = np.array(p.mid) + np.outer(along, direction) + np.outer(side, normal)
        points[:, 0] += p.shear * (points[:, 1] - p.mid[1])
        return points * self.scale


def superellipse(frame: Frame, s: float, a: float, half_s: float, half_a: float, power: float) -> np.ndarray:
    """Polygon of a superellipse centred at (s, a) in spine coordinates (half-extents in units)."""
    phi = np.linspace(0.0, 2.0 * math.pi, CONTOUR_POINTS, endpoint=False)
    cos, sin = np.cos(phi), np.sin(phi)
    da = half_a * np.sign(cos) * np.abs(cos) ** (2.0 / power)
    ds = half_s * np.sign(sin) * np.abs(sin) ** (2.0 / power)
    return frame(s + ds, a + da)


def band(frame: Frame, s0: float, s1: float, a0: float, a1: float) -> np.ndarray:
    """Polygon of the region s0..s1 along the spine and a0..a1 sideways (follows the curve)."""
    s = np.linspace(s0, s1, 12)
    return np.concatenate([frame(s, np.full_like(s, a0)), frame(s[::-1], np.full_like(s, a1))])


def fill(canvas: np.ndarray, polygon: np.ndarray, value: float, add: bool = False) -> None:
    """Fill a polygon with a density (or add it: overlapping soft tissue sums)."""
    points = [np.round(polygon).astype(np.int32)]
    if add:
        mask = np.zeros(canvas.shape, np.uint8)
        cv2.fillPoly(mask, points, 1)
        canvas[mask > 0] += value
    else:
        cv2.fillPoly(canvas, points, float(value))


@dataclass(frozen=True)
class Bones:
    """A patient's own bone, the same in both views: disc-space heights and osteophyte-like spurs (spine units)."""

    discs: np.ndarray  # disc-space height below each body (dark gaps that are not the label)
    spurs: tuple[tuple[float, float, float], ...]  # (s of the base, s of the tip, how far sideways the tip reaches)
    back_spurs: tuple[float, ...]  # s positions of spurs on the column's back


def sample_bones(rng: np.random.Generator, overlap: bool) -> Bones:
    """Disc heights and spurs of one patient (overlap off: equal discs, no spurs)."""
    if not overlap:
        return Bones(np.full(LEVELS, 0.14), (), ())
    discs = rng.uniform(0.08, 0.22, LEVELS)
    spurs = []
    for _ in range(rng.integers(0, 5)):  # on body corners, pointing up or down
        level, upper = rng.integers(0, LEVELS), rng.random() < 0.5
        base = level + (0.12 if upper else 0.88)
        spurs.append((base, base + (-0.18 if upper else 0.18) * rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.15)))
    back = tuple(rng.uniform(0.5, LEVELS - 0.5, rng.integers(0, 3)))
    return Bones(discs, tuple(spurs), back)


def render_patient(rng: np.random.Generator, anatomy: dict[str, bool], difficulty: float, size: tuple[int, int],
                   nuisances) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Both views of one patient: ``{view: (uint8 image, spine box)}``; ``anatomy[view]`` is abnormal or not."""
    patient = sample_pose(rng, size, nuisances.pose)
    bones = sample_bones(rng, nuisances.overlap)
    views = {}
    for view in VIEWS:
        pose = view_pose(patient, view, nuisances.pose, nuisances.view_gap, rng)
        foramina = height_foramina(anatomy[view], difficulty, nuisances.overlap, rng)
        views[view] = render_view(pose, view, bones, foramina, size, nuisances, rng)
    return views


def render_view(pose: Pose, view: str, bones: Bones, foramina: list[HeightForamen], size: tuple[int, int], nuisances,
                rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Draw one view (densities at twice the size), expose it, average it down; returns the image and its box."""
    width, height = size
    canvas = np.zeros((height * SUPERSAMPLE, width * SUPERSAMPLE), np.float32)
    frame = Frame(pose)
    fill(canvas, band(frame, -2.0, LEVELS + 2.0, -2.4, 2.8), 0.3)  # the neck's soft tissue
    spine = draw_spine(canvas, frame, bones, foramina, rng)
    box = tight_box(spine, size)
    if nuisances.overlap:
        draw_overlay(canvas, frame, rng)
    draw_distractors(canvas, box, size, rng)
    if view == "left":
        canvas = canvas[:, ::-1].copy()
        box = [width - box[2], box[1], width - box[0], box[3]]
    gap = nuisances.view_gap and view == "left"
    image = expose(canvas, size, nuisances.exposure, gap, rng)
    draw_tag(image, "L" if view == "left" else "R", size)
    return image, box


def draw_spine(canvas: np.ndarray, frame: Frame, bones: Bones, foramina: list[HeightForamen],
               rng: np.random.Generator) -> list[np.ndarray]:
    """Bodies with disc spaces, the posterior column with its foramina, spurs; returns the spine polygons."""
    polygons = []
    for level, disc in enumerate(bones.discs):
        body = superellipse(frame, level + 0.5, -0.62, 0.5 - disc / 2, 0.56, 6.0)
        fill(canvas, body, rng.uniform(0.66, 0.74))
        fill(canvas, superellipse(frame, level + 0.5, -0.62, 0.38 - disc / 2, 0.44, 6.0), 0.6)  # cancellous core
        polygons.append(body)
    column = band(frame, 0.1, LEVELS - 0.1, 0.12, 1.78)
    fill(canvas, column, 0.58)
    polygons.append(column)
    for level in range(1, LEVELS):  # facet joints: thin dark lines across the column at each level
        fill(canvas, band(frame, level - 0.03, level + 0.03, 1.35, 1.78), 0.4)
    for j, foramen in enumerate(foramina):
        s = j + 1.0
        rim = foramen.rim
        fill(canvas, superellipse(frame, s, 0.9, foramen.half_height + rim, foramen.half_width + rim, foramen.power),
             0.82)
        fill(canvas, superellipse(frame, s, 0.9, foramen.half_height, foramen.half_width, foramen.power),
             foramen.density)
    draw_spurs(canvas, frame, bones)
    return polygons


def draw_spurs(canvas: np.ndarray, frame: Frame, bones: Bones) -> None:
    """Osteophyte-like bright spurs on body corners and the column's back: bright bone that is not the label."""
    for base, tip, reach in bones.spurs:
        fill(canvas, np.concatenate([frame([base, base], [-1.16, -0.9]), frame([tip], [-1.2 - reach])]), 0.85)
    for s in bones.back_spurs:
        fill(canvas, np.concatenate([frame([s - 0.12, s + 0.12], [1.76, 1.76]), frame([s], [1.95])]), 0.8)


def draw_overlay(canvas: np.ndarray, frame: Frame, rng: np.random.Generator) -> None:
    """Soft tissue over the spine: smooth density blobs and the trachea's air column in front of the bodies."""
    height, width = canvas.shape
    coarse = OVERLAY_STEP * SUPERSAMPLE  # the blobs are smooth: computed on a coarse grid, then upsampled
    yy, xx = np.mgrid[0:height:coarse, 0:width:coarse].astype(np.float32)
    blobs = np.zeros(yy.shape, np.float32)
    for _ in range(rng.integers(2, 5)):
        centre = frame([rng.uniform(0.0, LEVELS)], [rng.uniform(-1.5, 2.5)])[0]
        sigma = rng.uniform(0.8, 2.0) * frame.pose.unit * frame.scale
        blobs += rng.uniform(-0.07, 0.07) * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))
    canvas += cv2.resize(blobs, (width, height), interpolation=cv2.INTER_LINEAR)
    front = rng.uniform(-2.2, -1.8)
    fill(canvas, band(frame, -2.0, LEVELS + 2.0, front, front + rng.uniform(0.4, 0.6)), -0.12, add=True)


def tight_box(polygons: list[np.ndarray], size: tuple[int, int]) -> list[int]:
    """Integer box (final pixels) around every spine polygon, clipped to the image."""
    points = np.concatenate(polygons) / SUPERSAMPLE
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int)
    return [max(int(x0), 0), max(int(y0), 0), min(int(x1), size[0]), min(int(y1), size[1])]


def draw_distractors(canvas: np.ndarray, box: list[int], size: tuple[int, int], rng: np.random.Generator) -> None:
    """Skull base above the box, a shoulder below it (what the ROI crop removes)."""
    width, height = size
    k = SUPERSAMPLE
    x0, y0, x1, y1 = box
    gap = 0.025 * height
    bottom = y0 - gap  # the occiput and mastoid: a bright lumpy polygon whose lowest point stays above the box
    xs = np.linspace(0.0, width, 9)
    lows = bottom - rng.uniform(0.0, 0.06, xs.size) * height
    skull = np.concatenate([np.stack([xs, lows], 1), [[width, 0.0], [0.0, 0.0]]])
    fill(canvas, skull * k, 0.68)
    fill(canvas, (skull + [0.0, -0.04 * height]) * k, 0.45)
    top = y1 + gap + rng.uniform(0.0, 0.04) * height  # the shoulder: a broad dense mound below the box
    cx = rng.uniform(0.6, 0.9) * width
    cv2.ellipse(canvas, (round(cx * k), round((top + 0.25 * height) * k)), (round(0.45 * width * k),
                round(0.25 * height * k)), 0.0, 0.0, 360.0, 0.62, -1)


def expose(canvas: np.ndarray, size: tuple[int, int], exposure: bool, gap: bool, rng: np.random.Generator) -> np.ndarray:
    """Attenuation, heel effect and a sigmoid detector curve, averaged down; signal-dependent noise; uint8.

    The grey range stays inside about 40-215, so nothing saturates and histogram equalization has room.
    """
    width, height = size
    if exposure:
        mu, dose, heel = rng.uniform(2.2, 3.2), rng.uniform(-0.25, 0.25), rng.uniform(-0.15, 0.15)
        low, span, steep = rng.uniform(35.0, 60.0), rng.uniform(120.0, 155.0), rng.uniform(2.2, 3.0)
    else:
        mu, dose, heel, low, span, steep = 2.7, 0.0, 0.0, 45.0, 145.0, 2.6
    density = np.clip(canvas, 0.0, 1.2)
    ramp = np.linspace(-heel, heel, canvas.shape[1], dtype=np.float32)[None, :]  # the anode heel, sideways
    log_exposure = dose + ramp - mu * density  # log of the transmitted intensity
    response = 1.0 / (1.0 + np.exp(steep * (log_exposure + 0.5 * mu)))  # dense bone: little exposure, bright
    small = cv2.resize(response.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    if gap:  # another projection: coarser detector sampling
        coarse = (max(8, round(width * 0.7)), max(8, round(height * 0.7)))
        small = cv2.resize(cv2.resize(small, coarse, interpolation=cv2.INTER_AREA), (width, height),
                           interpolation=cv2.INTER_LINEAR)
    grey = low + span * small
    grey += rng.normal(0.0, 1.0, grey.shape) * np.sqrt(grey) * (0.35 if gap else 0.25)  # quantum noise
    return np.clip(np.round(grey), 0, 255).astype(np.uint8)


def draw_tag(image: np.ndarray, letter: str, size: tuple[int, int]) -> None:
    """The side marker: a bright square tag with a dark letter, top-left (after mirroring, so readable)."""
    width, height = size
    side = max(6, round(0.045 * height))
    x, y = round(0.04 * width), round(0.02 * height)
    cv2.rectangle(image, (x, y), (x + side, y + side), 235, -1)
    scale = side / 30.0
    thickness = max(1, round(side / 10))
    (text_w, text_h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_PLAIN, scale, thickness)
    cv2.putText(image, letter, (x + (side - text_w) // 2, y + (side + text_h) // 2), cv2.FONT_HERSHEY_PLAIN,
                scale, 20, thickness, cv2.LINE_8)
