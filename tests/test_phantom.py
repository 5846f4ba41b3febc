"""The synthetic phantom: determinism, labels, boxes, mirroring, visible stenosis."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cluster.errors import FsweepError
from preprocessing.phantom import ABNORMAL_FRACTION, write_phantom

SMALL = (74, 126)  # width x height for the tests that write their own phantom


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(phantom: Path) -> pd.DataFrame:
    return pd.read_csv(phantom / "manifest.csv")


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


def test_about_64_percent_abnormal_per_view_labelled_independently(tiny_phantom):
    manifest = _manifest(tiny_phantom)
    abnormal = manifest.assign(abnormal=manifest["label"] == "abnormal")
    for view, group in abnormal.groupby("view"):
        assert abs(group["abnormal"].mean() - ABNORMAL_FRACTION) <= 0.02, view
    by_patient = abnormal.pivot(index="patient_id", columns="view", values="abnormal")
    assert (by_patient["left"] != by_patient["right"]).any(), "the two views must be labelled independently"


def test_boxes_lie_inside_the_image_and_leave_out_skull_and_clavicle(tiny_phantom):
    manifest = _manifest(tiny_phantom)
    for row in manifest.itertuples():
        height, width = cv2.imread(str(tiny_phantom / row.image), cv2.IMREAD_UNCHANGED).shape
        assert (height, width) == (252, 148)
        assert 0 <= row.x0 < row.x1 <= width and 0 <= row.y0 < row.y1 <= height
        assert row.y1 - row.y0 >= 0.4 * height, "C2-C7 span a good part of the neck"
        assert row.y0 >= 0.15 * height and row.y1 <= 0.85 * height, "skull above and clavicle below stay out"


def test_left_view_mirrors_the_right_views_geometry(tiny_phantom):
    manifest = _manifest(tiny_phantom).set_index(["patient_id", "view"])
    width = 148
    for patient in manifest.index.get_level_values(0).unique()[:10]:
        left, right = manifest.loc[(patient, "left")], manifest.loc[(patient, "right")]
        assert (left.x0, left.x1) == (width - right.x1, width - right.x0)
        assert (left.y0, left.y1) == (right.y0, right.y1)
        left_img = cv2.imread(str(tiny_phantom / left.image), cv2.IMREAD_UNCHANGED).astype(float)
        right_img = cv2.imread(str(tiny_phantom / right.image), cv2.IMREAD_UNCHANGED).astype(float)
        mirrored = np.corrcoef(left_img[:, ::-1].ravel(), right_img.ravel())[0, 1]
        unmirrored = np.corrcoef(left_img.ravel(), right_img.ravel())[0, 1]
        assert mirrored > 0.6 and mirrored > unmirrored + 0.15


def _dark_fraction(image: np.ndarray, box) -> float:
    """Share of the spine box darker than the middle of its grey range: the foramina."""
    crop = cv2.GaussianBlur(image[int(box.y0):int(box.y1), int(box.x0):int(box.x1)], (0, 0), 1.0).astype(float)
    low, high = np.percentile(crop, [1, 99])
    return float((crop < low + 0.25 * (high - low)).mean())


def test_abnormal_views_have_visibly_narrower_foramina(tiny_phantom):
    manifest = _manifest(tiny_phantom)
    dark = {"abnormal": [], "normal": []}
    for row in manifest.itertuples():
        image = cv2.imread(str(tiny_phantom / row.image), cv2.IMREAD_UNCHANGED)
        dark[row.label].append(_dark_fraction(image, row))
    assert np.mean(dark["abnormal"]) < 0.8 * np.mean(dark["normal"])
    assert np.median(dark["abnormal"]) < np.min(dark["normal"]) * 1.05


def test_difficulty_moves_narrowed_foramina_toward_normal(tmp_path):
    fractions = {}
    for difficulty in (0.0, 1.0):
        out = tmp_path / str(difficulty)
        write_phantom(out, patients=10, seed=3, difficulty=difficulty, size=(148, 252))
        manifest = _manifest(out)
        abnormal = manifest[manifest["label"] == "abnormal"]
        fractions[difficulty] = np.mean([
            _dark_fraction(cv2.imread(str(out / row.image), cv2.IMREAD_UNCHANGED), row) for row in abnormal.itertuples()
        ])
    assert fractions[0.0] < 0.85 * fractions[1.0]


def test_images_use_a_narrow_grey_range(tiny_phantom):
    image = cv2.imread(str(tiny_phantom / _manifest(tiny_phantom)["image"][0]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.ndim == 2
    low, high = np.percentile(image, [1, 99])
    assert high - low < 110, "a narrow range leaves room for histogram equalization to matter"


def test_contact_sheet_shows_samples_with_boxes(tiny_phantom):
    sheet = cv2.imread(str(tiny_phantom / "contact_sheet.png"), cv2.IMREAD_UNCHANGED)
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[1] == 4 * 148 and sheet.shape[0] == 2 * 252
    green = (sheet[..., 1] == 255) & (sheet[..., 0] == 0) & (sheet[..., 2] == 0)
    assert green.sum() > 8 * 100, "each sample carries its box"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"patients": 0}, "--patients"), ({"seed": -1}, "--seed"), ({"difficulty": 1.5}, "--difficulty"),
     ({"size": (20, 400)}, "--size")],
)
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(FsweepError, match=message):
        write_phantom(tmp_path / "out", **kwargs)
