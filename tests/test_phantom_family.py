"""Phantom family ``height``: determinism, labels, manifest, boxes, the label in the foramen's height, switches, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from preprocessing.phantom import ABNORMAL_FRACTION, FAMILIES, write_phantom
from preprocessing.phantom_height import FORAMINA, foramen_heights, height_foramina

from test_phantom import SMALL, SWITCHES, TINY, _files, _image, _manifest  # the phantom tests' helpers, defined once


@pytest.fixture(scope="module")
def height_phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("height")
    write_phantom(out, patients=40, seed=0, size=TINY, family="height")
    return out


def test_families_are_registered_once_and_v2_is_the_default(tmp_path):
    assert FAMILIES == ("v2", "height")
    write_phantom(tmp_path / "default", patients=2, seed=5, size=SMALL)
    write_phantom(tmp_path / "v2", patients=2, seed=5, size=SMALL, family="v2")
    assert _files(tmp_path / "default") == _files(tmp_path / "v2")


def test_same_arguments_same_bytes_and_the_family_changes_the_images(tmp_path):
    for name, seed, family in (("a", 7, "height"), ("b", 7, "height"), ("c", 8, "height"), ("v2", 7, "v2")):
        write_phantom(tmp_path / name, patients=3, seed=seed, size=SMALL, family=family)
    a, b, c, v2 = (_files(tmp_path / name) for name in ("a", "b", "c", "v2"))
    assert a == b
    assert a.keys() == c.keys() and a != c
    images = [k for k in a if k.startswith("images/")]
    assert images and all(a[k] != v2[k] for k in images), "another family draws other images"
    # the labels come from the same functions: same seed, same manifest labels in both families
    assert _manifest(tmp_path / "a")["label"].equals(_manifest(tmp_path / "v2")["label"])


def test_manifest_labels_and_boxes_follow_the_contract(height_phantom):
    manifest = _manifest(height_phantom)
    assert list(manifest.columns) == ["image", "patient_id", "view", "label", "x0", "y0", "x1", "y1"]
    assert len(manifest) == 80 and manifest["patient_id"].nunique() == 40
    for view, group in manifest.groupby("view"):
        assert abs((group["label"] == "abnormal").mean() - ABNORMAL_FRACTION) <= 0.02, view
    for row in manifest.itertuples():
        image = _image(height_phantom, row.image).astype(float)
        assert image.shape == (TINY[1], TINY[0]) and (height_phantom / row.image).is_file()
        assert 0 <= row.x0 < row.x1 <= TINY[0] and 0.1 * TINY[1] <= row.y0 < row.y1 <= 0.9 * TINY[1]
        assert row.y1 - row.y0 >= 0.3 * TINY[1], "C2-C7 span a good part of the neck"
        band = image[row.y0:row.y1, max(row.x1, 0):min(row.x1 + 6, TINY[0])]  # soft tissue beside the column
        if band.size:
            assert image[row.y0:row.y1, row.x0:row.x1].mean() > band.mean(), row.image


def _draw(abnormal: bool, difficulty: float = 0.5, overlap: bool = True, n: int = 400) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    views = [height_foramina(abnormal, difficulty, overlap, rng) for _ in range(n)]
    return {field: np.array([[getattr(f, field) for f in view] for view in views])
            for field in ("half_height", "half_width", "power", "density")}


def test_stenosis_lowers_a_foramen_height_and_keeps_its_area():
    normal, abnormal = _draw(False), _draw(True)
    assert normal["half_height"].shape == (400, FORAMINA)
    assert (normal["half_height"] > normal["half_width"]).all(), "a normal foramen is taller than wide"
    area = {name: d["half_height"] * d["half_width"] for name, d in (("normal", normal), ("abnormal", abnormal))}
    for values in (area, {n: d["power"] for n, d in (("normal", normal), ("abnormal", abnormal))},
                   {n: d["density"] for n, d in (("normal", normal), ("abnormal", abnormal))}):
        assert abs(values["normal"].mean() - values["abnormal"].mean()) < 0.01
        assert abs(values["normal"].std() - values["abnormal"].std()) < 0.01
    (low, _), _ = foramen_heights(0.5)
    narrowed = abnormal["half_height"] / abnormal["half_width"] < low  # below every normal height/width ratio
    assert narrowed.any(axis=1).mean() > 0.9 and not (normal["half_height"] / normal["half_width"] < low).any()
    assert abnormal["half_height"].mean() < normal["half_height"].mean() - 0.02
    assert (narrowed.sum(axis=1) <= 2).mean() >= 0.4, "many abnormal views narrow only one or two foramina"


def test_difficulty_brings_narrowed_heights_towards_normal_ones():
    easy, hard = _draw(True, 0.0), _draw(True, 1.0)
    ratio = {name: (d["half_height"] / d["half_width"]).min(axis=1).mean() for name, d in (("easy", easy), ("hard", hard))}
    assert ratio["easy"] < ratio["hard"] - 0.2
    (_, _), (easy_low, easy_high) = foramen_heights(0.0)
    (_, _), (hard_low, hard_high) = foramen_heights(1.0)
    assert easy_high < hard_high <= 1.0 and easy_low < hard_low


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_nuisance_switch_changes_the_output(tmp_path, switch):
    write_phantom(tmp_path / "on", patients=4, seed=1, size=SMALL, family="height")
    write_phantom(tmp_path / "off", patients=4, seed=1, size=SMALL, family="height", **{switch: False})
    on, off = _files(tmp_path / "on"), _files(tmp_path / "off")
    assert on.keys() == off.keys() and on != off


def test_exposure_varies_per_image_only_when_on(tmp_path):
    for name, exposure in (("on", True), ("off", False)):
        write_phantom(tmp_path / name, patients=10, seed=4, size=SMALL, family="height", exposure=exposure)
    def crop_medians(phantom: Path) -> np.ndarray:  # the spine's grey level (the whole image's depends on the shoulder)
        return np.array([np.median(_image(phantom, r.image)[r.y0:r.y1, r.x0:r.x1]) for r in _manifest(phantom).itertuples()])
    medians = {name: crop_medians(tmp_path / name) for name in ("on", "off")}
    assert medians["on"].std() > 2 * medians["off"].std()


def test_left_view_is_sheared_and_mirrors_the_right_one_only_without_the_gap(tmp_path):
    width = lambda row: (row.x1 - row.x0) / (row.y1 - row.y0)  # noqa: E731
    for gap in (True, False):  # pose off: no tilt and no re-positioning, so only the view gap tells the views apart
        out = tmp_path / str(gap)
        write_phantom(out, patients=10, seed=0, size=TINY, family="height", view_gap=gap, pose=False)
        plain = _manifest(out).set_index(["patient_id", "view"])
        for patient in plain.index.get_level_values(0).unique():
            left, right = plain.loc[(patient, "left")], plain.loc[(patient, "right")]
            mirrored = (left.x0, left.x1, left.y0, left.y1) == (TINY[0] - right.x1, TINY[0] - right.x0, right.y0, right.y1)
            assert mirrored != gap, patient
            if gap:
                assert width(left) > width(right) + 0.02, "the left projection's shear widens its box"


def test_grey_levels_stay_inside_the_range_and_leave_room_for_equalization(height_phantom):
    for row in _manifest(height_phantom).head(20).itertuples():
        crop = _image(height_phantom, row.image)[row.y0:row.y1, row.x0:row.x1]
        low, high = np.percentile(crop, [1, 99])
        assert 10 < low and high < 245, "nothing saturates"
        assert high - low < 160, "a narrow-ish range: histogram equalization has room to matter"


def test_cli_synth_family_flag_writes_that_family(tmp_path):
    command = [sys.executable, "-m", "fsweep.cli", "synth", "--out", str(tmp_path / "cli"), "--patients", "2",
               "--seed", "3", "--size", "74x126", "--family", "height"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    write_phantom(tmp_path / "lib", patients=2, seed=3, size=SMALL, family="height")
    assert _files(tmp_path / "cli") == _files(tmp_path / "lib")
    bad = subprocess.run(command[:-1] + ["v3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "v2, height" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def _run(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fsweep.cli", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"fsweep {' '.join(args)}:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"


# Measured (this test's exact steps): the validation-chosen of the two seeds' trials scored AUC 0.802 on the 80
# images of 40 new patients (seed 0: val 0.746, new 0.613, best epoch 2 of 8; seed 1: val 0.821, new 0.802;
# seeds 2 and 3 reached 0.817 and 0.852). One seed alone is a draw: on another CPU's float rounding seed 0 scored
# 0.843. One such AUC is worth about +-0.06 and chance is 0.5: 0.70 is more than one of those below the chosen
# trial's measurement and well above chance.
NEW_PATIENTS_AUC_FLOOR = 0.70
SEEDS = (0, 1)  # the trials a sweep over seeds would run; validation picks one, as a sweep's winner
SLOW_TRIAL = ["space.backbone=resnet10t", "space.view=both", "space.batch_size=16", "space.epochs=8", "space.lr=0.01",
              "space.he=global", "space.flip=true", "space.stn=off", "train.pretrained=none",
              "train.test=true", "data.size=64", "resources.cpu=2"]


@pytest.mark.slow  # the README path on the height family at tiny size: a few minutes on 2 idle cores (YOLO most)
def test_readme_path_on_the_height_family_generalizes_to_new_patients(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from calibrate_phantom import NEW_SEED, NewPatients, aspect_key

    _run("synth", "--out", str(tmp_path / "phantom"), "--family", "height", "--patients", "80", "--size", "148x252")
    _run("ingest", str(tmp_path / "phantom" / "manifest.csv"), "--out", str(tmp_path / "dataset"))
    _run("roi", "train", str(tmp_path / "dataset"), "--out", str(tmp_path / "roi"), "--annotated", "24",
         "--epochs", "30", "--imgsz", "128", "--batch", "4")  # test_roi's tiny detector settings
    _run("store", "build", str(tmp_path / "dataset"), "--store", str(tmp_path / "store"), "--roi", str(tmp_path / "roi"),
         "--size", "64", "--he", "global", "--aspect", "stretch")
    pairs = [*SLOW_TRIAL, f"data.dataset={tmp_path / 'dataset'}", f"data.store={tmp_path / 'store'}",
             f"roi.detector={tmp_path / 'roi'}", f"{aspect_key()}=stretch"]
    trials = []
    for seed in SEEDS:
        sets = [arg for pair in [*pairs, f"space.seed={seed}"] for arg in ("--set", pair)]
        _run("train", str(Path(__file__).resolve().parents[1] / "configs" / "demo_trial.yaml"), "--out",
             str(tmp_path / f"trial{seed}"), *sets)
        trials.append(json.loads((tmp_path / f"trial{seed}" / "metrics.json").read_text()))
    metrics = max(trials, key=lambda m: m["val"]["auc"])  # selection reads validation only
    settings = SimpleNamespace(new_patients=40, difficulty=0.5, family="height", image_size=(148, 252))
    fresh = NewPatients(tmp_path / "new_patients", settings, tmp_path / "roi")
    auc = fresh.auc(metrics["checkpoint"], "global", "stretch", 64)
    assert fresh.labels.size == 80 and NEW_SEED != 0
    assert auc >= NEW_PATIENTS_AUC_FLOOR, (auc, metrics["val"], metrics.get("test"))
