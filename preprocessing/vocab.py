"""fsweep's shared words, each defined once: views, labels, splits, HE modes, and how on/off is spelled.

Every layer above imports these; nothing else spells them out. STN modes and the
selectable metrics live in ``fsmodels`` (the lowest layer that uses them).
"""
from __future__ import annotations

from typing import Any

from cluster.errors import FsweepError

VIEWS = ("left", "right")  # the two oblique views, in this order everywhere (class 0 / 1 of the STN's task)
VIEW_CHOICES = (*VIEWS, "both")  # space.view: one model per view (the paper) or one model for both
VIEW_ALIASES = {"left": "left", "l": "left", "right": "right", "r": "right"}  # manifest and --view spellings
LABEL_NAMES = ("normal", "abnormal")  # label 0 and label 1; the positive class is abnormal
LABEL_ALIASES = {"abnormal": 1, "1": 1, "1.0": 1, "normal": 0, "0": 0, "0.0": 0}  # manifest spellings
SPLITS = ("train", "val", "test")
HE_MODES = ("off", "global", "clahe")  # histogram equalization: none, the paper's eq. 1-4, CLAHE
ASPECTS = ("stretch", "pad")  # how a crop becomes square: plain resize (the paper) or pad to square first

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
OFF_WORDS = ("none", "off", "false", "null", "")  # "no detector / no weights" (YAML reads a bare off as False)


class ConfigError(FsweepError):
    """A config file, override or option value that cannot be applied."""


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
    return value is None or value is False or str(value).strip().lower() in OFF_WORDS


def normalise_choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    """``value`` as one of ``choices`` (lower case; YAML's False or None read as 'off'); ConfigError otherwise."""
    if value is False or value is None:
        value = "off"
    value = str(value).strip().lower()
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def parse_view(value: Any) -> str | None:
    """'left' / 'right' from any manifest spelling (L, R, any case); None when it is not a view."""
    return VIEW_ALIASES.get(str(value).strip().lower())


def parse_label(value: Any) -> int | None:
    """1 (abnormal) / 0 (normal) from any manifest spelling; None when it is not a label."""
    return LABEL_ALIASES.get(str(value).strip().lower())
