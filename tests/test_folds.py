"""Folds that do not leak: each fold's ROI detector, the variants it crops and its frozen STNs are fitted on
that fold's training patients only; one split keeps its artifacts and keys."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_SALT, make_spec, tiny_sweep_config
from fsweep.cli import main
from preprocessing.ingest import ingest
from preprocessing.splits import fold_column

FOLDS = 3
TINY_ROI = dict(annotated=8, epochs=1, imgsz=64, batch=4)  # a detector that trains in seconds (it finds nothing)
# The keys of the tiny dataset's artifacts without folds, as the store has always named them: a change here
# orphans every built store and every recorded experiment
NO_FOLD_KEYS = {("global", "stretch"): "a6be5e1ccfecb49f", ("off", "pad"): "20b484bf4adb4916"}
NO_FOLD_STN_KEY = "8b463519e5ba1e32"  # stn_key("0123456789abcdef", 1, 0) under STN_CODE stn-2 (bounded theta)


@pytest.fixture(scope="module")
def fold_dataset(tiny_phantom, tmp_path_factory) -> Path:
    """The tiny phantom ingested with 3 folds."""
    out = tmp_path_factory.mktemp("dataset_folds")
    ingest(tiny_phantom / "manifest.csv", out, seed=0, salt=TINY_SALT, echo=False, folds=FOLDS)
    return out


def fold_config(dataset: Path, store: Path, **space):
    """A tiny sweep config over every fold with a frozen STN and a per-fold detector of TINY_ROI's size."""
    cfg = tiny_sweep_config(dataset, store, fold=list(range(FOLDS)), stn="frozen", epochs=1, **space)
    cfg.roi.detector = str(store.parent / "per-fold")  # any ROI_DIR: with folds its weights are never read
    for key, value in TINY_ROI.items():
        setattr(cfg.roi, key, value)
    return cfg


def patients_of(dataset: Path, fold: int) -> dict[str, set]:
    """split -> patients of fold ``fold``, from dataset.parquet."""
    rows = pd.read_parquet(dataset / "dataset.parquet")
    return {split: set(rows.loc[rows[fold_column(fold)] == split, "patient"]) for split in ("train", "val", "test")}


def test_without_folds_the_keys_and_the_record_are_unchanged(tiny_dataset, fold_dataset, tmp_path, local_ray):
    from fsmodels.params import artifact_folds
    from fsmodels.stn import stn_key
    from preprocessing.recipe import variant_key
    from search.sweep import prepare_store

    for (he, aspect), key in NO_FOLD_KEYS.items():
        assert variant_key(tiny_dataset, make_spec(size=32, he=he, aspect=aspect)) == key
    assert stn_key("0123456789abcdef", 1, 0) == NO_FOLD_STN_KEY
    fold_keys = {stn_key("0123456789abcdef", 1, 0, fold=k) for k in range(FOLDS)}
    assert len(fold_keys) == FOLDS and all(key.startswith(f"fold{k}-") for k, key in enumerate(sorted(fold_keys)))
    cfg = tiny_sweep_config(tiny_dataset, tmp_path / "store", stn="frozen")
    assert artifact_folds(cfg) is None
    record = prepare_store(cfg)
    assert set(record) == {"variants", "stns"}  # the record's shape without folds: old experiments read it
    assert record["variants"]["global/stretch"]["key"] == NO_FOLD_KEYS[("global", "stretch")]
    assert record["stns"]["global/stretch"][0]["key"] == stn_key(NO_FOLD_KEYS[("global", "stretch")], 1, 0)
    assert not (tmp_path / "store" / "roi").exists()
    # a detector-less store with folds: its variants are shared by every fold (nothing in them was fitted)
    shared = prepare_store(tiny_sweep_config(fold_dataset, tmp_path / "fold_store", fold=[0, 1]))
    assert set(shared) == {"folds"} and shared["folds"][0]["variants"] == shared["folds"][1]["variants"]
    assert shared["folds"][0]["detector"] is None and not shared["folds"][0]["variants"]["global/stretch"]["key"].startswith("fold")


def test_a_plan_over_folds_lists_one_detector_and_one_stn_per_fold_with_its_cost(fold_dataset, tiny_dataset,
                                                                                 tmp_path, capsys):
    sets = ["--set", f"data.dataset={fold_dataset}", "--set", "space.fold=[0,1,2]", "--set", "space.stn=frozen",
            "--set", "roi.detector=roi", *[a for k, v in TINY_ROI.items() for a in ("--set", f"roi.{k}={v}")],
            "--set", "train.stn_epochs=3"]
    assert main(["plan", str(Path(__file__).parent.parent / "configs" / "demo.yaml"), *sets]) == 0
    text = capsys.readouterr().out
    rows = pd.read_parquet(fold_dataset / "dataset.parquet")
    keys = set()
    for fold in range(FOLDS):
        boxed = rows.dropna(subset=["x0"])
        fit = min(TINY_ROI["annotated"], int((boxed[fold_column(fold)] == "train").sum()))
        line = next(line for line in text.splitlines() if line.startswith(f"ROI detector of fold {fold}: "))
        keys.add(line.split(": ")[1].split(",")[0])
        assert f"{TINY_ROI['epochs']} epochs x {fit} boxed images" in line
        assert f"= {TINY_ROI['epochs'] * fit} image-epochs" in line
        train = int((rows[fold_column(fold)] == "train").sum())
        stns = next(line for line in text.splitlines() if line.startswith(f"frozen STNs of fold {fold}: "))
        assert f"each 3 epochs x {train} training images of fold {fold}" in stns and f"= {3 * train} image-epochs" in stns
    assert len(keys) == FOLDS and all(key.startswith(f"fold{k}-") for k, key in enumerate(sorted(keys)))
    assert "store variants per fold: " in text
    assert main(["plan", str(Path(__file__).parent.parent / "configs" / "demo.yaml"),
                 "--set", f"data.dataset={tiny_dataset}", "--set", "space.stn=frozen", "--set", "roi.detector=roi"]) == 0
    one_split = capsys.readouterr().out
    assert "ROI detector" not in one_split and "of fold" not in one_split and "frozen STNs: " in one_split


def test_a_store_shared_by_folds_trains_each_fold_detector_once(fold_dataset, tmp_path, monkeypatch):
    import preprocessing.fold_roi as fold_roi

    calls = []

    def fake_fit(out, fit, select, **settings):  # YOLO's place: slow enough for the second builder to wait
        calls.append(len(fit))
        time.sleep(0.5)
        Path(out, "best.pt").write_bytes(b"weights of fold %d" % len(calls))
        return {"map50": 0.0, "seconds": 0.5, "imgsz": settings["imgsz"]}

    monkeypatch.setattr(fold_roi, "fit_detector", fake_fit)
    settings = fold_roi.DetectorSettings(**TINY_ROI, model="yolo11n.yaml")
    found = []
    builders = [threading.Thread(target=lambda: found.append(
        fold_roi.ensure_fold_detector(fold_dataset, tmp_path, 1, settings))) for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join()
    assert len(calls) == 1 and len({(d.key, d.manifest) for d in found}) == 1
    other = fold_roi.ensure_fold_detector(fold_dataset, tmp_path, 2, settings)
    assert len(calls) == 2 and other.key.startswith("fold2-") and found[0].key.startswith("fold1-")
    seen = json.loads((other.path / fold_roi.FIT_FILE).read_text())
    assert seen["fold"] == 2 and set(seen["patients"]) <= patients_of(fold_dataset, 2)["train"]
    assert "patients" not in json.loads((other.path / "metrics.json").read_text())  # what an export copies


def fitted_patients(store: Path, dataset: Path, variant, artifacts: dict) -> dict[str, set]:
    """Patients each artifact a trial used was fitted on, from what the store recorded about it: a fold
    detector's fit.json, an STN's stn.json; for artifacts that record none, what their builder reads (a ROI_DIR
    from `fsweep roi train`: its boxed `split` train and val rows; an STN: its variant's stored train split)."""
    rows = pd.read_parquet(dataset / "dataset.parquet")
    if variant.meta.get("detector_key"):
        seen = json.loads((store / "roi" / variant.meta["detector_key"] / "fit.json").read_text())["patients"]
    else:  # preprocessing.roi._boxed_rows: the first `train_images` boxed split-train rows, every boxed val row
        trained = json.loads((Path(variant.spec.roi_dir) / "metrics.json").read_text())
        boxed = rows.dropna(subset=["x0"])
        seen = [*boxed[boxed["split"] == "train"].head(trained["train_images"])["patient"],
                *boxed[boxed["split"] == "val"]["patient"]]
    stn = json.loads((store / "stn" / artifacts["stn"]["key"] / "stn.json").read_text())
    index = variant.index
    return {"detector": set(seen),
            "stn": set(stn["patients"]) if "patients" in stn else set(index.loc[index["split"] == "train", "patient"])}


@pytest.mark.slow  # a tiny ROI_DIR, three tiny fold detectors, stores and STNs, three trials: about two minutes
def test_no_validation_or_test_patient_of_a_fold_reaches_what_its_trials_used(fold_dataset, tmp_path, local_ray):
    from fsmodels.checkpoint import load_state
    from preprocessing.roi import train_detector
    from preprocessing.variant import open_variant
    from search.sweep import run_sweep

    cfg = fold_config(fold_dataset, tmp_path / "store")
    roi_dir = train_detector(fold_dataset, cfg.roi.detector, model=cfg.roi.model, **TINY_ROI)  # saw every fold
    cfg.search.max_failures, cfg.search.max_concurrent, cfg.search.keep_checkpoints = 0, 2, "all"
    cfg.data.size = 64  # an STN in front of the model exports to ONNX at multiples of 64 px
    experiment = Path(run_sweep(cfg, name="folds", storage=str(tmp_path / "runs")))
    store = Path(cfg.data.store)
    used = {}
    for checkpoint in experiment.glob("trial_*/checkpoint_*"):
        state = load_state(checkpoint)
        fold, artifacts = int(state["config"]["space"]["fold"]), state["artifacts"]
        variant = open_variant(store, artifacts["variant"]["key"], expected=artifacts["variant"]["manifest"])
        used.setdefault(fold, set()).add((variant.meta["detector_sha256"], variant.key, artifacts["stn"]["key"]))
        splits = patients_of(fold_dataset, fold)
        fitted = fitted_patients(store, fold_dataset, variant, artifacts)
        for what, patients in fitted.items():  # what the trial's crops and STN learned from
            assert patients and not patients & splits["val"], f"fold {fold}'s {what} saw its validation patients"
            assert not patients & splits["test"], f"fold {fold}'s {what} saw its test patients"
            assert patients <= splits["train"]
        # the recorded detector is the one that cropped the trial's images, and the STN learned from those crops
        detector = store / "roi" / artifacts["detector"]["key"]
        assert variant.meta["detector_sha256"] == json.loads((detector / "metrics.json").read_text())["sha256"]
        assert variant.meta["detector_sha256"] != roi_dir["sha256"]  # the ROI_DIR's weights: never with folds
        stn = json.loads((store / "stn" / artifacts["stn"]["key"] / "stn.json").read_text())
        assert stn["fold"] == fold and stn["variant"] == variant.key and fitted["stn"] == splits["train"]
    assert sorted(used) == list(range(FOLDS))
    assert all(len(trials) == 1 for trials in used.values())  # one detector, variant and STN per fold
    keys = [key for trials in used.values() for key in trials]
    assert all(len({k[i] for k in keys}) == FOLDS for i in range(3))
    assert all(k[i].startswith(f"fold{fold}-") for fold, trials in used.items() for k in trials for i in (1, 2))
    # the exported winner crops with the detector of its own fold, and the model carries no patient of the data
    from fsweep.export import export_experiment

    model = export_experiment(experiment, tmp_path / "model")
    card = json.loads((model / "model_card.json").read_text())
    winner = card["models"]["right"]
    assert card["sha256"]["roi/best.pt"] == next(k[0] for k in keys if k[1] == winner["store_variant"])
    assert not (model / "roi" / "fit.json").exists()
