"""The one value per ``space`` key a single trial runs with, checked, and its store variant."""
from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import FsweepError
from fsmodels.config import Config, space_value
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
    flip: bool
    stn: str
    finetune: bool
    seed: int


def _scalar(cfg: Config, key: str):
    value = getattr(cfg.space, key)
    if isinstance(value, (list, tuple, dict)):
        raise FsweepError(f"space.{key}: a single trial needs one value, got {value!r} (that is a sweep config)")
    return value


def trial_params(cfg: Config) -> TrialParams:
    """The trial's ``space`` values, one each, typed by the config's own rules (a Config built in code skips load)."""
    return TrialParams(**{key: space_value(key, _scalar(cfg, key)) for key in TrialParams.__dataclass_fields__})


def resolve_variant(cfg: Config, he: str):
    """Open the store variant the config names; never builds one (sweeps only read the store)."""
    from cluster.storage import exists, join
    from preprocessing.recipe import VariantSpec, variant_key
    from preprocessing.variant import open_variant

    detector = cfg.roi.detector
    roi_dir = None if is_off(detector) else detector
    spec = VariantSpec(he=he, size=cfg.data.size, aspect=cfg.data.aspect, roi_dir=roi_dir, margin=cfg.roi.margin)
    key = variant_key(cfg.data.dataset, spec)
    if not exists(join(cfg.data.store, key, "manifest.json")):  # a path or an s3:// / gs:// URI
        raise FsweepError(
            f"{cfg.data.store}: no store variant {key} (he={he}, size={cfg.data.size}, roi={detector}); "
            f"build it with `fsweep store build {cfg.data.dataset} --store {cfg.data.store} --size {cfg.data.size} "
            f"--he {he}" + (f" --roi {roi_dir}`" if roi_dir else "`")
        )
    return open_variant(cfg.data.store, key)
