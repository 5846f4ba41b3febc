"""One config path: dataclass defaults <- YAML <- ``--set key=value``, for every command.

The same file drives ``fsweep store build``, ``roi train``, ``stn train``, ``train``
(one value per ``space`` key), ``plan``, ``sweep`` (a value, a list or a distribution per
``space`` key) and ``demo``; their flags are shortcuts for ``--set``. ``load_config``
types and checks every value once, so later code trusts what it reads. Defaults
are the paper's (Park et al. 2023): 512 px, batch 4, 25 epochs, SGD 0.9,
lr 1e-3, StepLR 7 x 0.1, fine-tuned ImageNet ResNet50 with HE, Flip and STN.

Explicit points: ``space`` may be a list of mappings (or a mapping with ``points:``), each
a grid of its own; a key a point leaves out takes the ``space`` mapping's value, else the
default above; a ``--set space.KEY=...`` (or a flag) wins over every point. Points are
typed like any space entry and take values, lists or ``{grid: [...]}``, never a distribution.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from preprocessing.vocab import (
    ASPECTS,
    HE_MODES,
    EVERY_VIEW,
    ConfigError,
    is_off,
    normalise_choice,
    parse_flag,
    parse_pair,
    view_name,
)

STN_MODES = ("off", "frozen", "joint")  # space.stn: none, pretrained then frozen (the paper), trained with the classifier
OPTIMIZERS = ("sgd", "adamw")  # train.optimizer
SCHEDULES = ("step", "cosine")  # train.schedule
KEEP_CHECKPOINTS = ("winners", "all", "none")  # search.keep_checkpoints (search.keep says what each keeps)
# Distributions a space key may name; search.space maps each to its Ray Tune function.
DISTRIBUTIONS = ("uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint", "lograndint", "choice", "grid")


@dataclass
class DataConfig:
    dataset: str = ""  # DATASET directory written by `fsweep ingest`
    store: str = ""  # STORE path (or s3:// / gs:// URI) of the preprocessing cache
    size: int = 512  # square input size in pixels (paper: 512)
    mirror_pair: Any = "left,right"  # the two views cross-view Flip mirrors into each other, or none (Flip is then horizontal)


@dataclass
class RoiConfig:
    detector: str = "none"  # ROI_DIR from `fsweep roi train`, or none (full frame); folds: each fold trains its own
    margin: float = 0.05  # fraction of the box size added on every side of the crop
    annotated: int = 100  # boxed train images the detector learns from (paper: 100 clinician-annotated)
    epochs: int = 30  # detector training epochs
    imgsz: int = 320  # YOLO input size
    model: str = "yolo11n.yaml"  # model yaml (built from scratch, no download) or a local .pt
    batch: int = 4  # detector images per optimizer step (at 8 a 60-patient detector did not learn)


@dataclass
class SpaceConfig:
    backbone: Any = "resnet50"  # registry or timm name (paper: ResNet50)
    view: Any = "right"  # a view of the data set (one model per view; the paper: left / right) / all (or both): one model for every view
    batch_size: Any = 4  # paper: 4 (8 was worse)
    epochs: Any = 25  # paper: 25
    lr: Any = 1e-3  # initial learning rate (paper: 0.001)
    he: Any = "global"  # histogram equalization: off / global (paper eq. 1-4) / clahe
    aspect: Any = "stretch"  # crop to square: stretch (the paper's plain resize) / pad (keep the aspect, black borders)
    flip: Any = True  # Flip: cross-view (the mirrored pair left/right, the paper's) or else horizontal flip of each view's training images
    stn: Any = "frozen"  # spatial transformer: off / frozen (pretrained, paper) / joint
    finetune: Any = True  # train all backbone layers (paper) or only the head
    seed: Any = 0  # seed for initialisation, shuffling and augmentation
    fold: Any = 0  # patient-level fold of `fsweep ingest --folds K` (0..K-1; 0 = the dataset's `split` column)
    # explicit points: a list of mappings of the keys above (each may hold grids); a key a point leaves
    # out takes its value above; `space:` given as a YAML list is this list (see `space_points`)
    points: Any = None


@dataclass
class SearchConfig:
    algorithm: str = "grid"  # grid / random / optuna (TPE through Ray Tune's OptunaSearch)
    num_samples: int = 1  # samples per grid point (grid) or trials (random/optuna)
    metric: str = "val_auc"  # validation metric that selects epochs and trials
    mode: str = "max"  # max or min
    scheduler: str = "fifo"  # fifo or asha
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 3  # ASHA: keep 1/reduction_factor per rung
    max_t: int = 0  # ASHA: max epochs (0 = the largest `space.epochs`)
    max_concurrent: int = 0  # trials in flight (0: no limit for grid/random, 8 for optuna; search.space.concurrency)
    max_failures: int = 2  # retries of a trial after a node or process failure
    seed: int = 0  # seed of the search algorithm itself (random sampling, Optuna's TPE)
    select_by: str = "trial"  # winners: the best trial per view, or the best `config` by its mean over seeds and folds
    keep_checkpoints: str = "winners"  # ended trials keep: winners (others best weights) / all / none (winners' best)


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # sgd (paper) or adamw
    momentum: float = 0.9  # SGD momentum (paper: 0.9)
    weight_decay: float = 0.0  # L2 penalty / AdamW decoupled decay
    schedule: str = "step"  # step (paper) or cosine
    step_size: int = 7  # StepLR period in epochs (paper: 7)
    gamma: float = 0.1  # StepLR factor (paper: 0.1)
    class_weights: bool = True  # BCE pos_weight = n_normal / n_abnormal of the training set
    pretrained: str = "imagenet"  # none / imagenet (local HF cache) / path to weights
    stn_epochs: int = 10  # epochs of the STN's left-vs-right pretraining
    test: bool = False  # `fsweep train --test`: score the best epoch on the test split (a sweep scores only its winners)
    # every trial also scores the test split at each new best epoch, for the report's test-scored comparison tables
    # (the paper's tables); off by default: an ordinary sweep scores only its winners on test. Selection never reads them
    test_every_trial: bool = False
    amp: str = "auto"  # auto (on with CUDA) / on / off
    channels_last: str = "auto"  # auto (on with CUDA) / on / off
    num_workers: int = 0  # DataLoader workers (data is a memmap: 0 is usually enough)
    resident_max_mb: int = 4096  # splits up to this many MB (uint8) live on the device, batches drawn there; larger: memmap DataLoader
    checkpoint_every: int = 5  # write a checkpoint every N epochs (plus the last and ASHA's rung epochs)
    deterministic: bool = False  # bit-identical reruns (deterministic algorithms, cuDNN deterministic); off: cuDNN autotunes
    compile: bool = False  # torch.compile the model (time to compile first; see bench/gpu.py)


@dataclass
class ResourcesConfig:
    cpu: float = 1.0  # CPUs per trial
    gpu: float = 0.0  # GPUs per trial; fractions let several trials share one GPU


@dataclass
class ReportConfig:
    rows: Any = None  # space keys naming a comparison row (none: every key that varies, seed and fold aside)
    baseline: Any = None  # {key: value} naming each section's baseline row (none: the section's first row)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in fields(Config)}
SPACE_KEYS = tuple(f.name for f in fields(SpaceConfig) if f.name != "points")
SELECT_BY = ("trial", "config")  # search.select_by
PATH_KEYS = (("roi", "detector"), ("train", "pretrained"))  # path-like options that may say none/off


def _positive_int(value: Any, where: str) -> int:
    number = _number(value, where)
    if number != int(number) or number < 1:
        raise ConfigError(f"{where}: expected a whole number >= 1, got {value!r}")
    return int(number)


def _int(value: Any, where: str) -> int:
    number = _number(value, where)
    if number != int(number):
        raise ConfigError(f"{where}: expected a whole number, got {value!r}")
    return int(number)


def _nonnegative_int(value: Any, where: str) -> int:
    number = _int(value, where)
    if number < 0:
        raise ConfigError(f"{where}: expected a whole number >= 0, got {value!r}")
    return number


def _positive_float(value: Any, where: str) -> float:
    number = _number(value, where)
    if not number > 0:
        raise ConfigError(f"{where}: expected a number > 0, got {value!r}")
    return number


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


# How one value of each space key is read: the type every trial and the search see.
SPACE_TYPES = {
    "backbone": lambda v, where: str(v),
    "view": lambda v, where: _view(v, where),
    "batch_size": _positive_int,
    "epochs": _positive_int,
    "lr": _positive_float,
    "he": lambda v, where: normalise_choice(v, where, HE_MODES),
    "aspect": lambda v, where: normalise_choice(v, where, ASPECTS),
    "flip": parse_flag,
    "stn": lambda v, where: normalise_choice(v, where, STN_MODES),
    "finetune": parse_flag,
    "seed": _int,
    "fold": lambda v, where: _nonnegative_int(v, where),
}


def _view(value: Any, where: str) -> str:
    """A space.view value: left / right (any spelling), both / all, or a view name of the data set (checked
    against DATASET's views by the sweep driver, before any work)."""
    if str(value).strip().lower() in EVERY_VIEW:
        return str(value).strip().lower()
    try:
        return view_name(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def space_value(key: str, value: Any) -> Any:
    """One concrete value of space key ``key`` in its canonical type ('off', True, 0.001, ...)."""
    return SPACE_TYPES[key](value, f"space.{key}")


def distribution(key: str, spec: dict) -> tuple[str, list]:
    """(name, arguments) of a one-key distribution mapping such as ``{loguniform: [1e-4, 1e-2]}``."""
    if len(spec) != 1:
        raise ConfigError(f"space.{key}: a distribution is one key, e.g. {{loguniform: [1e-4, 1e-2]}}; got {spec}")
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"space.{key}: unknown distribution {name!r} (valid: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"space.{key}: {name} needs a list of arguments, got {args!r}")
    return name, args


def space_entry(key: str, value: Any) -> Any:
    """A space entry (a value, a list or a distribution) with every listed value typed; ConfigError if bad."""
    if isinstance(value, dict):
        name, args = distribution(key, value)
        if name in ("choice", "grid"):
            return {name: [space_value(key, v) for v in args]}
        return {name: [v if isinstance(v, (int, float)) and not isinstance(v, bool) else _number(v, f"space.{key}")
                       for v in args]}
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"space.{key}: empty list")
        return [space_value(key, v) for v in value]
    return space_value(key, value)


def entry_values(key: str, value: Any) -> list | None:
    """The finite set of values a space entry can take, or None for a numeric distribution."""
    if isinstance(value, dict) and distribution(key, value)[0] not in ("choice", "grid"):
        return None  # a numeric distribution: its bounds are not values (validate types them)
    typed = space_entry(key, value)
    if isinstance(typed, dict):  # {choice|grid: [values]}
        return next(iter(typed.values()))
    return typed if isinstance(typed, list) else [typed]


def _point(i: int, point: Any) -> dict:
    """One explicit point with every entry typed: values, lists or ``{grid: [...]}`` only (points are a grid)."""
    if not isinstance(point, dict) or not point:
        raise ConfigError(f"space point {i + 1}: expected a mapping of space keys, got {point!r}")
    typed = {}
    for key, value in point.items():
        if key not in SPACE_KEYS:
            raise ConfigError(f"space point {i + 1}: unknown key {key!r} (valid: {', '.join(SPACE_KEYS)})")
        typed[key] = space_entry(key, value)
    return typed


def space_points(cfg: Config) -> list[dict]:
    """Every explicit point as a full mapping ``key -> entry``; a key a point leaves out takes ``cfg.space``'s value.

    Without explicit points the whole space is one point. Points that come out equal are kept once.
    """
    base = {key: getattr(cfg.space, key) for key in SPACE_KEYS}
    full: list[dict] = []
    for point in cfg.space.points or [{}]:
        merged = {**base, **point}
        if merged not in full:
            full.append(merged)
    return full


def key_values(cfg: Config, key: str) -> list | None:
    """Every value space key ``key`` can take over all points, in order (None: a numeric distribution)."""
    values: list = []
    for point in space_points(cfg):
        finite = entry_values(key, point[key])
        if finite is None:
            return None
        values += [v for v in finite if v not in values]
    return values


def _check_points(cfg: Config) -> None:
    """Type explicit points; refuse distributions in them (a point is a grid: every value is run)."""
    points = cfg.space.points
    if points is None:
        return
    if not isinstance(points, list) or not points:
        raise ConfigError(f"space: explicit points must be a non-empty list of mappings, got {points!r}")
    cfg.space.points = [_point(i, p) for i, p in enumerate(points)]
    for i, point in enumerate(space_points(cfg)):
        for key, value in point.items():
            if isinstance(value, dict) and distribution(key, value)[0] != "grid":
                raise ConfigError(
                    f"space point {i + 1}: {key}={value} is a distribution; explicit points take values, lists "
                    "or {grid: [...]} (sample distributions from a plain `space` mapping)"
                )


def asha_settings(cfg: Config) -> tuple[int, int, int] | None:
    """(grace_period, reduction_factor, max_t) when the sweep runs ASHA, else None; max_t 0 = the trial's epochs."""
    s = cfg.search
    return (s.grace_period, s.reduction_factor, s.max_t) if s.scheduler == "asha" else None


def rung_epochs(grace: int, factor: int, max_t: int) -> list[int]:
    """The epochs at which Ray's ASHA compares trials: grace x factor^k, as many rungs as Ray counts up to max_t."""
    rungs = int(math.log(max_t / grace) / math.log(factor) + 1) if max_t >= grace else 0
    return [grace * factor**k for k in range(rungs)]


def validate(cfg: Config) -> Config:
    """Type every space entry and check every choice once, so later code can trust the config."""
    for key in SPACE_KEYS:
        setattr(cfg.space, key, space_entry(key, getattr(cfg.space, key)))
    _check_points(cfg)
    cfg.data.mirror_pair = parse_pair(cfg.data.mirror_pair, "data.mirror_pair")
    cfg.search.select_by = normalise_choice(cfg.search.select_by, "search.select_by", SELECT_BY)
    for section, key in PATH_KEYS:
        if is_off(getattr(getattr(cfg, section), key)):
            setattr(getattr(cfg, section), key, "none")
    cfg.train.optimizer = normalise_choice(cfg.train.optimizer, "train.optimizer", OPTIMIZERS)
    cfg.train.schedule = normalise_choice(cfg.train.schedule, "train.schedule", SCHEDULES)
    keep = "none" if is_off(cfg.search.keep_checkpoints) else cfg.search.keep_checkpoints  # YAML's bare off
    cfg.search.keep_checkpoints = normalise_choice(keep, "search.keep_checkpoints", KEEP_CHECKPOINTS)
    cfg.train.checkpoint_every = _positive_int(cfg.train.checkpoint_every, "train.checkpoint_every")
    return cfg


def _coerce(current: Any, value: Any, where: str) -> Any:
    """Cast ``value`` to the type of the default ``current`` when it is a scalar."""
    if isinstance(current, bool) and isinstance(value, str):
        return parse_flag(value, where)
    if isinstance(current, bool) or value is None:
        return value
    if isinstance(current, int) and isinstance(value, (str, float)):
        try:
            as_float = float(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
        if as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if isinstance(current, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    if isinstance(current, str) and value is False:
        return "off"
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    return value


# old spelling -> (the key it became, why), read as the new key so old configs, checkpoints and experiments load
MOVED_KEYS = {
    ("data", "aspect"): (("space", "aspect"), "a searched preprocessing key like space.he"),
    ("train", "best_scores"): (("train", "test_every_trial"), "off unless asked: a sweep scores only its winners on test"),
}


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    if (section, key) in MOVED_KEYS:
        old, ((section, key), why) = f"{section}.{key}", MOVED_KEYS[section, key]
        warnings.warn(f"{where}: {old} is now {section}.{key} ({why}); read as {section}.{key}",
                      FutureWarning, stacklevel=3)
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section!r} (valid: {', '.join(SECTIONS)})")
    sec = getattr(cfg, section)
    valid = [f.name for f in fields(sec)]
    if key not in valid:
        raise ConfigError(f"{where}: unknown key {section}.{key} (valid: {', '.join(valid)})")
    current = getattr(sec, key)
    if section != "space":  # space values may be lists/distributions: kept as given
        value = _coerce(current, value, where)
    setattr(sec, key, value)


def _override(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    """A flag or ``--set`` value: it wins over the file, so a space key it sets leaves every explicit point."""
    _apply(cfg, section, key, value, where)
    if section == "space" and key != "points" and isinstance(cfg.space.points, list):
        cfg.space.points = [{k: v for k, v in p.items() if k != key} if isinstance(p, dict) else p
                            for p in cfg.space.points]


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``a.b=value`` (value read as YAML, so lists and numbers work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: key must be section.key, e.g. space.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return parts[0], parts[1], value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), shortcuts: dict | None = None
) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``shortcuts``, then ``--set`` overrides.

    ``shortcuts`` maps ``section.key`` to a value: what a command's own flags set (``--size 64`` is
    ``data.size=64``); a flag left out is None and sets nothing.

    Relative ``data.dataset``/``data.store``/``roi.detector`` paths in the file are
    taken relative to the current directory, as a user typing a command expects.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if section == "space" and isinstance(values, list):
                values = {"points": values}  # explicit points; every other space key keeps its default
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for dotted, value in (shortcuts or {}).items():
        if value is not None:
            section, key = dotted.split(".")
            _override(cfg, section, key, value, f"--{key}")
    for text in overrides:
        section, key, value = parse_override(text)
        _override(cfg, section, key, value, f"--set {text}")
    return validate(cfg)


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (checkpoints, trial dirs)."""
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "config dict")
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
