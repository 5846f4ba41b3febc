"""Data sets of other shapes: views the data names, one view, named classes, which Flip runs, the STN's task.

The new shapes are made from the tiny phantom by rewriting its manifest (conftest's helpers): a single-view
set (``PA``, one image per patient) and a set of three named views (``elbow``, ``wrist``, ``shoulder``, each
image its own patient's study, labelled ``fracture`` / ``normal``). The slow tests take each through the
README path (ingest -> sweep -> export -> predict on newly generated patients).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cluster.errors import FsweepError
from fsmodels.config import load_config
from fsmodels.metrics import auc_score
from fsweep.cli import main as fsweep
from preprocessing.ingest import dataset_views, ingest, load_dataset
from preprocessing.loader import train_views
from preprocessing.phantom import write_phantom
from preprocessing.vocab import ConfigError, flip_kind, view_name
from search.plan import train_images
from search.sweep import check_data

from conftest import TINY_SALT, TINY_SIZE, tiny_sweep_config

MURA_VIEWS = ("elbow", "wrist", "shoulder")


def reshape(phantom: Path, shape: str, out: Path) -> Path:
    """A manifest ``out`` of the phantom's images (absolute paths, so the shared phantom folder is not written
    to) in another data shape.

    ``pa``: the right views only, every one named ``PA`` (one image per patient, one view).
    ``mura``: every image its own patient (a study), its view elbow / wrist / shoulder by the patient number,
    labels spelled fracture / normal.
    """
    rows = pd.read_csv(phantom / "manifest.csv", dtype=str, keep_default_na=False)
    rows["image"] = [str(phantom / image) for image in rows["image"]]
    if shape == "pa":
        rows = rows[rows["view"] == "right"].assign(view="PA")
    else:
        number = rows["patient_id"].str.extract(r"(\d+)")[0].astype(int)
        side = (rows["view"] == "left").astype(int)
        rows = rows.assign(patient_id=rows["patient_id"] + "-" + rows["view"],
                           view=[MURA_VIEWS[(2 * n + s) % 3] for n, s in zip(number, side)],
                           label=rows["label"].map({"abnormal": "fracture", "normal": "normal"}))
    rows.to_csv(out, index=False)
    return out


# --- vocabulary ------------------------------------------------------------------------------------

def test_view_names_keep_left_right_spellings_and_take_any_safe_name():
    assert [view_name(v) for v in ("L", "r", "Left", "PA", " Lateral ", "AP view")] == \
        ["left", "right", "left", "pa", "lateral", "ap_view"]
    for bad, reason in (("both", "reserved"), ("", "empty"), ("a/b", "cannot name a view")):
        with pytest.raises(ConfigError, match=reason):
            view_name(bad)


def test_flip_is_cross_view_only_with_the_mirrored_pair():
    assert flip_kind("left", ("left", "right")) == "cross-view" and flip_kind("both", ("left", "right")) == "cross-view"
    assert flip_kind("pa", ("pa",)) == "horizontal" and flip_kind("all", MURA_VIEWS) == "horizontal"
    assert flip_kind("left", ("left",)) == "horizontal"  # no partner to mirror in
    assert train_views("left", True) == (("left",), ("right",))  # the paper's Flip, as before
    assert train_views("wrist", True, MURA_VIEWS) == (("wrist",), ("wrist",))
    assert train_views("all", True, MURA_VIEWS) == (MURA_VIEWS, MURA_VIEWS)
    assert train_views("all", False, ("pa",)) == (("pa",), ())


def test_the_mirrored_pair_can_be_named_in_the_config_or_switched_off():
    assert load_config(None, []).data.mirror_pair == "left,right"
    assert load_config(None, ["data.mirror_pair=[LAO, rao]"]).data.mirror_pair == "lao,rao"
    assert load_config(None, ["data.mirror_pair=none"]).data.mirror_pair == "none"
    for bad in ("left", "left,left", "a,b,c"):
        with pytest.raises(ConfigError, match="data.mirror_pair: expected two different views"):
            load_config(None, [f"data.mirror_pair={bad}"])
    hip = ("lao", "rao", "ap")
    assert train_views("lao", True, hip, ("lao", "rao")) == (("lao",), ("rao",))
    assert train_views("ap", True, hip, ("lao", "rao")) == (("ap",), ("ap",))
    assert flip_kind("left", ("left", "right"), ()) == "horizontal"  # mirror_pair none: no cross-view Flip


# --- ingest -----------------------------------------------------------------------------------------

def test_a_single_view_set_ingests_every_row_with_or_without_a_view_column(tiny_phantom, tmp_path, capsys):
    named = reshape(tiny_phantom, "pa", tmp_path / "pa.csv")
    result = ingest(named, tmp_path / "pa", seed=0, salt=TINY_SALT)
    table = capsys.readouterr().out
    assert result.rejected == 0 and result.accepted == 40 and result.views == ("pa",)
    assert "both (flip)" not in table and sum(line.startswith("pa ") for line in table.splitlines()) == 2
    bare = pd.read_csv(named).drop(columns=["view"])
    bare.to_csv(tmp_path / "pa_no_view.csv", index=False)
    result = ingest(tmp_path / "pa_no_view.csv", tmp_path / "all", seed=0, salt=TINY_SALT, echo=False)
    assert result.rejected == 0 and dataset_views(tmp_path / "all") == ("all",)
    rows = load_dataset(tmp_path / "pa")
    assert set(rows["split"]) == {"train", "val", "test"} and rows["patient"].is_unique


def test_named_views_and_named_classes_ingest_with_one_table_row_per_view_and_class(tiny_phantom, tmp_path, capsys):
    manifest = reshape(tiny_phantom, "mura", tmp_path / "mura.csv")
    result = ingest(manifest, tmp_path / "mura", seed=0, salt=TINY_SALT, positive="fracture")
    lines = capsys.readouterr().out.splitlines()
    assert result.rejected == 0 and result.accepted == 80 and result.views == ("elbow", "shoulder", "wrist")
    assert result.classes == ("normal", "fracture")
    for view in MURA_VIEWS:
        assert sum(line.split()[:1] == [view] for line in lines) == 2  # fracture and normal
    summary = json.loads((tmp_path / "mura" / "summary.json").read_text())
    assert summary["classes"] == {"negative": "normal", "positive": "fracture"}
    rows = load_dataset(tmp_path / "mura")
    source = pd.read_csv(manifest)
    assert (rows["label"] == (source["label"] == "fracture").astype(int).to_numpy()).all()
    for view in MURA_VIEWS:  # every split sees every view
        assert set(rows[rows["view"] == view]["split"]) == {"train", "val", "test"}


def test_class_names_must_be_given_and_more_than_two_classes_are_refused(tiny_phantom, tmp_path):
    manifest = reshape(tiny_phantom, "mura", tmp_path / "mura.csv")
    with pytest.raises(FsweepError, match="--positive fracture --negative normal"):
        ingest(manifest, tmp_path / "a", salt=TINY_SALT, echo=False)
    rows = pd.read_csv(manifest)
    rows.loc[rows.index[:5], "label"] = "tumour"
    rows.to_csv(tmp_path / "three.csv", index=False)
    with pytest.raises(FsweepError, match=r"3 label classes \(fracture, normal, tumour\); fsweep trains binary"):
        ingest(tmp_path / "three.csv", tmp_path / "b", salt=TINY_SALT, positive="fracture", echo=False)


def test_a_left_right_manifest_still_rejects_other_view_names_unless_they_are_declared(tiny_phantom, tmp_path):
    rows = pd.read_csv(tiny_phantom / "manifest.csv", dtype=str, keep_default_na=False)
    rows["image"] = [str(tiny_phantom / image) for image in rows["image"]]
    rows.loc[0, "view"] = "AP"
    rows.to_csv(tmp_path / "with_ap.csv", index=False)
    result = ingest(tmp_path / "with_ap.csv", tmp_path / "a", salt=TINY_SALT, echo=False)
    assert result.rejected_by_reason == {"unknown view": 1}
    result = ingest(tmp_path / "with_ap.csv", tmp_path / "b", salt=TINY_SALT, echo=False,
                    views=["left", "right", "AP"])
    assert result.rejected_by_reason.get("unknown view") is None and result.views == ("left", "right", "ap")


# --- DICOM folders without a view column -----------------------------------------------------------

def test_manifest_reads_views_from_the_header_and_takes_study_labels(tmp_path):
    from conftest import write_dicom
    from preprocessing.dicom_manifest import write_manifest

    scans = tmp_path / "export"
    scans.mkdir()
    files = {  # name: (PatientID, StudyInstanceUID, header tags)
        "a.dcm": ("P1", "1.2.1", {"ViewPosition": "PA", "BodyPartExamined": "CHEST", "ImageLaterality": "L"}),
        "b.dcm": ("P1", "1.2.1", {"BodyPartExamined": "ELBOW", "Laterality": "R"}),  # laterality before body part
        "c.dcm": ("P2", "1.2.2", {"BodyPartExamined": "WRIST"}),
        "d.dcm": ("P2", "1.2.2", {}),  # no view tag at all
        "e.dcm": ("P3", "1.2.3", {"ViewPosition": "AP"}),  # study not labelled
    }
    for seed, (name, (patient, study, tags)) in enumerate(files.items()):
        stored = np.random.default_rng(seed).integers(0, 4096, (40, 30))
        write_dicom(scans / name, stored, headers={"PatientID": patient, "StudyInstanceUID": study, **tags})
    (tmp_path / "labels.csv").write_text("study_id,label\n1.2.1,fracture\n1.2.2,normal\n")
    summary = write_manifest(scans, tmp_path / "labels.csv", tmp_path / "manifest.csv")
    manifest = pd.read_csv(tmp_path / "manifest.csv", keep_default_na=False)
    assert manifest[["patient_id", "view", "label"]].values.tolist() == [
        ["P1", "PA", "fracture"], ["P1", "right", "fracture"], ["P2", "WRIST", "normal"]]
    unplaced = pd.read_csv(tmp_path / "manifest_unplaced.csv")
    assert dict(zip(unplaced["file"], unplaced["reason"])) == {
        "export/d.dcm": "no ViewPosition, laterality or BodyPartExamined", "export/e.dcm": "study not in labels table"}
    assert summary["views"] == {"PA": 1, "WRIST": 1, "right": 1}
    (tmp_path / "by_patient.csv").write_text("patient_id,label\nP2,1\nP2,0\n")
    with pytest.raises(FsweepError, match="row 2: patient_id 'P2' is labelled both 1 and 0"):
        write_manifest(scans, tmp_path / "by_patient.csv", tmp_path / "m2.csv")


# --- what a sweep is told before any work ----------------------------------------------------------

def test_views_not_in_the_data_and_a_frozen_stn_on_one_view_are_refused_in_one_line(tiny_phantom, tmp_path):
    ingest(reshape(tiny_phantom, "pa", tmp_path / "pa.csv"), tmp_path / "pa", salt=TINY_SALT, echo=False)
    cfg = tiny_sweep_config(tmp_path / "pa", tmp_path / "store", view="knee")
    with pytest.raises(ConfigError, match="view='knee' is not in the data set .*: pa; or all"):
        check_data(cfg)
    cfg = tiny_sweep_config(tmp_path / "pa", tmp_path / "store", view="PA", stn="frozen")
    with pytest.raises(ConfigError, match="frozen needs two or more views.*use stn: joint .* or stn: off") as error:
        check_data(cfg)
    assert "\n" not in str(error.value)
    check_data(tiny_sweep_config(tmp_path / "pa", tmp_path / "store", view="all", stn="joint"))
    assert not (tmp_path / "store").exists()  # refused before any work


def test_plan_says_which_flip_runs_and_counts_the_mirrored_images(tiny_phantom, tiny_dataset, tmp_path, capsys):
    ingest(reshape(tiny_phantom, "pa", tmp_path / "pa.csv"), tmp_path / "pa", salt=TINY_SALT, echo=False)
    rows = load_dataset(tmp_path / "pa")
    train = int((rows["split"] == "train").sum())
    assert train_images(rows, "pa", True, 0) == 2 * train and train_images(rows, "pa", False, 0) == train
    (tmp_path / "sweep.yaml").write_text("data:\n  size: 32\n")
    for dataset, view, kind in ((tmp_path / "pa", "pa", "horizontal"), (tiny_dataset, "left", "cross-view")):
        out = tmp_path / f"plan_{view}.csv"
        assert fsweep(["plan", str(tmp_path / "sweep.yaml"), "--set", f"data.dataset={dataset}", "--set", f"space.view={view}",
                       "--set", "space.flip=[true, false]", "--out", str(out)]) == 0
        assert sorted(pd.read_csv(out)["flip_as"]) == sorted([kind, "off"])
    capsys.readouterr()


# --- end to end -------------------------------------------------------------------------------------

def _new_patients(tmp: Path, shape: str) -> tuple[Path, np.ndarray]:
    """Newly generated patients (another phantom seed) in ``shape``: the manifest and its labels (1 positive)."""
    phantom = tmp / f"new_{shape}"
    write_phantom(phantom, patients=20, seed=77, size=TINY_SIZE)
    manifest = reshape(phantom, shape, tmp / "new.csv")
    labels = pd.read_csv(manifest)["label"].isin(["abnormal", "fracture"]).astype(int).to_numpy()
    return manifest, labels


@pytest.mark.slow  # a real Ray Tune sweep, export and predict per shape (about a minute each on 2 cores)
@pytest.mark.parametrize("shape, view, stn", [("pa", "PA", "joint"), ("mura", "all", "frozen")])
def test_a_new_shape_goes_through_sweep_export_and_predict(local_ray, tiny_phantom, tmp_path, shape, view, stn, capsys):
    from search.sweep import run_sweep

    classes = {"positive": "fracture"} if shape == "mura" else {}
    ingest(reshape(tiny_phantom, shape, tmp_path / f"{shape}.csv"), tmp_path / "data", salt=TINY_SALT, echo=False, **classes)
    cfg = tiny_sweep_config(tmp_path / "data", tmp_path / "store", view=view, stn=stn, epochs=4, lr=[0.01, 0.003])
    cfg.data.size = 64  # an STN in the ONNX graph pools to 64 px: the input is a multiple of 64
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 2
    experiment = Path(run_sweep(cfg, name="exp", storage=str(tmp_path / "runs")))
    board = pd.read_csv(experiment / "leaderboard.csv")
    assert len(board) == 2 and (board["status"] == "TERMINATED").all() and set(board["flip_as"]) == {"horizontal"}
    winners = json.loads((experiment / "winners.json").read_text())
    key = view.lower()
    assert list(winners) == [key] and winners[key]["flip_as"] == "horizontal"
    assert fsweep(["report", str(experiment)]) == 0
    assert "(Flip ran as horizontal)" in (experiment / "report.md").read_text()
    assert fsweep(["export", str(experiment), "--out", str(tmp_path / "model")]) == 0
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    model = card["models"][key]
    assert model["flip"] == "horizontal" and model["network"]["stn"] == stn
    assert card["views"] == (["pa"] if shape == "pa" else sorted(MURA_VIEWS))
    positive = "fracture" if shape == "mura" else "abnormal"
    assert model["classes"] == {"negative": "normal", "positive": positive}
    manifest, labels = _new_patients(tmp_path, shape)
    assert fsweep(["predict", str(tmp_path / "model"), str(manifest), "--out", str(tmp_path / "preds.csv")]) == 0
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == len(labels) and set(preds["prediction"]) <= {"normal", positive}
    assert set(preds["model"]) == {key}
    new_auc = auc_score(labels, preds["probability"].to_numpy())
    val_auc = winners[key]["val"]["val_auc"]
    print(f"{shape}: validation AUC {val_auc:.3f}, test AUC {winners[key]['test']['auc']:.3f}, "
          f"new-patient AUC {new_auc:.3f} ({len(labels)} images)")
    assert 0.0 <= new_auc <= 1.0 and val_auc < 1.0  # nothing saturates on a tiny set
    card_path = tmp_path / "model" / "model_card.json"  # a card exported before class names and flip were kept
    for entry in card["models"].values():
        del entry["classes"], entry["flip"]
    card_path.write_text(json.dumps(card))
    assert fsweep(["predict", str(tmp_path / "model"), str(manifest), "--out", str(tmp_path / "old.csv")]) == 0
    old = pd.read_csv(tmp_path / "old.csv")
    assert np.allclose(old["probability"], preds["probability"]) and set(old["prediction"]) <= {"normal", "abnormal"}
