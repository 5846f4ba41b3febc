"""The one value per ``space`` key a single trial runs with, checked, and its store variants."""
from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import FsweepError
from fsmodels.config import Config, entry_values, space_points, space_value
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


def resolve_variant(cfg: Config, he: str, aspect: str):
    """Open the store variant the config names, its key computed from DATASET (the driver's and `fsweep train`'s step).

    Never builds one (sweeps only read the store). Everything after this opens the variant by
    the key it returns (``open_artifacts`` with recorded handles), never by recomputing it.
    """
    from cluster.storage import exists, join
    from preprocessing.artifact import MANIFEST
    from preprocessing.recipe import VariantSpec, variant_key
    from preprocessing.variant import open_variant

    detector = cfg.roi.detector
    roi_dir = None if is_off(detector) else detector
    spec = VariantSpec(he=he, size=cfg.data.size, aspect=aspect, roi_dir=roi_dir, margin=cfg.roi.margin)
    key = variant_key(cfg.data.dataset, spec)
    if not exists(join(cfg.data.store, key, MANIFEST)):  # a path or an s3:// / gs:// URI
        raise FsweepError(
            f"{cfg.data.store}: no store variant {key} (he={he}, aspect={aspect}, size={cfg.data.size}, "
            f"roi={detector}); build it with `fsweep store build {cfg.data.dataset} --store {cfg.data.store} "
            f"--size {cfg.data.size} --he {he} --aspect {aspect}" + (f" --roi {roi_dir}`" if roi_dir else "`")
        )
    return open_variant(cfg.data.store, key)


def handle(artifact) -> dict:
    """The recorded handle of a variant or STN: its key and its manifest's sha256."""
    return {"key": artifact.key, "manifest": artifact.manifest}


def trial_handles(cfg: Config, params: TrialParams) -> dict:
    """Resolve the trial's variant (and frozen STN, trained if missing) once: ``{"variant": h, "stn": h | None}``."""
    from fsmodels.stn import ensure_frozen_stn

    variant = resolve_variant(cfg, params.he, params.aspect)
    stn = None
    if params.stn == "frozen":
        stn = handle(ensure_frozen_stn(variant, epochs=cfg.train.stn_epochs, seed=params.seed, store=cfg.data.store))
    return {"variant": handle(variant), "stn": stn}


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


def build_variants(cfg: Config, address: str | None = None) -> dict:
    """Build or reuse the store variant of every (HE mode, aspect) pair the space can draw (the only variants a
    sweep builds; thumbnails come from what exists): ``{variant_name: Variant}``. ``address``: the Ray the build
    runs on."""
    from preprocessing.store import build_store

    recipes = variant_recipes(cfg)
    return dict(zip((variant_name(*pair) for pair in recipes), build_store(
        cfg.data.dataset, cfg.data.store, roi=cfg.roi.detector, size=cfg.data.size, recipes=recipes,
        margin=cfg.roi.margin, address=address,
    )))
