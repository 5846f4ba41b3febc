"""Phantom family v2 (height: test_phantom_family.py): determinism, labels, boxes, view gap, switches, noise, stenosis."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cluster.errors import FsweepError
from preprocessing.phantom import (
    ABNORMAL_FRACTION,
    FORAMINA,
    _foramina,
    foramen_shape,
    view_labels,
    write_phantom,
)

SMALL = (74, 126)  # width x height for the tests that write their own phantom
TINY = (148, 252)  # the conftest tiny phantom's size
SWITCHES = ("overlap", "exposure", "pose", "view_gap", "paired_labels")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(phantom: Path) -> pd.DataFrame:
    return pd.read_csv(phantom / "manifest.csv")


def _image(phantom: Path, name: str) -> np.ndarray:
    return cv2.imread(str(phantom / name), cv2.IMREAD_UNCHANGED)


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    first = write_phantom(tmp_path / "a", patients=3, seed=7, size=SMALL)
    write_phantom(tmp_path / "b", patients=3, seed=7, size=SMALL)
    write_phantom(tmp_path / "c", patients=3, seed=8, size=SMALL)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert first["images"] == 6 and first["patients"] == 3
    assert Path(first["manifest"]).name == "manifest.csv"


def test_manifest_follows_the_contract(tiny_phantom):
    manifest = _manifest(tiny_phantom)
    assert list(manifest.columns) == ["image", "patient_id", "view", "label", "x0", "y0", "x1", "y1"]
    assert len(manifest) == 80 and manifest["patient_id"].nunique() == 40
    assert (manifest.groupby("patient_id")["view"].apply(sorted) == pd.Series([["left", "right"]] * 40).values).all()
    assert set(manifest["label"]) == {"abnormal", "normal"}
    for image in manifest["image"]:
        assert (tiny_phantom / image).is_file()


def test_64_percent_abnormal_per_view_with_correlated_sides(tiny_phantom):
    manifest = _manifest(tiny_phantom)
    abnormal = manifest.assign(abnormal=manifest["label"] == "abnormal")
    for view, group in abnormal.groupby("view"):
        assert abs(group["abnormal"].mean() - ABNORMAL_FRACTION) <= 0.02, view
    by_patient = abnormal.pivot(index="patient_id", columns="view", values="abnormal")
    assert (by_patient["left"] != by_patient["right"]).any(), "some patients differ between sides"
    both = (by_patient["left"] & by_patient["right"]).mean()
    assert both > ABNORMAL_FRACTION**2 + 0.05, "stenosis is often bilateral: more than independent sides give"


def test_unpaired_labels_are_placed_independently_per_side():
    both = {}
    for paired in (True, False):
        labels = [view_labels(200, seed, paired) for seed in range(10)]
        assert all(abs(lab[v].mean() - ABNORMAL_FRACTION) < 0.01 for lab in labels for v in ("left", "right"))
        both[paired] = np.mean([(lab["left"] & lab["right"]).mean() for lab in labels])
    assert abs(both[False] - ABNORMAL_FRACTION**2) < 0.03
    assert both[True] > both[False] + 0.07


def test_label_noise_flips_the_requested_share_and_keeps_the_abnormal_share(tmp_path):
    noisy = write_phantom(tmp_path / "noisy", patients=50, seed=2, size=(40, 68), label_noise=0.08)
    clean = write_phantom(tmp_path / "clean", patients=50, seed=2, size=(40, 68), label_noise=0.0)
    default = write_phantom(tmp_path / "default", patients=50, seed=2, size=(40, 68))
    assert noisy["noisy_labels"] == 8 and clean["noisy_labels"] == 0  # round(0.08 * 50 / 2) each way, per side
    assert default["noisy_labels"] == 4, "a few per cent by default"
    assert noisy["abnormal_fraction"] == clean["abnormal_fraction"] == 0.64
    # the manifest labels stay the same; the anatomy of the noisy views differs
    assert _manifest(tmp_path / "noisy")["label"].equals(_manifest(tmp_path / "clean")["label"])


def test_boxes_lie_inside_the_image_enclose_the_bone_and_leave_out_skull_and_clavicle(tiny_phantom):
    manifest = _manifest(tiny_phantom)
    for row in manifest.itertuples():
        image = _image(tiny_phantom, row.image).astype(float)
        height, width = image.shape
        assert (height, width) == (TINY[1], TINY[0])
        assert 0 <= row.x0 < row.x1 <= width and 0 <= row.y0 < row.y1 <= height
        assert row.y1 - row.y0 >= 0.3 * height, "C2-C7 span a good part of the neck"
        assert row.y0 >= 0.1 * height and row.y1 <= 0.9 * height, "skull above and clavicle below stay out"
        inside = image[row.y0:row.y1, row.x0:row.x1].mean()
        pad = 6  # a band around the box: soft tissue and air
        ring = image[max(row.y0 - pad, 0):row.y1 + pad, max(row.x0 - pad, 0):row.x1 + pad].sum() - inside * (
            (row.y1 - row.y0) * (row.x1 - row.x0))
        ring_area = (min(row.y1 + pad, height) - max(row.y0 - pad, 0)) * (
            min(row.x1 + pad, width) - max(row.x0 - pad, 0)) - (row.y1 - row.y0) * (row.x1 - row.x0)
        assert inside > ring / ring_area, row.image


def _box_size(manifest: pd.DataFrame, view: str) -> np.ndarray:
    rows = manifest[manifest["view"] == view].sort_values("patient_id")
    return np.stack([(rows["x1"] - rows["x0"]).to_numpy(), (rows["y1"] - rows["y0"]).to_numpy()], axis=1)


def test_left_view_is_not_an_exact_mirror_of_the_right(tiny_phantom, tmp_path):
    manifest = _manifest(tiny_phantom)
    left, right = _box_size(manifest, "left"), _box_size(manifest, "right")
    assert (left[:, 1] / right[:, 1]).mean() > 1.04, "the left projection magnifies"
    assert (left[:, 0] / left[:, 1]).mean() < (right[:, 0] / right[:, 1]).mean(), "and foreshortens sideways"
    # switched off (and no re-positioning between views), the left box mirrors the right one exactly
    write_phantom(tmp_path, patients=10, seed=0, size=TINY, view_gap=False, pose=False)
    plain = _manifest(tmp_path).set_index(["patient_id", "view"])
    for patient in plain.index.get_level_values(0).unique():
        l, r = plain.loc[(patient, "left")], plain.loc[(patient, "right")]
        assert (l.x0, l.x1, l.y0, l.y1) == (TINY[0] - r.x1, TINY[0] - r.x0, r.y0, r.y1)


def test_left_view_still_resembles_the_mirrored_right_view(tiny_phantom):
    manifest = _manifest(tiny_phantom).set_index(["patient_id", "view"])
    gains = []
    for patient in manifest.index.get_level_values(0).unique()[:10]:
        left = _image(tiny_phantom, manifest.loc[(patient, "left")].image).astype(float)
        right = _image(tiny_phantom, manifest.loc[(patient, "right")].image).astype(float)
        mirrored = np.corrcoef(left[:, ::-1].ravel(), right.ravel())[0, 1]
        unmirrored = np.corrcoef(left.ravel(), right.ravel())[0, 1]
        gains.append(mirrored - unmirrored)
    assert np.mean(gains) > 0.1, "Flip turns a left view into a right-looking one"


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_nuisance_switch_changes_the_output(tmp_path, switch):
    write_phantom(tmp_path / "on", patients=4, seed=1, size=SMALL)
    write_phantom(tmp_path / "off", patients=4, seed=1, size=SMALL, **{switch: False})
    on, off = _files(tmp_path / "on"), _files(tmp_path / "off")
    assert on.keys() == off.keys() and on != off


def _grey_levels(phantom: Path) -> np.ndarray:
    return np.array([np.median(_image(phantom, name)) for name in _manifest(phantom)["image"]])


def test_exposure_varies_per_image_only_when_on(tmp_path):
    write_phantom(tmp_path / "on", patients=10, seed=4, size=SMALL)
    write_phantom(tmp_path / "off", patients=10, seed=4, size=SMALL, exposure=False)
    assert _grey_levels(tmp_path / "on").std() > 2 * _grey_levels(tmp_path / "off").std()


def test_pose_tilts_the_spine_only_when_on(tmp_path):
    write_phantom(tmp_path / "on", patients=20, seed=4, size=TINY)
    write_phantom(tmp_path / "off", patients=20, seed=4, size=TINY, pose=False)
    aspect = {name: _box_size(_manifest(tmp_path / name), "right") for name in ("on", "off")}
    ratio = {name: a[:, 0] / a[:, 1] for name, a in aspect.items()}
    assert ratio["on"].max() > ratio["off"].max() + 0.15, "a tilted spine needs a wider box"
    assert ratio["off"].std() < 0.05


def _draw(abnormal: bool, difficulty: float, overlap: bool, n: int = 400) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    views = [_foramina(abnormal, difficulty, overlap, rng) for _ in range(n)]
    return {field: np.array([[getattr(f, field) for f in view] for view in views])
            for field in ("radius", "ratio", "tone", "angle")}


def _narrowed(angle: np.ndarray) -> np.ndarray:
    """Foramina whose long axis runs closer to sideways than along the spine."""
    return np.abs(((angle + 90.0) % 180.0) - 90.0) < 45.0


def test_stenosis_is_an_orientation_and_size_shape_and_tone_are_label_free():
    normal, abnormal = _draw(False, 0.5, True), _draw(True, 0.5, True)
    assert normal["angle"].shape == (400, FORAMINA)
    assert not _narrowed(normal["angle"]).any() and _narrowed(abnormal["angle"]).any(axis=1).all()
    for field in ("radius", "ratio", "tone"):  # what decides a foramen's pixels, up to rotation
        assert abs(normal[field].mean() - abnormal[field].mean()) < 0.01, field
        assert abs(normal[field].std() - abnormal[field].std()) < 0.01, field
    counts = _narrowed(abnormal["angle"]).sum(axis=1)
    assert (counts <= 2).mean() >= 0.4, "many abnormal views narrow only one or two foramina"
    separated = _narrowed(_draw(True, 0.5, False)["angle"]).sum(axis=1)
    assert (separated >= 3).all(), "overlap off: three to five narrowed foramina"


def test_normal_and_narrowed_widths_overlap():
    """Width = a foramen's extent along the spine; sizes vary enough that the two ranges overlap."""
    def widths(draw):
        long, short = draw["radius"] / np.sqrt(draw["ratio"]), draw["radius"] * np.sqrt(draw["ratio"])
        theta = np.radians(draw["angle"])
        return np.hypot(long * np.sin(theta), short * np.cos(theta))[..., None]
    normal, abnormal = _draw(False, 0.5, True), _draw(True, 0.5, True)
    normal_w = widths(normal).ravel()
    narrowed_w = widths(abnormal)[_narrowed(abnormal["angle"])].ravel()
    assert narrowed_w.mean() < normal_w.mean()
    assert narrowed_w.max() > np.percentile(normal_w, 10)


def test_difficulty_makes_foramina_rounder_and_wobblier():
    (_, easy_high), easy_jitter = foramen_shape(0.0)
    (hard_low, hard_high), hard_jitter = foramen_shape(1.0)
    assert easy_high <= hard_low and easy_jitter < hard_jitter
    assert hard_high <= 1.0
    easy, hard = _draw(False, 0.0, True), _draw(False, 1.0, True)
    assert easy["ratio"].mean() < hard["ratio"].mean() - 0.2
    assert np.abs(easy["angle"] - 90).max() < np.abs(hard["angle"] - 90).max()


def test_images_use_a_narrow_grey_range(tiny_phantom):
    for name in _manifest(tiny_phantom)["image"][:20]:
        image = _image(tiny_phantom, name)
        assert image.dtype == np.uint8 and image.ndim == 2
        low, high = np.percentile(image, [1, 99])
        assert high - low < 130, "at most about half the 8-bit range: histogram equalization has room to matter"


def test_contact_sheet_shows_samples_with_boxes(tiny_phantom):
    sheet = cv2.imread(str(tiny_phantom / "contact_sheet.png"), cv2.IMREAD_UNCHANGED)
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[1] == 4 * TINY[0] and sheet.shape[0] == 2 * TINY[1]
    green = (sheet[..., 1] == 255) & (sheet[..., 0] == 0) & (sheet[..., 2] == 0)
    assert green.sum() > 8 * 60, "each sample carries its box"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"patients": 0}, "--patients"), ({"seed": -1}, "--seed"), ({"difficulty": 1.5}, "--difficulty"),
     ({"size": (20, 400)}, "--size"), ({"label_noise": 0.7}, "label_noise"), ({"family": "v1"}, "--family")],
)
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(FsweepError, match=message):
        write_phantom(tmp_path / "out", **kwargs)
