"""Per-epoch trial checkpoints that load with ``torch.load(weights_only=True)``.

Layout of one checkpoint directory (``TRIAL/checkpoints/epoch_NNN/``):
- ``state.pt``: epoch, model / optimizer / scheduler / grad-scaler state dicts,
  the per-epoch history, best epoch and value, the resolved config, the store
  variant key and the BCE ``pos_weight``: everything to continue exactly.
- ``best.pt``: the best epoch's model state dict (what export and test use).
- ``config.yaml``: the resolved config, for people.
- ``best_scores.parquet`` (``train.test_every_trial`` only): the best epoch's per-image validation
  and test scores, which the report's test-scored tables read; it lives here, not in the trial's
  working directory, so a trial restored from its checkpoint on another node still has it.
Random state is not stored: every epoch reseeds from ``(seed, epoch)``, so a
resumed epoch draws the same shuffles and augmentations as an uninterrupted one.
A directory is written under a temporary name and renamed, so a crash never
leaves a half checkpoint. It is written on the training thread: Ray persists it
in ``tune.report`` right after, so it must be whole by then; ``checkpoint_epochs``
says which epochs write one (``train.checkpoint_every``, the last epoch and ASHA's
rung epochs, where a trial may be stopped).
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from cluster.errors import FsweepError
from fsmodels.config import Config, config_from_dict, rung_epochs, save_config

STATE_FILE = "state.pt"  # training state (see module docstring)
BEST_FILE = "best.pt"  # best epoch's model weights
BEST_SCORES = "best_scores.parquet"  # the best epoch's per-image val and test scores (train.test_every_trial)


def python_values(value):
    """numpy scalars (e.g. values Ray Tune samples) -> Python numbers, recursively: YAML- and weights_only-safe.

    NaN stays NaN (a checkpoint keeps floats); ``search.select.json_scalar`` is the JSON-side rule.
    """
    if isinstance(value, dict):
        return {k: python_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [python_values(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def checkpoint_name(epoch: int) -> str:
    """Directory name of the checkpoint written after ``epoch`` (1-based)."""
    return f"epoch_{epoch:03d}"


def save_checkpoint(root: Path, state: dict, best_model: dict, cfg: Config, best_scores=None) -> Path:
    """Write ``root/epoch_NNN`` atomically and return it (``best_scores``: a DataFrame, or None)."""
    final = Path(root) / checkpoint_name(state["epoch"])
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    torch.save(best_model, tmp / BEST_FILE)
    save_config(cfg, tmp / "config.yaml")
    if best_scores is not None:
        best_scores.to_parquet(tmp / BEST_SCORES, index=False)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def cpu_copy(value):
    """A CPU copy of a state (nested dicts/lists of tensors) that later training steps leave unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


def checkpoint_epochs(every: int, epochs: int, asha: tuple[int, int, int] | None = None) -> set[int]:
    """Epochs that write a checkpoint: every ``every``-th, the last and, under ASHA (grace, factor, max_t), each rung.

    ASHA stops a trial only at a rung epoch, so a stopped trial still ends on a checkpoint holding its best weights.
    """
    chosen = set(range(every, epochs + 1, every)) | {epochs}
    if asha is not None:
        chosen |= {*rung_epochs(*asha), asha[2]}
    return {e for e in chosen if 1 <= e <= epochs}


def prune_checkpoints(root: Path, keep: Path) -> None:
    """Remove every epoch directory under ``root`` except ``keep`` (the newest holds the best weights too)."""
    for old in Path(root).glob("epoch_*"):
        if old.resolve() != Path(keep).resolve():
            shutil.rmtree(old, ignore_errors=True)


def _load(checkpoint_dir: str | Path, name: str, missing: str) -> dict:
    """``torch.load(weights_only=True)`` of one checkpoint file; a missing or damaged file is one FsweepError."""
    path = Path(checkpoint_dir) / name
    if not path.is_file():
        raise FsweepError(f"{checkpoint_dir}: {missing}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated zip, empty file, foreign pickle
        raise FsweepError(f"{path}: unreadable ({type(exc).__name__}); the checkpoint is damaged") from None


def load_state(checkpoint_dir: str | Path) -> dict:
    """The training state of a checkpoint directory (weights_only load)."""
    return _load(checkpoint_dir, STATE_FILE, f"not a trial checkpoint ({STATE_FILE} missing)")


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler")  # what only continuing a trial needs


def load_resumable_state(checkpoint_dir: str | Path) -> dict:
    """The training state of a checkpoint that can continue; one FsweepError for a thinned one."""
    state = load_state(checkpoint_dir)
    if not all(key in state for key in RESUME_KEYS):
        raise FsweepError(f"{checkpoint_dir}: holds only the best weights (search.keep_checkpoints); it cannot resume")
    return state


def thin_checkpoint(checkpoint_dir: str | Path, keep_best: bool = True) -> None:
    """Make a finished trial's checkpoint small: drop the resume-only state, and with ``keep_best=False`` best.pt.

    The history, best epoch, config, variant and pos_weight stay in ``state.pt``: the
    leaderboard, export and test scoring read them. Rewritten under a temporary name.
    """
    folder = Path(checkpoint_dir)
    state = load_state(folder)
    if any(key in state for key in RESUME_KEYS):
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save({k: v for k, v in state.items() if k not in RESUME_KEYS}, tmp)
        os.replace(tmp, folder / STATE_FILE)
    if not keep_best:
        (folder / BEST_FILE).unlink(missing_ok=True)


def load_best_scores(checkpoint_dir: str | Path):
    """The checkpoint's best-epoch per-image scores (a DataFrame), None when the trial kept none."""
    import pandas as pd

    path = Path(checkpoint_dir) / BEST_SCORES
    return pd.read_parquet(path) if path.is_file() else None


def load_best_weights(checkpoint_dir: str | Path) -> dict:
    """The best epoch's model state dict of a checkpoint directory."""
    return _load(checkpoint_dir, BEST_FILE, f"{BEST_FILE} missing")


def recorded_variant(state: dict) -> dict:
    """The handle ({key, manifest}) of the variant a checkpoint's trial trained on; checkpoints from before
    handles were recorded carry only the key (manifest None: the cheap check alone)."""
    return state.get("artifacts", {}).get("variant") or {"key": state["variant"], "manifest": None}


def checkpoint_config(state: dict) -> Config:
    """The trial's resolved config stored in a checkpoint state."""
    return config_from_dict(state["config"])
