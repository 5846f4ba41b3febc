"""The YOLO ROI detector: tiny training, loading and predicting, the crop, and the full-frame fallback."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest

from preprocessing.decode import decode_image
from cluster.errors import FsweepError
from preprocessing.roi import RoiDetector, crop_box, margin_box, train_detector
from preprocessing.recipe import preprocess_image
from conftest import ROI_SETTINGS, make_spec
from preprocessing.store import build_variant
from fsweep.cli import main as fsweep


ANNOTATED = 24  # boxed train rows the test detector learns from


@pytest.fixture(scope="module")
def roi_dir(tiny_dataset, tmp_path_factory):
    """A detector trained through `fsweep roi train` on the tiny phantom: 30 epochs at 128 px, about a minute."""
    out = tmp_path_factory.mktemp("roi")
    args = ["roi", "train", str(tiny_dataset), "--out", str(out), "--annotated", str(ANNOTATED),
            "--epochs", "30", "--imgsz", "128", "--batch", "4"]
    assert fsweep(args) == 0
    return out


@pytest.mark.slow
def test_training_writes_a_usable_detector(roi_dir, tiny_dataset):
    metrics = json.loads((roi_dir / "metrics.json").read_text())
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet")
    assert metrics["train_images"] == ANNOTATED
    assert metrics["val_images"] == int((rows["split"] == "val").sum())
    assert metrics["imgsz"] == 128
    assert metrics["map50"] >= 0.8  # measured 0.95 on this phantom; the paper's detector: 0.97
    assert len(list((roi_dir / "yolo_data" / "labels" / "train").iterdir())) == ANNOTATED
    detector = RoiDetector(roi_dir)
    assert detector.sha256 == metrics["sha256"] and detector.imgsz == 128
    hits = 0
    for val in rows[rows["split"] == "val"].itertuples():
        found = detector.detect(decode_image(val.image))
        hits += found is not None and _iou(found[0], (val.x0, val.y0, val.x1, val.y1)) > 0.5
    assert hits >= 0.75 * metrics["val_images"]


@pytest.mark.slow
def test_yolo_labels_are_normalised_boxes(roi_dir, tiny_dataset):
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet").set_index("image_id")
    label = next((roi_dir / "yolo_data" / "labels" / "val").iterdir())
    cls, cx, cy, w, h = label.read_text().split()
    row = rows.loc[label.stem]
    assert cls == "0"
    assert float(cx) == pytest.approx((row.x0 + row.x1) / 2 / row.width, abs=1e-5)
    assert float(h) == pytest.approx((row.y1 - row.y0) / row.height, abs=1e-5)
    image = roi_dir / "yolo_data" / "images" / "val" / f"{label.stem}.bmp"  # uncompressed: fast to decode each epoch
    np.testing.assert_array_equal(cv2.imread(str(image), cv2.IMREAD_UNCHANGED), decode_image(row.image))  # lossless


def test_crop_adds_the_margin_and_stays_inside():
    img = np.arange(100 * 80, dtype=np.uint32).reshape(100, 80).astype(np.uint8)
    assert margin_box((20, 30, 40, 70), 0.1, img.shape) == (18, 26, 42, 74)
    np.testing.assert_array_equal(crop_box(img, (20, 30, 40, 70), 0.0), img[30:70, 20:40])
    assert crop_box(img, (2, 1, 78, 99), 0.5).shape == img.shape  # clipped to the image
    with pytest.raises(FsweepError, match="empty"):
        crop_box(img, (90, 10, 120, 20), 0.0)


@pytest.mark.slow
def test_nothing_found_keeps_the_full_frame_and_flags_it(local_ray, roi_dir, tiny_dataset, tmp_path):
    detector = RoiDetector(roi_dir)
    dataset = _with_a_blank_image(tiny_dataset, tmp_path / "dataset")
    rows = pd.read_parquet(dataset / "dataset.parquet").set_index("image_id")
    variant = build_variant(dataset, tmp_path / "store", make_spec(he="global", size=32, roi_dir=str(roi_dir)))
    index = variant.index.set_index("image_id")
    assert len(index) == len(rows)
    assert index.loc["blank", "fallback"] and not index["fallback"].all()
    for image_id, entry in index.iterrows():
        img = decode_image(rows.loc[image_id, "image"])
        found = detector.detect(img)
        assert entry["fallback"] == (found is None)
        box = (entry.x0, entry.y0, entry.x1, entry.y1)
        if found is None:
            assert box == (0, 0, img.shape[1], img.shape[0]) and math.isnan(entry["conf"])
        else:
            assert box == pytest.approx(found[0], abs=1e-3) and entry["conf"] == pytest.approx(found[1], abs=1e-4)
    # the stored pixels are the recipe with that box, fallback or not
    for image_id in ("blank", index.index[~index["fallback"]][0]):
        split, view, pos = index.loc[image_id, ["split", "view", "pos"]]
        expected = preprocess_image(rows.loc[image_id, "image"], variant.spec, detector)
        np.testing.assert_array_equal(variant.images(split, view)[pos], expected)
    assert json.loads((variant.path / "variant.json").read_text())["fallback"] == int(index["fallback"].sum())


def test_bad_inputs_are_one_line_errors(tiny_dataset, tmp_path):
    with pytest.raises(FsweepError, match="no best.pt"):
        RoiDetector(tmp_path)
    with pytest.raises(FsweepError, match="never downloads"):
        train_detector(tiny_dataset, tmp_path / "out", **{**ROI_SETTINGS, "epochs": 1, "model": "yolo11n.pt"})
    unboxed = tmp_path / "unboxed"
    unboxed.mkdir()
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet")
    rows.assign(x0=np.nan).to_parquet(unboxed / "dataset.parquet")
    with pytest.raises(FsweepError, match="boxed train and val rows"):
        train_detector(unboxed, tmp_path / "out2", **{**ROI_SETTINGS, "epochs": 1})


def _with_a_blank_image(dataset, out):
    """A copy of DATASET whose first val image is replaced by a flat grey frame (nothing to detect)."""
    out.mkdir()
    rows = pd.read_parquet(dataset / "dataset.parquet")
    first = rows.index[rows["split"] == "val"][0]
    blank = out / "blank.png"
    cv2.imwrite(str(blank), np.full((rows.loc[first, "height"], rows.loc[first, "width"]), 90, np.uint8))
    rows.loc[first, ["image_id", "image"]] = ["blank", str(blank)]
    rows.to_parquet(out / "dataset.parquet")
    return out


def _iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class _Payload:
    """Unpickling this runs ``open(path, 'w')``: what a hostile best.pt could do instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_detector_file_with_foreign_objects_is_refused_without_running_them(tmp_path):
    import torch

    roi = tmp_path / "roi"
    roi.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker), "train_args": {}}, roi / "best.pt")
    with pytest.raises(FsweepError, match="not a loadable ultralytics detector under safe loading") as error:
        RoiDetector(roi)
    assert "\n" not in str(error.value)
    assert not marker.exists()  # nothing in the file ran
