"""Per-fold ROI detectors: store artifacts fitted on one fold's training patients only.

With a DATASET of K folds (``fsweep ingest --folds K``), a detector trained on the ``split``
column's rows (fold 0's) has seen the validation and test patients of every other fold. So with
folds each fold k gets its own detector, ``STORE/roi/<key>/`` (``best.pt``, ``metrics.json``,
``manifest.json`` written last, checked like a variant: ``preprocessing.artifact``). YOLO learns
from the first ``roi.annotated`` boxed rows of fold k's training patients (dataset order) and
keeps the epoch best on the fold's other boxed training rows, or on the fitted rows themselves
when none are left: no validation or test patient of fold k reaches its detector, also not
through the choice of its best epoch. ``metrics.json`` (what ``RoiDetector`` and an exported
model read) records the fold; ``fit.json`` the image ids and patients it was fitted and scored on.

The key, ``fold<k>-<16 hex>``, names the fold and hashes those rows (ids, pixel hashes, patients,
boxes), the training settings and ``ROI_CODE``. The build holds the key's lock
(``STORE/.locks/roi-<key>.lock``): drivers and builders sharing a store train each fold's detector
once. A ``s3://``/``gs://`` store gets it uploaded, manifest last, and downloaded once per node.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from cluster.errors import FsweepError
from cluster.storage import is_uri, join, resolve_storage
from preprocessing.artifact import LOCKS, MANIFEST, NotBuilt, build_lock, content_key, open_artifact, write_manifest
from preprocessing.files import atomic_copy, atomic_write_text
from preprocessing.ingest import load_dataset
from preprocessing.remote import publish, staging_dir
from preprocessing.roi import BOX_COLUMNS, fit_detector
from preprocessing.splits import dataset_folds, fold_column

ROI_CODE = "roi-1"  # bump whenever the same rows and settings would train a different detector
ROI_STORE_DIR = "roi"  # STORE/roi/<key>/: one directory per fold detector
FIT_FILE = "fit.json"  # the image ids and patients it was fitted and scored on (never exported with a model)
DETECTOR_FILES = ("best.pt", "metrics.json", FIT_FILE)  # what a fold detector holds besides its manifest
KEY_COLUMNS = ["image_id", "pixel_sha256", "patient", *BOX_COLUMNS]  # what a fold detector's key hashes per row


@dataclass(frozen=True)
class DetectorSettings:
    """The YOLO training settings of the config's ``roi`` section (``fsweep roi train`` takes the same)."""

    annotated: int  # boxed training rows it learns from
    epochs: int
    imgsz: int
    model: str
    batch: int
    seed: int = 0


@dataclass(frozen=True)
class FoldDetector:
    """A checked fold detector in the store: its recorded handle and a local ROI_DIR ``RoiDetector`` opens."""

    key: str  # fold_detector_key(rows, fold, settings)
    manifest: str  # sha256 of its manifest.json
    path: Path  # local directory (in place, or this node's copy of a URI store's)
    fold: int


def fold_rows(rows: pd.DataFrame, fold: int, annotated: int, where: str = "dataset.parquet"):
    """``(fit, select)``: fold ``fold``'s first ``annotated`` boxed training rows and the rows that pick the
    best epoch (the fold's other boxed training rows, or ``fit`` when there are none); FsweepError when the
    fold is missing or has no boxed training row."""
    column = fold_column(fold)
    if column not in rows:
        raise FsweepError(f"{where}: no fold {fold} ({dataset_folds(rows.columns)} folds; "
                          "run `fsweep ingest --folds K`)")
    boxed = rows.dropna(subset=BOX_COLUMNS)
    train = boxed[boxed[column] == "train"]
    fit = train.head(annotated)
    if annotated < 1 or fit.empty:
        raise FsweepError(f"{where}: fold {fold}'s detector needs boxed training rows; found {len(fit)} "
                          f"(of roi.annotated={annotated}) with x0,y0,x1,y1")
    rest = train.iloc[len(fit):]
    return fit, (rest if not rest.empty else fit)


def fold_detector_key(rows: pd.DataFrame, fold: int, settings: DetectorSettings) -> str:
    """Content key of fold ``fold``'s detector trained with ``settings`` on ``load_dataset``'s ``rows``."""
    fit, select = fold_rows(rows, fold, settings.annotated)
    payload = {
        "code": ROI_CODE,
        "fold": int(fold),
        "fit": fit[KEY_COLUMNS].to_csv(index=False),
        "select": select[KEY_COLUMNS].to_csv(index=False),
        "settings": asdict(settings),
    }
    return f"fold{int(fold)}-{content_key(payload)}"


def open_fold_detector(store, key: str, fold: int, expected: str | None = None) -> FoldDetector:
    """Open the fold detector ``key`` of ``store`` (cheap check; ``expected``: its recorded manifest sha256)."""
    path, manifest = open_artifact(resolve_storage(store), f"{ROI_STORE_DIR}/{key}", "fold detector", expected)
    return FoldDetector(key=key, manifest=manifest, path=path, fold=fold)


def ensure_fold_detector(dataset_dir, store, fold: int, settings: DetectorSettings) -> FoldDetector:
    """Fold ``fold``'s detector in ``store``, trained first if missing (once, under its key's lock)."""
    store = resolve_storage(store)
    rows = load_dataset(dataset_dir)
    key = fold_detector_key(rows, fold, settings)
    workdir = staging_dir(store) if is_uri(store) else Path(store)
    with build_lock(workdir / LOCKS, f"roi-{key}"):
        try:
            return open_fold_detector(store, key, fold)
        except FsweepError as reason:
            if not isinstance(reason, NotBuilt):
                print(f"fold detector {key}: {reason}; training it again")
        fit, select = fold_rows(rows, fold, settings.annotated, f"{Path(dataset_dir) / 'dataset.parquet'}")
        _train_into(workdir / ROI_STORE_DIR / key, key, fold, fit, select, settings)
        if is_uri(store):
            publish(workdir / ROI_STORE_DIR / key, join(store, ROI_STORE_DIR, key))
        return open_fold_detector(store, key, fold)


def _train_into(out: Path, key: str, fold: int, fit: pd.DataFrame, select: pd.DataFrame,
                settings: DetectorSettings) -> None:
    """Train in a scratch directory beside ``out``; copy best.pt, write metrics.json, then the manifest (last)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a killed retraining leaves nothing that verifies
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{key}-") as scratch:  # ultralytics' working files
        metrics = fit_detector(scratch, fit, select, epochs=settings.epochs, imgsz=settings.imgsz,
                               model=settings.model, batch=settings.batch, seed=settings.seed)
        atomic_copy(Path(scratch) / "best.pt", out / "best.pt")
    metrics.update(fold=int(fold), key=key, annotated=settings.annotated, batch=settings.batch, seed=settings.seed)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    # what the detector saw, each patient one of the fold's training patients; kept apart from metrics.json so
    # that an exported model, which copies metrics.json, carries no patient of the data set
    seen = {"fold": int(fold), "fit_image_ids": fit["image_id"].tolist(),
            "select_image_ids": select["image_id"].tolist(),
            "patients": sorted(set(fit["patient"]) | set(select["patient"]))}
    atomic_write_text(out / FIT_FILE, json.dumps(seen, indent=2))
    write_manifest(out, key, list(DETECTOR_FILES))
    print(f"fold detector {key}: fold {fold}, fitted on {len(fit)} images of the fold's training patients, "
          f"mAP50 {metrics['map50']:.3f} on {len(select)} of them ({metrics['seconds']} s)")
