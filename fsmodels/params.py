"""The one value per ``space`` key a single trial runs with, checked, and its store variants.

Folds (a DATASET of ``fsweep ingest --folds K``): whatever is fitted before the trials, the ROI
detector and the frozen STN, is fitted per fold, on that fold's training patients only, so no
fold's validation or test patient reaches what its trials use. Fold k's detector is a store
artifact (``preprocessing.fold_roi``) trained with the config's ``roi`` settings (a ROI_DIR given
as ``roi.detector`` only says that crops are wanted: its weights saw every fold's patients), the
variants it crops are fold k's (``fold<k>-`` keys), and so are the STNs. Without a detector the
variants are shared by every fold (nothing in them was fitted) and keep their keys. A DATASET
without folds has one set of artifacts, with plain 16-hex keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.errors import FsweepError
from fsmodels.config import Config, entry_values, key_values, space_points, space_value
from preprocessing.vocab import is_off


@dataclass(frozen=True)
class TrialParams:
    """The one value per ``space`` key that a single trial runs with."""

    backbone: str
    view: str
    batch_size: int
    epochs: int
    lr: float
    he: str
    aspect: str
    flip: bool
    stn: str
    finetune: bool
    seed: int
    fold: int  # patient-level fold (0 = the dataset's `split` column)


def _scalar(cfg: Config, key: str):
    value = getattr(cfg.space, key)
    if isinstance(value, (list, tuple, dict)):
        raise FsweepError(f"space.{key}: a single trial needs one value, got {value!r} (that is a sweep config)")
    return value


def trial_params(cfg: Config) -> TrialParams:
    """The trial's ``space`` values, one each, typed by the config's own rules (a Config built in code skips load)."""
    if cfg.space.points:
        raise FsweepError("space: explicit points make a sweep config; a single trial needs one value per key")
    return TrialParams(**{key: space_value(key, _scalar(cfg, key)) for key in TrialParams.__dataclass_fields__})


def variant_name(he: str, aspect: str) -> str:
    """The name the driver's record gives the store variant of one (HE mode, aspect) pair, e.g. ``global/stretch``."""
    return f"{he}/{aspect}"


def variant_recipes(cfg: Config) -> list[tuple[str, str]]:
    """Every (HE mode, aspect) pair a trial of the space can draw, point by point: the variants a sweep builds."""
    pairs = []
    for point in space_points(cfg):
        pairs += [(he, aspect) for he in entry_values("he", point["he"])
                  for aspect in entry_values("aspect", point["aspect"])]
    return list(dict.fromkeys(pairs))


def record_entry(record: dict, he: str, aspect: str):
    """The entry for (he, aspect) in a driver record section (``variants`` or ``stns``).

    Records written before ``space.aspect`` was searched name variants by HE mode alone (one aspect per sweep).
    """
    return record[variant_name(he, aspect)] if variant_name(he, aspect) in record else record[he]


def fold_record(record: dict, fold: int) -> dict:
    """The part of a driver record (``search.sweep.prepare_store``) a trial of ``fold`` reads: its fold's
    ``{"detector", "variants", "stns"}`` when the sweep had per-fold artifacts, else the whole record."""
    if "folds" not in record:
        return record
    folds = record["folds"]
    if int(fold) not in folds:
        raise FsweepError(f"space.fold={fold}: the sweep's record has artifacts of folds {sorted(folds)} only")
    return folds[int(fold)]


def dataset_fold_count(cfg: Config) -> int:
    """How many folds ``data.dataset`` carries (0: one split, or no dataset.parquet yet); reads the footer only."""
    import pyarrow.parquet as pq

    from preprocessing.splits import dataset_folds

    table = Path(cfg.data.dataset) / "dataset.parquet" if cfg.data.dataset else None
    return dataset_folds(pq.read_schema(table).names) if table is not None and table.is_file() else 0


def artifact_folds(cfg: Config) -> list[int] | None:
    """The folds that get their own artifacts: every fold the space can draw, when the DATASET has folds
    (all of them when ``space.fold`` is a distribution); None without folds (one shared set)."""
    count = dataset_fold_count(cfg)
    if not count:
        return None
    values = key_values(cfg, "fold")
    return sorted({int(v) for v in values}) if values is not None else list(range(count))


def trial_fold(cfg: Config, params: TrialParams) -> int | None:
    """The fold whose artifacts a trial uses: its ``space.fold`` on a DATASET with folds, None without."""
    return params.fold if dataset_fold_count(cfg) else None


def detector_settings(cfg: Config):
    """The ``roi`` section's YOLO settings, for a fold's own detector (``preprocessing.fold_roi``)."""
    from preprocessing.fold_roi import DetectorSettings

    roi = cfg.roi
    return DetectorSettings(annotated=roi.annotated, epochs=roi.epochs, imgsz=roi.imgsz, model=roi.model,
                            batch=roi.batch)


def fold_detector(cfg: Config, fold: int, build: bool = False):
    """Fold ``fold``'s own detector in ``data.store`` (None with ``roi.detector: none``); ``build`` trains it
    when missing, otherwise a missing one is a one-line FsweepError saying how to build it."""
    from preprocessing.artifact import NotBuilt
    from preprocessing.fold_roi import ensure_fold_detector, fold_detector_key, open_fold_detector
    from preprocessing.ingest import load_dataset

    if is_off(cfg.roi.detector):
        return None
    settings = detector_settings(cfg)
    if build:
        return ensure_fold_detector(cfg.data.dataset, cfg.data.store, fold, settings)
    key = fold_detector_key(load_dataset(cfg.data.dataset), fold, settings)
    try:
        return open_fold_detector(cfg.data.store, key, fold)
    except NotBuilt:
        raise FsweepError(f"{cfg.data.store}: no detector {key} of fold {fold}; build it with `fsweep store build "
                          f"{cfg.data.dataset} --store {cfg.data.store} --roi {cfg.roi.detector} "
                          f"--set space.fold={fold}` (with the sweep's --config)") from None


def resolve_variant(cfg: Config, he: str, aspect: str, detector=None):
    """Open the store variant the config names, its key computed from DATASET (the driver's and `fsweep train`'s step).

    Never builds one (sweeps only read the store). Everything after this opens the variant by
    the key it returns (``open_artifacts`` with recorded handles), never by recomputing it.
    ``detector``: on a DATASET with folds, the trial's fold's own detector (``fold_detector``): the variant it
    cropped.
    """
    from cluster.storage import exists, join
    from preprocessing.artifact import MANIFEST
    from preprocessing.recipe import VariantSpec, variant_key
    from preprocessing.variant import open_variant

    roi_dir, key_fold = None if is_off(cfg.roi.detector) else cfg.roi.detector, None
    if roi_dir is not None and detector is not None:
        roi_dir, key_fold = str(detector.path), detector.fold
    spec = VariantSpec(he=he, size=cfg.data.size, aspect=aspect, roi_dir=roi_dir, margin=cfg.roi.margin)
    key = variant_key(cfg.data.dataset, spec, key_fold)
    if not exists(join(cfg.data.store, key, MANIFEST)):  # a path or an s3:// / gs:// URI
        folds = f" --set space.fold={key_fold}" if key_fold is not None else ""
        raise FsweepError(
            f"{cfg.data.store}: no store variant {key} (he={he}, aspect={aspect}, size={cfg.data.size}, "
            f"roi={cfg.roi.detector}); build it with `fsweep store build {cfg.data.dataset} --store {cfg.data.store} "
            f"--size {cfg.data.size} --he {he} --aspect {aspect}" + (f" --roi {cfg.roi.detector}" if roi_dir else "")
            + f"{folds}`"
        )
    return open_variant(cfg.data.store, key)


def handle(artifact) -> dict:
    """The recorded handle of a variant, STN or fold detector: its key and its manifest's sha256."""
    return {"key": artifact.key, "manifest": artifact.manifest}


def trial_handles(cfg: Config, params: TrialParams) -> dict:
    """Resolve the trial's variant (and frozen STN, trained if missing) once: ``{"variant": h, "stn": h | None}``,
    plus ``"detector": h`` for a fold's own detector (a DATASET with folds and a detector)."""
    from fsmodels.stn import ensure_frozen_stn

    fold = trial_fold(cfg, params)
    detector = fold_detector(cfg, fold) if fold is not None else None
    variant = resolve_variant(cfg, params.he, params.aspect, detector)
    stn = None
    if params.stn == "frozen":
        stn = handle(ensure_frozen_stn(variant, epochs=cfg.train.stn_epochs, seed=params.seed, store=cfg.data.store,
                                       fold=fold))
    return {"variant": handle(variant), "stn": stn, **({"detector": handle(detector)} if detector else {})}


def open_artifacts(cfg: Config, handles: dict):
    """``(variant, frozen STN weights path or None)`` opened by their recorded keys; never recomputes a key.

    Only ``data.store`` is read: a trial needs neither DATASET nor the ROI weights. A recorded
    artifact that is missing or differs is a one-line FsweepError.
    """
    from fsmodels.stn import open_stn
    from preprocessing.variant import open_variant

    variant = open_variant(cfg.data.store, handles["variant"]["key"], expected=handles["variant"]["manifest"])
    stn = handles.get("stn")
    weights = open_stn(cfg.data.store, stn["key"], expected=stn["manifest"]).weights if stn else None
    return variant, weights


def build_variants(cfg: Config, address: str | None = None, fold: int | None = None) -> dict:
    """Build or reuse the store variant of every (HE mode, aspect) pair the space can draw (the only variants a
    sweep builds; thumbnails come from what exists): ``{variant_name: Variant}``. ``address``: the Ray the build
    runs on. ``fold``: fold ``fold``'s variants, cropped by its own detector (trained first if missing); without
    a detector a fold's variants are the shared ones."""
    return build_fold_store(cfg, address, fold)[0]


def build_fold_store(cfg: Config, address: str | None, fold: int | None) -> tuple[dict, object]:
    """``build_variants`` and the fold's own detector it cropped with (trained first if missing; None without)."""
    from preprocessing.store import build_store

    recipes = variant_recipes(cfg)
    detector = fold_detector(cfg, fold, build=True) if fold is not None else None
    roi = str(detector.path) if detector is not None else cfg.roi.detector
    variants = dict(zip((variant_name(*pair) for pair in recipes), build_store(
        cfg.data.dataset, cfg.data.store, roi=roi, size=cfg.data.size, recipes=recipes,
        margin=cfg.roi.margin, address=address, fold_detector=(fold, detector.key) if detector is not None else None,
    )))
    return variants, detector


def build_fold_variants(cfg: Config, address: str | None = None) -> dict:
    """Every variant a sweep of ``cfg`` reads, per fold when the DATASET has folds (``artifact_folds``):
    ``{fold: (fold detector or None, {variant_name: Variant})}``, or ``{None: (None, variants)}`` without folds.

    A detector-less store is built once and shared by every fold (nothing in it was fitted).
    """
    folds = artifact_folds(cfg)
    if folds is None:
        return {None: (None, build_variants(cfg, address))}
    if is_off(cfg.roi.detector):
        shared = build_variants(cfg, address)
        return {fold: (None, shared) for fold in folds}
    print(f"roi.detector={cfg.roi.detector}: with folds, each fold's crops come from a detector trained in the "
          f"store on that fold's training patients (roi.annotated={cfg.roi.annotated}, roi.epochs={cfg.roi.epochs}, "
          f"roi.imgsz={cfg.roi.imgsz}); folds {folds}")
    out = {}
    for fold in folds:
        variants, detector = build_fold_store(cfg, address, fold)
        out[fold] = (detector, variants)
    return out
