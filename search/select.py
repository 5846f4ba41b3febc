"""Leaderboard and honest selection.

Every trial is ranked by its best epoch's *validation* metric; the best trial per
view is the winner; only then is the winner's checkpoint scored on the test split
(with bootstrap intervals). Nothing here reads a test metric before the choice.
Threshold-dependent metrics (accuracy, F1, sensitivity, specificity) are at each
epoch's validation Youden threshold, the one the exported model uses.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from ray.tune import ExperimentAnalysis, ResultGrid

from cluster.storage import join
from fsmodels.config import SPACE_KEYS, Config
from fsmodels.metrics import FIT_METRICS, SELECTABLE_METRICS, json_safe, operating_threshold
from preprocessing.ingest import dataset_classes, dataset_views
from preprocessing.vocab import flip_as, pair_views
from search.expdir import as_local_dir, checkpoint_location, put_text
from search.keep import keep_checkpoints

LEADERBOARD = "leaderboard.csv"  # one row per trial
WINNERS = "winners.json"  # per view: the winning trial, its validation and test metrics
ACCOUNTING = {"device": "", "device_seconds": float("nan"), "img_per_s": float("nan")}  # leaderboard columns


def best_epoch_metrics(history: pd.DataFrame | None, best_epoch) -> dict:
    """The reported metrics of epoch ``best_epoch`` (the last report of it, should a resume repeat one)."""
    if history is None or history.empty or best_epoch is None or "epoch" not in history:
        return {}
    rows = history[history["epoch"] == best_epoch]
    return rows.iloc[-1].to_dict() if len(rows) else {}


def error_reason(error: BaseException | None) -> str:
    """The last line of a trial's error (exception type and message)."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def trial_rows(experiment: str | Path, metric: str, mode: str) -> list[dict]:
    """One dict per trial: id, status, space values, best-epoch validation metrics, node, error, checkpoint."""
    experiment = str(experiment)
    analysis = ExperimentAnalysis(experiment, default_metric=metric, default_mode=mode)
    rows = []
    for trial, result in zip(analysis.trials, ResultGrid(analysis)):
        last = trial.last_result or {}
        row = {"trial_id": trial.trial_id, "status": "diverged" if last.get("diverged") else trial.status}
        row.update({key: trial.config.get(key) for key in SPACE_KEYS})
        # run_trial picks the best epoch by search.metric and keeps its weights in every later
        # checkpoint (best.pt), so the latest checkpoint serves the best epoch
        best = best_epoch_metrics(result.metrics_dataframe, last.get("best_epoch"))
        row.update({col: best.get(col, float("nan")) for col in SELECTABLE_METRICS})
        row.update({col: best.get(col, float("nan")) for col in FIT_METRICS})  # train AUC and val AUC's 95 % interval
        row["best_epoch"] = last.get("best_epoch") if best else None
        row["epochs_run"] = last.get("epoch", 0)
        # ended by the scheduler (ASHA) before its own epochs: its best epoch is from a shorter training
        row["stopped_early"] = bool(trial.status == "TERMINATED" and row["status"] != "diverged"
                                    and row["epochs_run"] < int(trial.config.get("epochs") or 0))
        # accuracy/f1/sensitivity/specificity are at the best epoch's validation Youden threshold (0.5 when
        # undefined): the operating point the tables, the winners' test figures and the export use
        row["val_youden_threshold"] = best.get("val_youden_threshold", float("nan"))
        row["val_rates_threshold"] = operating_threshold(row["val_youden_threshold"]) if best else float("nan")
        row["node"] = last.get("node", last.get("node_ip", ""))
        # GPU-hours accounting (run_trial): cumulative device-seconds, the device and the training rate
        row.update({key: last.get(key, default) for key, default in ACCOUNTING.items()})
        row["error"] = error_reason(result.error) if trial.status == "ERROR" else ""
        row["checkpoint"] = checkpoint_location(experiment, result.checkpoint) if result.checkpoint else ""
        rows.append(row)
    return rows


def leaderboard(experiment: str | Path, metric: str = "val_auc", mode: str = "max") -> pd.DataFrame:
    """All trials, best validation ``metric`` first (failed trials last, with their reason)."""
    board = pd.DataFrame(trial_rows(experiment, metric, mode))
    if board.empty:
        return board
    board["best_epoch"] = board["best_epoch"].astype("Int64")  # an integer column with gaps for failed trials
    return board.sort_values(metric, ascending=(mode == "min"), na_position="last", kind="stable").reset_index(drop=True)


FITS_BELOW = 0.8  # a winner whose training AUC stays below this barely fits its own training set
EARLY_SHARE = 0.2  # a best epoch within this share of the trial's epochs: it peaked at once, or never learned


def fit_warnings(row: dict) -> list[str]:
    """Plain-words reasons to distrust a trial that ranks well: chance-level validation, an early peak, no fit.

    ``row`` is a leaderboard row (best-epoch ``val_auc``, ``val_auc_lo``/``_hi``, ``train_auc``, ``best_epoch``,
    ``epochs_run`` or else ``epochs``). Empty when none applies, or when the row has no such columns (an older experiment).
    """
    def number(key):
        value = row.get(key)
        return float(value) if value is not None and not pd.isna(value) else math.nan

    auc, lo, hi, train = (number(k) for k in ("val_auc", "val_auc_lo", "val_auc_hi", "train_auc"))
    best = number("best_epoch")
    epochs = number("epochs_run") if number("epochs_run") >= 1 else number("epochs")  # a stopped trial: what it ran
    reasons = []
    if lo <= 0.5:  # the interval does not rule chance out (or lies below it)
        verdict = "indistinguishable from chance" if hi >= 0.5 else "worse than chance"
        reasons.append(f"{verdict} on validation (AUC {auc:.2f} [{lo:.2f}, {hi:.2f}])")
    if best >= 1 and epochs >= 1 and best <= EARLY_SHARE * epochs:
        reasons.append(f"its best epoch is {int(best)} of {int(epochs)}: it peaked at once or never learned")
    if train < FITS_BELOW:
        reasons.append(f"it barely fits its training set (train AUC {train:.2f})")
    return reasons


def winner_warnings(winners: dict) -> list[str]:
    """One line per winner of ``winners.json`` that has ``fit_warnings``: ``winner left: <reason>; <reason>``."""
    return [f"winner {view}: " + "; ".join(win["warnings"]) for view, win in winners.items() if win.get("warnings")]


def best_config(group: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """The trials of the configuration (every space key but seed and fold) with the best mean validation ``metric``.

    Ties go to the lower mean validation loss. Each trial counts once, so a configuration
    run on more seeds or folds is ranked by a steadier mean, never by its luckiest trial.
    """
    keys = [k for k in SPACE_KEYS if k not in ("seed", "fold") and k in group]
    labels = group[keys].astype(str).agg("|".join, axis=1)
    ranked = _ranking(metric)
    means = group.groupby(labels)[ranked].mean()
    order = means.sort_values(ranked, ascending=[mode == "min"] + [True] * (len(ranked) - 1), kind="stable")
    return group[labels == order.index[0]]


def _ranking(metric: str) -> list[str]:
    """The columns that rank trials: ``metric``, then the lower validation loss (once, when it is the metric)."""
    return list(dict.fromkeys([metric, "val_loss"]))


def pick_winners(board: pd.DataFrame, metric: str = "val_auc", mode: str = "max", by: str = "trial") -> dict[str, dict]:
    """Best finished trial per view by validation ``metric`` (only validation columns are looked at).

    ``by="config"`` first keeps the configuration with the best mean over its seeds and folds
    (``best_config``), then its best trial (the one exported). Ties (AUC saturates on small
    validation sets) go to the lower validation loss, as the best epoch within a trial does,
    then to the earlier best epoch.
    """
    if metric not in SELECTABLE_METRICS or board.empty:
        return {}
    usable = board[(board["status"] == "TERMINATED") & board[metric].notna()]  # never a diverged or failed trial
    winners = {}
    for view, group in usable.groupby("view", sort=True):
        if by == "config":
            group = best_config(group, metric, mode)
        keys = [*_ranking(metric), "best_epoch"]
        ascending = [mode == "min"] + [True] * (len(keys) - 1)
        order = group.sort_values(keys, ascending=ascending, kind="stable")
        winners[str(view)] = order.iloc[0].to_dict()
    return winners


def score_on_test(winner: dict) -> dict:
    """The winner's selected checkpoint on the test split: metrics, bootstrap intervals, per-image scores."""
    from fsmodels.train import evaluate_checkpoint

    return evaluate_checkpoint(as_local_dir(winner["checkpoint"]), split="test")


def json_scalar(value):
    """One leaderboard cell for winners.json: numpy/pandas scalars as Python values, NaN and pandas' NA as None
    (JSON null). Scalars only; ``fsmodels.checkpoint.python_values`` converts nested state for checkpoints."""
    if value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def finish_experiment(experiment: str | Path, cfg: Config) -> None:
    """Write leaderboard.csv, then score each view's winner on test into winners.json (+ its per-image scores)."""
    experiment = str(experiment)
    board = leaderboard(experiment, cfg.search.metric, cfg.search.mode)
    if len(board) and (Path(cfg.data.dataset) / "dataset.parquet").is_file():  # which Flip each trial ran
        views = dataset_views(cfg.data.dataset)
        board.insert(board.columns.get_loc("flip") + 1, "flip_as",
                     [flip_as(v, bool(f), views, pair_views(cfg.data.mirror_pair))
                      for v, f in zip(board["view"], board["flip"])])
    put_text(join(experiment, LEADERBOARD), board.to_csv(index=False))
    winners, classes = {}, list(dataset_classes(cfg.data.dataset))  # negative, positive: the report's names
    for view, row in pick_winners(board, cfg.search.metric, cfg.search.mode, cfg.search.select_by).items():
        test = score_on_test(row)
        put_text(join(experiment, f"winner_{view}_test_scores.csv"), pd.DataFrame(test.pop("scores")).to_csv(index=False))
        winners[view] = {
            "trial_id": row["trial_id"],
            "config": {k: json_scalar(row[k]) for k in SPACE_KEYS},
            "best_epoch": json_scalar(row["best_epoch"]),
            "checkpoint": row["checkpoint"],
            "selected_by": f"{cfg.search.metric} ({cfg.search.mode}) on validation"
                           + (", configuration mean over seeds and folds" if cfg.search.select_by == "config" else ""),
            "val": {k: json_scalar(row[k]) for k in (*SELECTABLE_METRICS, *FIT_METRICS) if k.startswith("val_")},
            "train": {"auc": json_scalar(row.get("train_auc"))},
            "warnings": fit_warnings(row),
            "test": test,
            **({"flip_as": row["flip_as"]} if "flip_as" in row else {}),
            "classes": classes,
        }
    put_text(join(experiment, WINNERS), json.dumps(json_safe(winners), indent=2, default=json_scalar))
    keep_checkpoints(board, {win["trial_id"] for win in winners.values()}, cfg.search.keep_checkpoints)
    print(f"leaderboard: {join(experiment, LEADERBOARD)} ({len(board)} trials)")
    for view, win in winners.items():
        print(
            f"winner {view}: trial {win['trial_id']} {cfg.search.metric}={_fmt(win['val'].get(cfg.search.metric))} "
            f"(validation); test auc={_fmt(win['test'].get('auc'))}"
        )
    for line in winner_warnings(winners):
        print(f"WARNING {line}")


def _fmt(value) -> str:
    return "nan" if value is None else f"{value:.3f}"
