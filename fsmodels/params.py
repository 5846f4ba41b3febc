"""The one value per ``space`` key a single trial runs with, checked, and its store variant."""
from __future__ import annotations

from dataclasses import dataclass

from fsmodels.config import Config, is_off, normalise_toggle, parse_flag
from preprocessing.errors import FsweepError

VIEWS = ("left", "right", "both")  # space.view choices
HE_MODES = ("off", "global", "clahe")  # space.he choices
STN_MODES = ("off", "frozen", "joint")  # space.stn choices
OPTIMIZERS = ("sgd", "adamw")  # train.optimizer choices
SCHEDULES = ("step", "cosine")  # train.schedule choices


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
    """Validate the trial's ``space`` values (one each) and the ``train`` choices."""
    normalise_toggle(cfg.train.optimizer, "train.optimizer", OPTIMIZERS)
    normalise_toggle(cfg.train.schedule, "train.schedule", SCHEDULES)
    try:
        params = TrialParams(
            backbone=str(_scalar(cfg, "backbone")),
            view=normalise_toggle(_scalar(cfg, "view"), "space.view", VIEWS),
            batch_size=int(_scalar(cfg, "batch_size")),
            epochs=int(_scalar(cfg, "epochs")),
            lr=float(_scalar(cfg, "lr")),
            he=normalise_toggle(_scalar(cfg, "he"), "space.he", HE_MODES),
            flip=parse_flag(_scalar(cfg, "flip"), "space.flip"),
            stn=normalise_toggle(_scalar(cfg, "stn"), "space.stn", STN_MODES),
            finetune=parse_flag(_scalar(cfg, "finetune"), "space.finetune"),
            seed=int(_scalar(cfg, "seed")),
        )
    except (TypeError, ValueError) as exc:
        raise FsweepError(f"space: {exc}") from exc
    if params.batch_size < 1 or params.epochs < 1 or params.lr <= 0:
        raise FsweepError(f"space: batch_size and epochs must be >= 1 and lr > 0, got {params}")
    return params


def resolve_variant(cfg: Config, he: str):
    """Open the store variant the config names; never builds one (sweeps only read the store)."""
    from cluster.storage import exists, join
    from preprocessing.store import VariantSpec, open_variant, variant_key

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
