"""fsweep's shared words, each defined once: views, labels, splits, HE modes, and how on/off is spelled.

Every layer above imports these; nothing else spells them out. STN modes and the
selectable metrics live in ``fsmodels`` (the lowest layer that uses them).
"""
from __future__ import annotations

import re
from typing import Any

from cluster.errors import FsweepError

VIEWS = ("left", "right")  # the mirrored pair (the paper's two oblique views), in this order everywhere
VIEW_CHOICES = (*VIEWS, "both")  # space.view on the paper's data: one model per view or one model for both
VIEW_ALIASES = {"left": "left", "l": "left", "right": "right", "r": "right"}  # manifest and --view spellings
ALL_VIEWS = "all"  # space.view: one model over every view; also the one view of a manifest without a view column
EVERY_VIEW = ("both", ALL_VIEWS)  # space.view words for one model over every view of the data set
# A view name becomes part of file names (STORE/<key>/<split>_<view>.npy, MODEL_DIR/<view>/), so it is
# lower case and limited to characters every file system takes.
VIEW_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,39}")
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


def view_name(value: Any) -> str:
    """A manifest view's canonical name: left / right from any spelling (L, R, any case), else the data set's
    own name in lower case with spaces as '_'; ConfigError (saying why) for an empty, reserved or unsafe name."""
    text = str(value).strip()
    side = parse_view(text)
    if side is not None:
        return side
    name = re.sub(r"\s+", "_", text.lower())
    if not name:
        raise ConfigError("empty view name")
    if name == "both":
        raise ConfigError("'both' is reserved (space.view=both means one model over every view)")
    if not VIEW_NAME.fullmatch(name):
        raise ConfigError(f"{text!r} cannot name a view (letters, digits, '_', '-', '.', '+'; at most 40; "
                          "it names the store's files)")
    return name


def order_views(views) -> tuple[str, ...]:
    """A data set's views in the order used everywhere: left, right first (the paper's order), then by name."""
    present = set(views)
    return tuple(v for v in VIEWS if v in present) + tuple(sorted(present - set(VIEWS)))


def store_views(present) -> tuple[str, ...]:
    """The views a data set's arrays and counts cover: the mirrored pair whenever its views are only
    left/right (both arrays, an empty one included, as the paper's shape always had), else those present."""
    present = set(present)
    return VIEWS if present <= set(VIEWS) else order_views(present)


def model_views(view: str, views: tuple[str, ...]) -> tuple[str, ...]:
    """The views one model of ``space.view`` reads: every view for both/all, else that view."""
    return tuple(views) if view in EVERY_VIEW else (view,)


def parse_pair(value: Any, where: str) -> str:
    """data.mirror_pair as 'a,b' (two different view names, from 'a,b' or a list) or 'none'; ConfigError."""
    if is_off(value):
        return "none"
    # a YAML list reaches here as its str() ("['lao', 'rao']"): brackets and quotes are not part of a name
    names = value if isinstance(value, (list, tuple)) else str(value).strip("[]() ").split(",")
    names = [str(n).strip().strip("'\"") for n in names]
    try:
        pair = [view_name(v) for v in names]
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ConfigError(f"{where}: expected two different views, e.g. left,right (or none), got {value!r}")
    return ",".join(pair)


def pair_views(text: str) -> tuple[str, ...]:
    """The two views of a ``parse_pair`` value ('none': no pair)."""
    return () if text == "none" else tuple(text.split(","))


def has_mirrored_pair(views, pair: tuple[str, ...] = VIEWS) -> bool:
    """True when the data set holds both views of the mirrored ``pair``, so cross-view Flip has a partner."""
    return bool(pair) and all(v in set(views) for v in pair)


def flip_kind(view: str, views, pair: tuple[str, ...] = VIEWS) -> str:
    """Which Flip a model of ``view`` gets: 'cross-view' (the paper's: the mirrored pair's other view joins,
    mirrored) when the data holds the pair and ``view`` is in it or spans it, else 'horizontal' (each view's
    own training images join, mirrored)."""
    if has_mirrored_pair(views, pair) and (view in pair or view in EVERY_VIEW):
        return "cross-view"
    return "horizontal"


def flip_as(view: str, flip: bool, views, pair: tuple[str, ...] = VIEWS) -> str:
    """What a trial's Flip setting ran as: 'off', 'cross-view' or 'horizontal' (``flip_kind``)."""
    return flip_kind(view, views, pair) if flip else "off"


def check_view_choice(view: str, views, where: str) -> None:
    """ConfigError unless ``view`` (a space.view value) is one of the data set's ``views`` or both/all."""
    if view not in EVERY_VIEW and view not in set(views):
        raise ConfigError(f"{where}: view={view!r} is not in the data set (its views: "
                          f"{', '.join(order_views(views))}; or all for one model over every view)")


def class_names(positive: Any = None, negative: Any = None) -> tuple[str, str]:
    """(negative, positive) class names, label 0 and label 1: the defaults normal / abnormal, or the data set's."""
    names = (str(negative or LABEL_NAMES[0]).strip().lower(), str(positive or LABEL_NAMES[1]).strip().lower())
    if not all(names) or names[0] == names[1]:
        raise ConfigError(f"class names must be two different non-empty names, got {names[1]!r} / {names[0]!r}")
    return names


def label_parser(names: tuple[str, str] = LABEL_NAMES):
    """A function from a manifest label cell to 1 (positive) / 0 (negative) / None: 1/0 always, the
    default words, and the data set's own ``names`` (negative, positive)."""
    aliases = {**{k: v for k, v in LABEL_ALIASES.items() if k[0].isdigit()}, names[0]: 0, names[1]: 1}

    def parse(value: Any) -> int | None:
        return aliases.get(str(value).strip().lower())

    parse.names = names  # rejection reasons name the classes this parser takes
    return parse
