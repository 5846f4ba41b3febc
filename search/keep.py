"""``search.keep_checkpoints``: what a finished trial keeps on disk (docs/design.md, 'The config').

``all``: every trial keeps its latest checkpoint, resumable (model and optimizer state)
and with its best weights. ``winners`` (default): the winners keep theirs; every other
trial keeps only its best weights. ``none``: nothing stays resumable; the winners keep
their best weights (export and test scoring read them), the others none. Every
checkpoint keeps its small state file (history, best epoch, config, variant).

Selection applies the policy once the winners are scored (``keep_checkpoints``); while
the sweep runs, ``CheckpointThinner`` already thins each ended trial that can no longer
win (failed, or strictly worse than a finished trial of its view), so the disk holds
full checkpoints only for running trials and (``winners``) the best so far.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
from ray import tune

from cluster.storage import exists, is_uri, join, open_filesystem
from search.expdir import checkpoint_location, put_bytes


def _read_bytes(location: str) -> bytes | None:
    """The bytes of the file at ``location`` (path or URI), None when there is none."""
    if not exists(location):
        return None
    fs, path = open_filesystem(location)
    with fs.open_input_stream(path) as src:
        return src.read()


def thin_location(location: str, keep_best: bool) -> None:
    """``fsmodels.checkpoint.thin_checkpoint`` on a checkpoint path or URI (a URI's files are rewritten in place)."""
    from fsmodels.checkpoint import BEST_FILE, STATE_FILE, thin_checkpoint

    if not is_uri(location):
        thin_checkpoint(location, keep_best)
        return
    with tempfile.TemporaryDirectory(prefix="fsweep-") as tmp:  # only the state file: best.pt is not rewritten
        local = Path(tmp)
        before = _read_bytes(join(location, STATE_FILE))
        if before is not None:  # without it thin_checkpoint says "not a trial checkpoint"
            (local / STATE_FILE).write_bytes(before)
        thin_checkpoint(local, keep_best)
        after = (local / STATE_FILE).read_bytes()
    if after != before:  # rewritten: it held resume-only state; an already thin one is not uploaded again
        put_bytes(join(location, STATE_FILE), after)
    if not keep_best and exists(join(location, BEST_FILE)):
        fs, path = open_filesystem(join(location, BEST_FILE))
        fs.delete_file(path)


def keep_checkpoints(board: pd.DataFrame, winner_ids: set[str], policy: str) -> None:
    """Apply ``policy`` to every trial of the leaderboard once the winners are known (and scored)."""
    if policy == "all" or board.empty:
        return
    for trial_id, location in zip(board["trial_id"], board["checkpoint"]):
        if not isinstance(location, str) or not location:
            continue
        winner = trial_id in winner_ids
        if winner and policy == "winners":
            continue
        thin_location(location, keep_best=winner or policy == "winners")


class CheckpointThinner(tune.Callback):
    """Tune callback: thin an ended trial's checkpoint as soon as it cannot win (keeps the peak disk small).

    Only for ``search.select_by: trial``: a configuration's mean over seeds can make a
    weaker single trial the exported one, so that mode waits for the selection.
    """

    def __init__(self, experiment: str, metric: str, mode: str, policy: str):
        self.experiment, self.metric, self.mode, self.policy = str(experiment), metric, mode, policy
        self.contenders: dict[str, dict[str, tuple[float, str]]] = {}  # view -> trial id -> (value, checkpoint)

    def _location(self, trial) -> str | None:
        return checkpoint_location(self.experiment, trial.checkpoint) if trial.checkpoint else None

    def _thin(self, location: str | None, keep_best: bool) -> None:
        if location and exists(location):
            thin_location(location, keep_best)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._thin(self._location(trial), keep_best=self.policy == "winners")

    def on_trial_complete(self, iteration, trials, trial, **info):
        location, result = self._location(trial), trial.last_result or {}
        value = result.get(f"best_{self.metric}")
        if value is None or not math.isfinite(value) or result.get("diverged"):  # can never win
            self._thin(location, keep_best=self.policy == "winners")
            return
        if self.policy == "none":  # nothing stays resumable; the best weights wait for the selection
            self._thin(location, keep_best=True)
        view = self.contenders.setdefault(str(trial.config.get("view")), {})
        view[trial.trial_id] = (value, location)
        best = max(v for v, _ in view.values()) if self.mode == "max" else min(v for v, _ in view.values())
        for trial_id, (other, other_location) in list(view.items()):
            if (other < best) if self.mode == "max" else (other > best):  # strictly worse: never the winner
                self._thin(other_location, keep_best=self.policy == "winners")
                del view[trial_id]
