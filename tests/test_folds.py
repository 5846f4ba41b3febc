"""Folds that do not leak: each fold's ROI detector, the variants it crops and its frozen STNs are fitted on
that fold's training patients only; one split keeps its artifacts and keys."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TINY_SALT, make_spec, tiny_sweep_config
from fsweep.cli import main
from preprocessing.ingest import ingest
from preprocessing.splits import fold_column

FOLDS = 3
TINY_ROI = dict(annotated=8, epochs=1, imgsz=64, batch=4)  # a detector that trains in seconds (it finds nothing)
# The keys of the tiny dataset's artifacts without folds, as the store has always named them: a change here
# orphans every built store and every recorded experiment
NO_FOLD_KEYS = {("global", "stretch"): "a6be5e1ccfecb49f", ("off", "pad"): "20b484bf4adb4916"}
NO_FOLD_STN_KEY = "0005aff43fd0f3a1"  # stn_key("0123456789abcdef", 1, 0)


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
    cfg = fold_config(fold_dataset, tmp_path / "store")
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


@pytest.mark.slow  # three tiny YOLO detectors, three stores and STNs, three trials: about two minutes
def test_no_validation_or_test_patient_of_a_fold_reaches_what_its_trials_used(fold_dataset, tmp_path, local_ray):
    from fsmodels.checkpoint import load_state
    from preprocessing.variant import open_variant
    from search.sweep import STORE_VARIANTS, run_sweep

    cfg = fold_config(fold_dataset, tmp_path / "store")
    cfg.search.max_failures, cfg.search.max_concurrent, cfg.search.keep_checkpoints = 0, 2, "all"
    experiment = Path(run_sweep(cfg, name="folds", storage=str(tmp_path / "runs")))
    record = yaml.safe_load((experiment / STORE_VARIANTS).read_text())
    assert sorted(record["folds"]) == list(range(FOLDS))
    store = Path(cfg.data.store)
    used = {}
    for checkpoint in experiment.glob("trial_*/checkpoint_*"):
        state = load_state(checkpoint)
        fold, artifacts = int(state["config"]["space"]["fold"]), state["artifacts"]
        used.setdefault(fold, set()).add(tuple(artifacts[k]["key"] for k in ("detector", "variant", "stn")))
        splits = patients_of(fold_dataset, fold)
        held_out = splits["val"] | splits["test"]
        detector = json.loads((store / "roi" / artifacts["detector"]["key"] / "fit.json").read_text())
        weights = json.loads((store / "roi" / artifacts["detector"]["key"] / "metrics.json").read_text())["sha256"]
        variant = open_variant(store, artifacts["variant"]["key"], expected=artifacts["variant"]["manifest"])
        stn = json.loads((store / "stn" / artifacts["stn"]["key"] / "stn.json").read_text())
        # the detector learned from, and picked its epoch on, the fold's training patients only
        assert detector["fold"] == fold and set(detector["patients"]) <= splits["train"]
        assert not set(detector["patients"]) & held_out
        rows = pd.read_parquet(fold_dataset / "dataset.parquet").set_index("image_id")
        seen = set(rows.loc[detector["fit_image_ids"] + detector["select_image_ids"], "patient"])
        assert seen == set(detector["patients"])
        # the trial's crops came from that detector, and its STN learned from those crops' training rows only
        assert variant.meta["fold"] == fold and variant.meta["detector_key"] == artifacts["detector"]["key"]
        assert variant.meta["detector_sha256"] == weights
        assert stn["fold"] == fold and stn["variant"] == variant.key
        assert set(stn["patients"]) == splits["train"] and not set(stn["patients"]) & held_out
    assert sorted(used) == list(range(FOLDS))
    keys = [key for fold in used.values() for key in fold]
    assert len({k[0] for k in keys}) == len({k[1] for k in keys}) == len({k[2] for k in keys}) == FOLDS
    assert all(k[i].startswith(f"fold{fold}-") for fold, trials in used.items() for k in trials for i in range(3))
