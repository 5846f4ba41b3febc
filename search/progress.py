"""A sweep at a glance: the live view of ``fsweep sweep``/``resume``/``demo`` and ``fsweep status``.

One status, two sources: the driver's ``ProgressView`` (a Ray Tune callback, fed Tune's
``Trial`` objects) and ``read_progress`` (the files Ray Tune documents in each trial's
directory: ``params.json``, ``result.json``, ``error.txt``; read from another shell
without joining Ray). Both become ``TrialSnapshot`` lists that the pure
``summarize`` / ``format_block`` / ``format_line`` turn into the same text. On a
terminal the view redraws as one block; otherwise it prints one line per change, at
most one every ``LINE_INTERVAL_S`` seconds. Ray's and the libraries' own logs go to
``<experiment>/logs/driver.log`` (``driver_logs``), each trial's output to its
``stdout``/``stderr`` files.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from cluster.storage import is_uri, join, open_filesystem
from fsmodels.config import Config, asha_settings, rung_epochs
from search import space
from search.names import dirname_trial_id
from search.expdir import get_text, put_bytes, put_text

PROGRESS_FILE = "fsweep_progress.json"  # the sweep's planned trial count and start time, for `fsweep status`
LOG_DIR = "logs"  # <experiment>/logs/driver.log: Ray's and the driver's library logs
DRIVER_LOG = "driver.log"
LINE_INTERVAL_S = 10.0  # off a terminal: at most one progress line this often (plus the final one)
REDRAW_INTERVAL_S = 1.0  # on a terminal: the block's clock ticks this often
FINISHED = ("TERMINATED", "ERROR")  # Tune's end states


@dataclass
class TrialSnapshot:
    """What the view needs of one trial (from a Tune ``Trial`` or a trial's saved state)."""

    trial_id: str
    status: str  # Tune's: PENDING / RUNNING / PAUSED / TERMINATED / ERROR
    config: dict
    epochs_run: int = 0
    epochs_planned: int = 0
    best: float | None = None  # the trial's best validation metric so far
    best_epoch: int | None = None
    seconds: float = 0.0  # training time so far (Tune's time_total_s)
    diverged: bool = False


@dataclass
class Progress:
    """The counts, the best trial and the clock of a sweep: everything the view prints."""

    name: str
    metric: str
    mode: str
    keys: list[str]  # searched space keys: the config shown with the best trial
    total: int
    done: int = 0
    stopped: int = 0  # ended before their planned epochs (ASHA)
    failed: int = 0  # errored or diverged
    running: int = 0
    pending: int = 0  # waiting, paused or not created yet
    best: TrialSnapshot | None = None
    elapsed_s: float = 0.0
    remaining_s: float | None = None  # None: no epoch timed yet
    age_s: float | None = None  # how old the saved state is (`fsweep status` only)

    @property
    def finished(self) -> bool:
        """True when every planned trial has ended."""
        return self.running == 0 and self.pending == 0 and self.total > 0


def snapshot(trial_id: str, status: str, config: dict, result: dict | None, metric: str) -> TrialSnapshot:
    """A TrialSnapshot from Tune's trial fields and its last reported result (``{}`` before the first epoch)."""
    result = result or {}
    best = result.get(f"best_{metric}")
    return TrialSnapshot(
        trial_id=trial_id, status=status, config=dict(config or {}),
        epochs_run=int(result.get("epoch", result.get("training_iteration", 0)) or 0),
        epochs_planned=int((config or {}).get("epochs") or 0),
        best=float(best) if isinstance(best, (int, float)) and math.isfinite(best) else None,
        best_epoch=result.get("best_epoch"), seconds=float(result.get("time_total_s", 0.0) or 0.0),
        diverged=bool(result.get("diverged", False)),
    )


def _category(trial: TrialSnapshot) -> str:
    if trial.status == "ERROR" or (trial.status == "TERMINATED" and trial.diverged):
        return "failed"
    if trial.status == "TERMINATED":
        return "stopped" if trial.epochs_run < trial.epochs_planned else "done"
    return "running" if trial.status == "RUNNING" else "pending"


def _best(trials: list[TrialSnapshot], mode: str) -> TrialSnapshot | None:
    scored = [t for t in trials if t.best is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t.best)


def asha_rungs(cfg: Config) -> tuple[int, int] | None:
    """(grace period, reduction factor) when the sweep's scheduler is ASHA, else None."""
    asha = asha_settings(cfg)
    return asha[:2] if asha else None


def expected_epochs(start: int, planned: int, asha: tuple[int, int] | None) -> float:
    """Epochs a trial alive after ``start`` is expected to run on: all of them, or with ASHA
    (rungs at grace x factor^k) a 1/factor share past each rung still ahead."""
    if asha is None:
        return max(0.0, planned - start)
    grace, factor = asha
    left, alive, position = 0.0, 1.0, start
    for rung in rung_epochs(grace, factor, planned):
        if position < rung < planned:
            left, alive, position = left + (rung - position) * alive, alive / factor, rung
    return left + max(0, planned - position) * alive


def _remaining(trials: list[TrialSnapshot], uncreated: int, slots: int, asha) -> float | None:
    """Seconds left at the epoch pace seen so far, spread over ``slots`` trials at a time."""
    epochs = sum(t.epochs_run for t in trials)
    if epochs == 0:
        return None
    per_epoch = sum(t.seconds for t in trials) / epochs
    planned = [t.epochs_planned for t in trials] or [0]
    left = sum(expected_epochs(t.epochs_run, t.epochs_planned, asha)
               for t in trials if _category(t) in ("running", "pending"))
    left += uncreated * expected_epochs(0, round(sum(planned) / len(planned)), asha)
    return left * per_epoch / max(1, slots)


def summarize(
    trials: list[TrialSnapshot], *, name: str, metric: str, mode: str, keys: list[str], total: int | None,
    elapsed_s: float, age_s: float | None = None, asha: tuple[int, int] | None = None, slots: int = 0,
) -> Progress:
    """Count the trials by state, find the best so far and estimate the time left.

    ``asha``: see asha_rungs; ``slots``: trials that run at once (search.max_concurrent; 0: those running now).
    """
    total = max(total or 0, len(trials))
    progress = Progress(name=name, metric=metric, mode=mode, keys=list(keys), total=total, elapsed_s=elapsed_s,
                        age_s=age_s)
    for trial in trials:
        category = _category(trial)
        setattr(progress, category, getattr(progress, category) + 1)
    uncreated = total - len(trials)
    progress.pending += uncreated
    progress.best = _best(trials, mode)
    slots = min(slots, progress.running + progress.pending) if slots else progress.running
    progress.remaining_s = 0.0 if progress.finished else _remaining(trials, uncreated, slots, asha)
    return progress


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _best_text(p: Progress) -> str:
    if p.best is None:
        return f"best {p.metric}: none yet"
    keys = p.keys or ["backbone"]
    config = " ".join(f"{k}={_value(p.best.config[k])}" for k in keys if k in p.best.config)
    epoch = f", epoch {p.best.best_epoch}" if p.best.best_epoch is not None else ""
    return f"best {p.metric} {p.best.best:.3f} (trial {p.best.trial_id}{epoch}): {config}"


def _counts_text(p: Progress) -> str:
    ended = p.done + p.stopped + p.failed
    return (f"{ended}/{p.total} trials ended ({p.done} done, {p.stopped} stopped early, {p.failed} failed), "
            f"{p.running} running, {p.pending} pending")


def _clock_text(p: Progress) -> str:
    left = "finished" if p.finished else f"about {format_duration(p.remaining_s)} left"
    age = f" (state saved {format_duration(p.age_s)} ago)" if p.age_s is not None and not p.finished else ""
    return f"elapsed {format_duration(p.elapsed_s)}, {left}{age}"


def format_block(p: Progress) -> list[str]:
    """The view as three lines: counts, best so far with its config, clock."""
    return [f"sweep {p.name}: {_counts_text(p)}", f"  {_best_text(p)}", f"  {_clock_text(p)}"]


def format_line(p: Progress) -> str:
    """The view as one line (logs and non-terminal output)."""
    return f"[{format_duration(p.elapsed_s)}] {_counts_text(p)}; {_best_text(p)}; {_clock_text(p)}"


# --- the driver's live view ----------------------------------------------------------------

class ProgressView(tune.Callback):
    """Ray Tune callback that keeps the view on ``stream`` while the sweep runs (replaces Tune's tables)."""

    def __init__(self, experiment: str, *, name: str, metric: str, mode: str, keys: list[str], stream=None,
                 tty: bool | None = None, line_interval_s: float = LINE_INTERVAL_S, asha=None, slots: int = 0):
        self.experiment, self.name, self.metric, self.mode, self.keys = str(experiment), name, metric, mode, keys
        self.asha, self.slots = asha, slots
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.line_interval_s = line_interval_s
        self.trials: dict[str, TrialSnapshot] = {}
        self.total: int | None = None
        self.started = time.monotonic()
        self.drawn_lines = 0  # lines of the block on screen (terminal)
        self.last_draw = -math.inf
        self.last_key = None  # what the last printed line said (off a terminal)

    def __getstate__(self):  # Tune pickles its callbacks with the tuner (tuner.pkl): streams do not pickle
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.stream = self.stream or sys.stdout

    def setup(self, **info):
        """Tune's start of the run: the planned trial count, recorded for `fsweep status`."""
        self.total = info.get("total_num_samples")
        self.started = time.monotonic()
        put_text(join(self.experiment, PROGRESS_FILE), json.dumps({"total_trials": self.total, "started": time.time()}))

    def _update(self, trial, result: dict | None = None) -> None:
        self.trials[trial.trial_id] = snapshot(trial.trial_id, trial.status, trial.config,
                                               result or trial.last_result, self.metric)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial)
        self.show()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, result)  # Tune updates trial.last_result after its callbacks
        self.show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trial)
        self.trials[trial.trial_id].status = "TERMINATED"  # Tune sets the status after its callbacks
        self.show()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial)
        self.trials[trial.trial_id].status = "ERROR"
        self.show()

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:  # pending trials appear here first; an ended trial is never taken back
            known = self.trials.get(trial.trial_id)
            if known is None or (known.status not in FINISHED and known.status != trial.status):
                self._update(trial)
        self.show()

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._update(trial)
        self.show(final=True)

    def progress(self) -> Progress:
        """The current status."""
        return summarize(list(self.trials.values()), name=self.name, metric=self.metric, mode=self.mode,
                         keys=self.keys, total=self.total, elapsed_s=time.monotonic() - self.started,
                         asha=self.asha, slots=self.slots)

    def show(self, final: bool = False) -> None:
        """Redraw the block (terminal) or print a line when the status changed (throttled)."""
        now = time.monotonic()
        interval = REDRAW_INTERVAL_S if self.tty else self.line_interval_s
        if not final and now - self.last_draw < interval:  # throttled: not even the summary is computed
            return
        p = self.progress()
        if self.tty:
            self._redraw(format_block(p))
            self.last_draw = now
            return
        key = _counts_text(p), _best_text(p)
        if key != self.last_key:
            print(format_line(p), file=self.stream, flush=True)
            self.last_key, self.last_draw = key, now

    def _redraw(self, lines: list[str]) -> None:
        # cursor to the block's first line, clear to the end of the screen, draw again
        up = f"\x1b[{self.drawn_lines}F\x1b[J" if self.drawn_lines else ""
        self.stream.write(up + "\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn_lines = len(lines)


# --- `fsweep status`: the same view from the experiment directory --------------------------

def _list(location: str) -> list[tuple[str, float]]:
    """(name, mtime seconds) of the entries directly in ``location``."""
    import pyarrow.fs

    fs, path = open_filesystem(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [(info.base_name, info.mtime.timestamp() if info.mtime else 0.0) for info in infos]


def _read(location: str) -> str | None:
    try:
        return get_text(location)
    except (FileNotFoundError, OSError):
        return None


def _last_json_line(text: str | None) -> dict:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:  # the driver is appending this very line
        return json.loads(lines[-2]) if len(lines) > 1 else {}


def _ended(result: dict, config: dict) -> bool:
    """Whether a trial's last result is its last: a scheduler stopped it (``done``), it diverged, or it ran every epoch.

    A function trainable that returns adds no ``done`` line to result.json, so the planned epochs tell.
    """
    planned = int(config.get("epochs") or 0)
    epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
    return bool(result.get("done")) or bool(result.get("diverged")) or (planned > 0 and epoch >= planned)


def _trial_from_files(experiment: str, name: str, metric: str) -> tuple[TrialSnapshot, float]:
    """One trial from the files Ray Tune documents in its directory, and the time its newest file was written.

    ``params.json``: the config; ``result.json``: one line per reported result; ``error.txt``: written when the
    trial raised (newer than its last result: it has not run since).
    """
    folder = join(experiment, name)
    files = dict(_list(folder))
    result = _last_json_line(_read(join(folder, "result.json")))
    config = json.loads(_read(join(folder, "params.json")) or "{}") or result.get("config", {})
    errored = "error.txt" in files and files["error.txt"] >= files.get("result.json", 0.0)
    status = "ERROR" if errored else "TERMINATED" if _ended(result, config) else "RUNNING"
    return snapshot(dirname_trial_id(name), status, config, result, metric), max(files.values(), default=0.0)


def read_progress(experiment: str | Path, cfg: Config, now: float | None = None) -> Progress:
    """The status of the sweep in ``experiment`` (path or URI; ``cfg`` its sweep config), from its files alone.

    A trial's directory appears when it starts; trials planned (``fsweep_progress.json``) but without one are
    pending. The elapsed time of a finished sweep is its trials' training time summed (Tune's own total).
    """
    experiment = str(experiment)
    now = time.time() if now is None else now
    metric, mode = cfg.search.metric, cfg.search.mode
    trials, saved = [], 0.0
    for name, _ in _list(experiment):
        if dirname_trial_id(name):  # trial_<id> or trial_<id>_<label>
            trial, written = _trial_from_files(experiment, name, metric)
            trials.append(trial)
            saved = max(saved, written)
    planned = json.loads(_read(join(experiment, PROGRESS_FILE)) or "{}")
    progress = summarize(
        trials, name=Path(experiment.rstrip("/")).name, metric=metric, mode=mode,
        keys=space.searched_keys(cfg), total=planned.get("total_trials"), elapsed_s=0.0, asha=asha_rungs(cfg),
        slots=cfg.search.max_concurrent,
    )
    trained = sum(t.seconds for t in trials)
    if progress.finished:
        progress.elapsed_s = trained
    else:  # since this driver started (fsweep_progress.json), else the training so far and the time since
        started = planned.get("started")
        saved = saved or now
        progress.elapsed_s = now - started if started else trained + now - saved
        progress.age_s = now - saved
    return progress


# --- where the logs go -----------------------------------------------------------------------

@contextmanager
def logs_to_file(path: Path, loggers: tuple[str, ...], streams: bool = False):
    """Send ``loggers`` (and Python warnings; with ``streams`` also stdout/stderr) to the file ``path``.

    The loggers' own handlers are set aside and put back afterwards, so `-v` runs and
    later commands in the same process print as usual.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        saved = {}
        for name in (*loggers, "py.warnings"):
            logger = logging.getLogger(name)
            saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [handler], False
        logging.captureWarnings(True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                if streams:
                    with redirect_stdout(log), redirect_stderr(log):
                        yield path
                else:
                    yield path
        finally:
            logging.captureWarnings(False)
            for name, (handlers, propagate) in saved.items():
                logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate


@contextmanager
def driver_logs(experiment: str, verbose: bool):
    """Ray's driver logs into ``<experiment>/logs/driver.log`` (a URI experiment gets it uploaded at the end).

    ``verbose`` leaves them on the console as well as Ray prints them.
    """
    if verbose:
        yield None
        return
    local = Path(experiment) / LOG_DIR if not is_uri(experiment) else Path(tempfile.mkdtemp(prefix="fsweep-logs-"))
    try:
        with logs_to_file(local / DRIVER_LOG, ("ray",)) as path:
            yield path
    finally:
        if is_uri(experiment) and (local / DRIVER_LOG).is_file():
            put_bytes(join(experiment, LOG_DIR, DRIVER_LOG), (local / DRIVER_LOG).read_bytes())
