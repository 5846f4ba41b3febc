"""Trial names: a trial's short config label and its directory (TensorBoard run) name.

No imports beyond the standard library and no module globals: ``fsweep status`` reads
directory names without loading torch, and a trial-dirname creator built on these functions
can be pickled by value (``cloudpickle.register_pickle_by_value``), so plain Ray opens the runs.
"""
from __future__ import annotations


def trial_label(config: dict, keys, sep: str = ",") -> str:
    """A trial's short config label from its searched ``keys``, e.g. ``he=global,flip=on``.

    Booleans read on/off, floats 3 significant digits; characters a directory name or URI
    cannot carry become ``-``. Self-contained (builtins only, no module globals), so a
    trial-dirname creator built on it pickles by value and plain Ray can load it.
    """
    import re

    def text(value) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, float):
            return f"{value:.3g}"
        return re.sub(r"[^A-Za-z0-9._+-]", "-", "none" if value is None else str(value))

    return sep.join(f"{key}={text(config.get(key))}" for key in keys if key in config)


def trial_dirname_text(trial_id: str, label: str = "") -> str:
    """A trial's directory (TensorBoard run) name: ``trial_<id>`` and its label, ``trial_<id>_he=global_flip=on``.

    ``label``: :func:`trial_label` with ``sep="_"``; cut at 100 characters (directory names stay short).
    Self-contained like :func:`trial_label`.
    """
    return f"trial_{trial_id}_{label}"[:106].rstrip("_") if label else f"trial_{trial_id}"


def dirname_trial_id(name: str) -> str | None:
    """The trial id in a trial directory's name (``trial_<id>`` or ``trial_<id>_<label>``); None for other names.

    The label starts at the first ``_<key>=`` (keys are lower-case names; Ray's ids hold none).
    """
    import re

    match = re.fullmatch(r"trial_(.+?)(?:_[a-z][a-z_]*=.*)?", name)
    return match.group(1) if match else None
