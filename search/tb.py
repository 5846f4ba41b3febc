"""TensorBoard for a sweep: per-trial scalars and the HParams dashboard, live.

Layout under the experiment directory (``tensorboard --logdir EXPERIMENT``):
the top-level run holds the HParams *experiment* (every space key with its domain,
the validation metrics); each trial directory is one HParams *session*: its
session-start record (written when the trial starts, so running trials are listed),
its scalars per epoch, and its session-end record. The HParams plugin shows the last
value of each metric's tag, so the metric tags ``best/val_auc``, ... carry the *best epoch's*
values at every step, as selection, the leaderboard, the report and the model card do; their
columns read ``val_auc (best epoch)``, the leaderboard's names. Each epoch's own values are the
curves under ``epoch/val_auc``, ``epoch/train_loss``, ... in Scalars. The trial process adds sample
images and the validation ROC curve to the same directory (:func:`write_samples`,
:func:`write_roc`). Ray's own TensorBoard logger is switched off by the sweep: it
writes HParams only at a trial's end and drops non-numeric values.

The records come from TensorBoard's own HParams API (``summary_v2``'s ``hparams_config_pb`` and
``hparams_pb``, which need no TensorFlow); the two things it cannot say are added by hand, each
where it happens (``_mark_experiment``, ``session_end_summary``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from torch.utils.tensorboard import SummaryWriter

from fsmodels.config import SPACE_KEYS, Config, entry_values, key_values
from fsmodels.metrics import FIT_METRICS, SELECTABLE_METRICS
from search.names import trial_label

EPOCH_PREFIXES = ("val_", "train_")  # this epoch's values: the per-epoch curves, under epoch/<name> in Scalars
BEST_PREFIX = "best/"  # the best epoch so far: best/val_auc, ... (the HParams metrics)
FIT_DESCRIPTIONS = {
    "train_auc": "AUC on the training images at the best epoch, scored in the training pass (below 0.8: barely fits)",
    "val_auc_lo": "lower end of val_auc's 95 % interval (bootstrap over validation patients; <= 0.5: chance)",
    "val_auc_hi": "upper end of val_auc's 95 % interval (bootstrap over validation patients)",
}
BEST_EPOCH_TAG = "best_epoch"  # scalar and HParams metric: the epoch the best-epoch values come from


def best_tag(name: str) -> str:
    """The Scalars tag (and HParams metric) of a metric's best-epoch value, e.g. ``best/val_auc``."""
    return f"{BEST_PREFIX}{name}"


def hparam_value(value: Any) -> Any:
    """A trial's value as the HParams plugin stores it: bool, number or string."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _domain(key: str, raw: Any) -> hp.Domain:
    """A space key's HParams domain: a distribution's bounds, else its values (one type: bool, number or string)."""
    finite = entry_values(key, raw)
    if finite is None:  # a numeric distribution: its bounds as the interval
        (_, args), = raw.items()
        return hp.RealInterval(float(args[0]), float(args[1]))
    values = [hparam_value(v) for v in finite]
    if all(isinstance(v, bool) for v in values):
        return hp.Discrete(dict.fromkeys(values), dtype=bool)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return hp.Discrete(dict.fromkeys(float(v) for v in values), dtype=float)
    return hp.Discrete(dict.fromkeys(str(v) for v in values), dtype=str)


def _metric(name: str, description: str, dataset_type: int | None = hp.Metric.VALIDATION) -> hp.Metric:
    return hp.Metric(best_tag(name), display_name=f"{name} (best epoch)", description=description,
                     dataset_type=dataset_type)


def _mark_experiment(summary: Summary, differs: set[str], description: str) -> Summary:
    """Set ``differs`` and the description on an ``hparams_config_pb`` record, which has no argument for either.

    TensorBoard computes ``differs`` itself only for an experiment it infers from the sessions, and an inferred
    experiment would list every scalar tag (the ``epoch/*`` curves too) as a metric, without display names.
    """
    value = summary.value[0]
    data = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    for info in data.hparam_infos:
        info.differs = info.name in differs  # HParams sorts these first: its default columns
    data.description = description
    value.metadata.CopyFrom(metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=data)))
    return summary


def experiment_summary(cfg: Config, description: str = "") -> Summary:
    """The HParams experiment: every space key and the best epoch's validation metrics (the leaderboard's).

    The searched keys (``search.space.searched_keys``: more than one value) are marked ``differs``,
    so they are the dashboard's default columns. Metric columns read ``val_auc (best epoch)`` etc.,
    the leaderboard's names; their tags are ``best/val_auc`` etc.
    """
    from search.space import searched_keys

    # explicit points: a key's domain is every value it takes over the points
    hparams = [hp.HParam(key, _domain(key, key_values(cfg, key) if cfg.space.points else getattr(cfg.space, key)))
               for key in SPACE_KEYS]
    metrics = [_metric(tag, "at the trial's best epoch (selection on validation); "
                            f"each epoch's own value: epoch/{tag} in Scalars") for tag in SELECTABLE_METRICS]
    metrics += [  # fit diagnostics beside selection: does the trial fit its training set, is it above chance
        _metric(tag, FIT_DESCRIPTIONS[tag], hp.Metric.TRAINING if tag.startswith("train_") else hp.Metric.VALIDATION)
        for tag in FIT_METRICS
    ]
    metrics.append(hp.Metric(BEST_EPOCH_TAG, display_name=BEST_EPOCH_TAG,
                             description="the epoch the best-epoch metrics come from (1-based)"))
    summary = hp.hparams_config_pb(hparams, metrics, time_created_secs=time.time())
    return _mark_experiment(summary, set(searched_keys(cfg)), description)


def session_start_summary(config: dict, group: str = "") -> Summary:
    """One trial's hyperparameters (every space key), written when it starts.

    ``group``: the name the HParams table shows for the trial (:func:`session_group`); empty: the run's directory.
    """
    values = {key: hparam_value(config[key]) for key in SPACE_KEYS if key in config}
    return hp.hparams_pb(values, trial_id=group, start_time_secs=time.time())


def session_end_summary(status: int) -> Summary:
    """The end of one trial's session with an ``api_pb2.Status`` value."""
    # built by hand: summary_v2 has no session-end record, and summary.session_end_pb needs TensorFlow
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    meta = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=info))
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=meta)])


def write_experiment_summary(experiment_dir: str | Path, cfg: Config, description: str = "") -> None:
    """Write the HParams experiment into the top-level run of ``experiment_dir``."""
    with SummaryWriter(str(experiment_dir)) as writer:
        writer.file_writer.add_summary(experiment_summary(cfg, description))


def trial_log_dir(trial) -> str:
    """Where a trial's TensorBoard files go: its experiment directory when storage is a local path.

    Ray stages driver-side files and syncs them every ``sync_period``; writing a local
    storage path directly makes running trials visible at once.
    """
    local = trial.storage.storage_filesystem.type_name == "local"
    return trial.path if local else trial.local_path


def session_group(trial_id: str, label: str) -> str:
    """The HParams table's name for a trial: its config label first (the column is narrow), then its id.

    The id keeps it unique: HParams merges sessions of one group name into one row.
    """
    return f"{label} [{trial_id}]" if label else ""


class TensorBoardCallback(Callback):
    """Driver-side Tune callback: HParams session + scalars for every trial, live.

    ``keys``: the sweep's searched keys (``search.space.searched_keys``), which name each trial's
    HParams row (:func:`trial_label`).
    """

    def __init__(self, keys=()):
        self._writers: dict[str, SummaryWriter] = {}
        self.keys = list(keys)

    def __getstate__(self) -> dict:
        return {"_writers": {}, "keys": self.keys}  # open writers never travel into Tune's experiment state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"keys": [], **state})  # an older sweep's pickled callback has no keys

    def _writer(self, trial) -> SummaryWriter:
        if trial.trial_id not in self._writers:
            self._writers[trial.trial_id] = SummaryWriter(trial_log_dir(trial))
        return self._writers[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        """Session start: the trial shows up in the HParams table while it runs."""
        writer = self._writer(trial)
        group = session_group(trial.trial_id, trial_label(trial.config, self.keys))
        writer.file_writer.add_summary(session_start_summary(trial.config, group))
        writer.flush()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """Per epoch: the epoch's own values as ``epoch/<name>``, the best epoch's as the HParams metrics."""
        writer = self._writer(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        for key, value in result.items():
            if key.startswith(EPOCH_PREFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"epoch/{key}", float(value), step)
        for name in (*SELECTABLE_METRICS, *FIT_METRICS):
            if f"best_{name}" in result:
                writer.add_scalar(best_tag(name), float(result[f"best_{name}"]), step)
        if result.get("best_epoch"):  # which epoch those values come from (0: no finite epoch yet)
            writer.add_scalar(BEST_EPOCH_TAG, float(result["best_epoch"]), step)
        writer.flush()

    def _end(self, trial, status: int) -> None:
        writer = self._writer(trial)
        writer.file_writer.add_summary(session_end_summary(status))
        writer.close()
        self._writers.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        """Session end, success (also for trials ASHA stopped early)."""
        self._end(trial, api_pb2.STATUS_SUCCESS)

    def on_trial_error(self, iteration, trials, trial, **info):
        """Session end, failure."""
        self._end(trial, api_pb2.STATUS_FAILURE)

    def on_experiment_end(self, trials, **info):
        """Close writers of trials that never ended (driver interrupted)."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


# --- trial-side images (written by the trial process into its own directory) ----------

def _gray_grid(images: list[np.ndarray]) -> np.ndarray:
    """(1, H, W*n) float image in [0, 1] of n equally sized uint8/float images side by side."""
    tiles = [np.asarray(img, dtype=np.float32) / (255.0 if np.asarray(img).dtype == np.uint8 else 1.0) for img in images]
    return np.concatenate(tiles, axis=1)[None]


def write_samples(log_dir: str | Path, stages: dict[str, list[np.ndarray]]) -> None:
    """One image per preprocessing stage (e.g. roi_crop, after_he, after_stn): samples side by side."""
    with SummaryWriter(str(log_dir)) as writer:
        for name, images in stages.items():
            if images:
                writer.add_image(f"samples/{name}", _gray_grid(images), 0)


def write_roc(log_dir: str | Path, y: np.ndarray, scores: np.ndarray, step: int, title: str = "validation ROC") -> None:
    """The ROC curve of one trial's selected epoch as an image (tag ``roc/val``)."""
    import cv2

    from search.report import roc_figure_png

    png = np.frombuffer(roc_figure_png(y, scores, title), dtype=np.uint8)
    rgb = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with SummaryWriter(str(log_dir)) as writer:
        writer.add_image("roc/val", rgb, step, dataformats="HWC")
