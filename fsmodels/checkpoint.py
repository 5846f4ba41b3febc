"""Per-epoch trial checkpoints that load with ``torch.load(weights_only=True)``.

Layout of one checkpoint directory (``TRIAL/checkpoints/epoch_NNN/``):
- ``state.pt``: epoch, model / optimizer / scheduler / grad-scaler state dicts,
  the per-epoch history, best epoch and value, the resolved config, the store
  variant key and the BCE ``pos_weight``: everything to continue exactly.
- ``best.pt``: the best epoch's model state dict (what export and test use).
- ``config.yaml``: the resolved config, for people.
Random state is not stored: every epoch reseeds from ``(seed, epoch)``, so a
resumed epoch draws the same shuffles and augmentations as an uninterrupted one.
A directory is written under a temporary name and renamed, so a crash never
leaves a half checkpoint.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from cluster.errors import FsweepError
from fsmodels.config import Config, config_from_dict, save_config

STATE_FILE = "state.pt"  # training state (see module docstring)
BEST_FILE = "best.pt"  # best epoch's model weights


def plain(value):
    """numpy scalars (e.g. values Ray Tune samples) -> Python numbers, recursively: YAML- and weights_only-safe."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def checkpoint_name(epoch: int) -> str:
    """Directory name of the checkpoint written after ``epoch`` (1-based)."""
    return f"epoch_{epoch:03d}"


def save_checkpoint(root: Path, state: dict, best_model: dict, cfg: Config) -> Path:
    """Write ``root/epoch_NNN`` atomically and return it."""
    final = Path(root) / checkpoint_name(state["epoch"])
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    torch.save(best_model, tmp / BEST_FILE)
    save_config(cfg, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


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


def load_best_weights(checkpoint_dir: str | Path) -> dict:
    """The best epoch's model state dict of a checkpoint directory."""
    return _load(checkpoint_dir, BEST_FILE, f"{BEST_FILE} missing")


def checkpoint_config(state: dict) -> Config:
    """The trial's resolved config stored in a checkpoint state."""
    return config_from_dict(state["config"])
