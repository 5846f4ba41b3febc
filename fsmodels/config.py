"""One config path: dataclass defaults <- YAML <- ``--set key=value``.

The same file drives ``fsweep train`` (one value per ``space`` key) and
``fsweep sweep`` (a value, a list or a distribution per ``space`` key). Defaults
are the paper's (Park et al. 2023): 512 px, batch 4, 25 epochs, SGD 0.9,
lr 1e-3, StepLR 7 x 0.1, fine-tuned ImageNet ResNet50 with HE, Flip and STN.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from preprocessing.errors import FsweepError


@dataclass
class DataConfig:
    dataset: str = ""  # DATASET directory written by `fsweep ingest`
    store: str = ""  # STORE path (or s3:// / gs:// URI) of the preprocessing cache
    size: int = 512  # square input size in pixels (paper: 512)
    aspect: str = "pad"  # how the ROI crop becomes square: pad (keep aspect) or stretch


@dataclass
class RoiConfig:
    detector: str = "none"  # ROI_DIR from `fsweep roi train`, or none (full frame)
    margin: float = 0.05  # fraction of the box size added on every side of the crop


@dataclass
class SpaceConfig:
    backbone: Any = "resnet50"  # registry or timm name (paper: ResNet50)
    view: Any = "right"  # left / right (one model per view, as the paper) / both
    batch_size: Any = 4  # paper: 4 (8 was worse)
    epochs: Any = 25  # paper: 25
    lr: Any = 1e-3  # initial learning rate (paper: 0.001)
    he: Any = "global"  # histogram equalization: off / global (paper eq. 1-4) / clahe
    flip: Any = True  # cross-view left-right Flip augmentation of the training set
    stn: Any = "frozen"  # spatial transformer: off / frozen (pretrained, paper) / joint
    finetune: Any = True  # train all backbone layers (paper) or only the head
    seed: Any = 0  # seed for initialisation, shuffling and augmentation


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
    max_concurrent: int = 0  # concurrent trials (0 = as many as resources allow)
    max_failures: int = 2  # retries of a trial after a node or process failure
    seed: int = 0  # seed of the search algorithm itself (random sampling, Optuna's TPE)


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
    test: bool = False  # score the best epoch on the test split (winner only)
    amp: str = "auto"  # auto (on with CUDA) / on / off
    channels_last: str = "auto"  # auto (on with CUDA) / on / off
    num_workers: int = 0  # DataLoader workers (data is a memmap: 0 is usually enough)


@dataclass
class ResourcesConfig:
    cpu: float = 1.0  # CPUs per trial
    gpu: float = 0.0  # GPUs per trial; fractions let several trials share one GPU


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)


class ConfigError(FsweepError):
    """A config file or override that cannot be applied."""


SECTIONS = {f.name: f.type for f in fields(Config)}


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
OFF_WORDS = ("none", "off", "false", "")  # spellings of "no detector / no weights" (YAML reads bare off as False)


def parse_flag(value: Any, where: str) -> bool:
    """A boolean from a bool or a true/false word (on/off, yes/no, 1/0); ConfigError otherwise."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def is_off(value: Any) -> bool:
    """True when a path-like option (roi.detector, train.pretrained) says none/off rather than naming a path."""
    return value is None or str(value).strip().lower() in OFF_WORDS


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


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``--set`` overrides.

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
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, f"--set {text}")
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (checkpoints, trial dirs)."""
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "config dict")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def normalise_toggle(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Map YAML's False (bare ``off``) to 'off' and check ``value`` is one of ``choices``."""
    if value is False or value is None:
        value = "off"
    value = str(value).lower()
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value
