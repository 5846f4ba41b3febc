"""The report's comparison tables: every row scored on TEST at its trial's best-on-validation epoch.

Sections: one per view (the paper's tables are per view). Rows: one per combination of the
row keys, ``report.rows`` or else every space key that varies (seed and fold aside: they are
the replicates a row averages over), so no key is collapsed to its best value. Order: as
the sweep created the trials (the plan's order). Baseline: the row ``report.baseline`` names,
else the section's first row.

Rules, so a researcher can trust the numbers:
- each trial is scored on test at its best epoch by validation ``search.metric`` (the scores
  ``fsmodels.train`` keeps in its checkpoint's ``best_scores.parquet`` under ``train.test_every_trial``);
  selection never reads them;
- the decision threshold of each trial is Youden's J on its best epoch's VALIDATION ROC
  (0.5 when undefined), applied unchanged on test;
- a row gives mean ± std over its trials (seeds x folds), the test images per trial (n)
  and the number of seeds and folds;
- each row's paired difference to the baseline (row - baseline, per fold averaged over
  seeds, then over folds) has a 95 % interval from a paired bootstrap that resamples test
  PATIENTS, the same patients for both rows; ``vs baseline`` says whether its AUC interval
  lies above, below or across 0;
- trials stopped early by the scheduler (ASHA) trained for fewer epochs than their row says:
  they are left out of every paired difference (``comparison_sections``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cluster.storage import exists, join, open_filesystem
from fsmodels.config import SPACE_KEYS, Config
from fsmodels.metrics import (
    NAN,
    all_finite,
    auc_score,
    confusion,
    operating_threshold,
    patient_draws,
    rates,
    youden_threshold,
)

REPLICATES = ("seed", "fold")  # what a row averages over
N_BOOT = 1000
PAPER_ORDER = ("accuracy", "f1", "specificity", "sensitivity", "auc")  # the paper's columns, then AUC


@dataclass
class Section:
    """One view's comparison: its rows (markdown-ready cells) and the paired differences to its baseline."""

    title: str
    rows: pd.DataFrame
    diffs: pd.DataFrame


def trial_dir_names(experiment: str) -> dict[str, str]:
    """trial id -> its directory's name in ``experiment`` (``trial_<id>`` or ``trial_<id>_<label>``)."""
    import pyarrow.fs

    from search.names import dirname_trial_id

    fs, path = open_filesystem(str(experiment))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    names = [info.base_name for info in infos if info.type == pyarrow.fs.FileType.Directory]
    return {dirname_trial_id(name): name for name in names if dirname_trial_id(name)}


def read_best_scores(experiment: str, board: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """trial id -> the best_scores.parquet inside the checkpoint the leaderboard recorded for it.

    The file travels in the checkpoint Ray persists, so a trial restored on another node reads the
    same. A checkpoint recorded under another path (the experiment was moved) is looked for under
    ``experiment``'s trial directory of the same id. Trials without one (test scoring off) are left out.
    """
    from fsmodels.checkpoint import BEST_SCORES  # every checkpoint names the file

    out, dirs = {}, None
    for trial_id, recorded in zip(board["trial_id"], board["checkpoint"]):
        if not isinstance(recorded, str) or not recorded:
            continue
        location = join(recorded, BEST_SCORES)
        if not exists(location):
            dirs = trial_dir_names(experiment) if dirs is None else dirs
            parts = recorded.rstrip("/").rsplit("/", 2)  # [..., trial dir, checkpoint dir]
            if len(parts) == 3:
                location = join(str(experiment), dirs.get(str(trial_id), parts[1]), parts[2], BEST_SCORES)
        if exists(location):
            fs, path = open_filesystem(location)
            with fs.open_input_file(path) as handle:
                out[str(trial_id)] = pd.read_parquet(handle)
    return out


def trial_threshold(scores: pd.DataFrame) -> float:
    """Youden's J threshold on the trial's best-epoch validation scores; 0.5 when undefined (``operating_threshold``)."""
    val = scores[scores["split"] == "val"]
    return operating_threshold(youden_threshold(val["label"], val["score"]))


def held_out_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The trial's test images in a fixed order (image_id), so trials of one fold line up."""
    return scores[scores["split"] == "test"].sort_values("image_id").reset_index(drop=True)


def _metrics(labels, scores, threshold) -> dict:
    """The paper's metrics at ``threshold``, all nan when a score is not finite (as ``binary_metrics``).

    Only ``binary_metrics``'s cheap part: the bootstrap calls this for every trial and resample
    and needs no Youden threshold.
    """
    if not all_finite(scores):
        return dict.fromkeys(PAPER_ORDER, NAN)
    m = {"auc": auc_score(labels, scores), **rates(**confusion(labels, scores, threshold))}
    return {k: m[k] for k in PAPER_ORDER}


def row_keys(cfg: Config, done: pd.DataFrame) -> list[str]:
    """The keys naming a row: ``report.rows``, else every varying space key but view, seed and fold."""
    if cfg.report.rows:
        return [k for k in cfg.report.rows if k in SPACE_KEYS]
    # k in done: an older sweep's leaderboard lacks space keys added since
    return [k for k in SPACE_KEYS if k not in ("view", *REPLICATES) and k in done and done[k].astype(str).nunique() > 1]


def _baseline_index(labels: list[dict], baseline) -> int:
    """The row ``baseline`` ({key: value}) names (values compared as text), else 0."""
    if isinstance(baseline, dict) and baseline:
        for i, label in enumerate(labels):
            if all(str(label.get(k)) == str(v) for k, v in baseline.items()):
                return i
    return 0


def _mean(values: list[float]) -> float:
    """Mean of the defined values (a metric undefined in a resample, e.g. F1 without positives, is left out)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def fold_map(board: pd.DataFrame, trials) -> dict[str, int]:
    """trial id -> its fold (0 when the board has no fold column)."""
    if "fold" not in board:
        return dict.fromkeys(trials, 0)
    return {t: int(board.loc[t, "fold"]) for t in trials}


def _by_fold(trials: list[str], fold_of: dict[str, int]) -> dict[int, list[str]]:
    """fold -> the trials of ``trials`` in it, in order."""
    out: dict[int, list[str]] = {}
    for trial_id in trials:
        out.setdefault(fold_of[trial_id], []).append(trial_id)
    return out


def _fold_mean(trials: list[str], scores: dict, idx=None) -> dict:
    """Mean over one fold's trials of each metric (``idx``: a bootstrap resample of the fold's test rows)."""
    per_trial = []
    for trial_id in trials:
        test, threshold = scores[trial_id]
        y, s = test["label"].to_numpy(), test["score"].to_numpy()
        if idx is not None:
            y, s = y[idx], s[idx]
        per_trial.append(_metrics(y, s, threshold))
    return {k: _mean([m[k] for m in per_trial]) for k in PAPER_ORDER}


def _fold_curve(trials: list[str], scores: dict, draws) -> list[dict]:
    """One fold's metric means: on its test images, then on each resample of ``draws``."""
    return [_fold_mean(trials, scores)] + [_fold_mean(trials, scores, idx) for idx in draws]


def _baseline_curve(trials: list[str], scores: dict, patients, n_boot: int, seed: int, cache: dict) -> tuple:
    """(draws, ``_fold_curve``) of the baseline's trials of one fold, drawn and scored once per section.

    Every row of a section pairs with the same baseline on the same test images of a fold (the
    pairing applies one resample to both), so the baseline's resamples are the same for every row.
    """
    key = (tuple(trials), n_boot, seed)
    if key not in cache:
        draws = patient_draws(patients, n_boot, seed)
        cache[key] = (draws, _fold_curve(trials, scores, draws))
    return cache[key]


def paired_difference(row: list[str], base: list[str], board: pd.DataFrame, scores: dict,
                      n_boot: int = N_BOOT, seed: int = 0, fold_of: dict | None = None,
                      cache: dict | None = None) -> dict:
    """Row - baseline per metric with a paired patient-level bootstrap 95 % interval (folds both rows share).

    ``fold_of``: trial id -> fold (else read from ``board``); ``cache``: one dict per baseline, so
    the baseline's resamples are scored once for all rows it pairs with.
    """
    fold_of = fold_map(board, row + base) if fold_of is None else fold_of
    rows, bases = _by_fold(row, fold_of), _by_fold(base, fold_of)
    folds = sorted(set(rows) & set(bases))
    if not folds:
        return {}
    cache = {} if cache is None else cache
    # one patient resample per fold, applied to every trial of both rows (all see the same test images)
    row_curves, base_curves = {}, {}
    for f in folds:
        patients = scores[rows[f][0]][0]["patient"].to_numpy()
        draws, base_curves[f] = _baseline_curve(bases[f], scores, patients, n_boot, seed + f, cache)
        row_curves[f] = _fold_curve(rows[f], scores, draws)
    # entry 0: the test images themselves (the point estimate); entries 1..n_boot: the resamples
    diffs = [{k: _mean([row_curves[f][i][k] - base_curves[f][i][k] for f in folds]) for k in PAPER_ORDER}
             for i in range(n_boot + 1)]
    out = {}
    for k, point in diffs[0].items():
        values = np.array([d[k] for d in diffs[1:]])
        values = values[np.isfinite(values)]
        lo, hi = np.percentile(values, [2.5, 97.5]) if values.size else (np.nan, np.nan)
        out[k] = (point, float(lo), float(hi))
    return out


def _cell(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.3f}" if len(values) < 2 else f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def stopped_early(board: pd.DataFrame) -> pd.Series:
    """Per leaderboard row: ended by the scheduler (ASHA) before its own ``epochs`` (older boards: from epochs_run)."""
    if "stopped_early" in board:
        return board["stopped_early"].map(lambda v: str(v).lower() == "true")  # bools, or their CSV text
    if "epochs_run" in board and "epochs" in board:
        ran, planned = pd.to_numeric(board["epochs_run"], errors="coerce"), pd.to_numeric(board["epochs"], errors="coerce")
        return (board["status"] == "TERMINATED") & (ran < planned)
    return pd.Series(False, index=board.index)


def _early_mark(early: list[str], members: list[str], board: pd.DataFrame) -> str:
    """The ``stopped early`` cell: which of a row's trials the scheduler stopped, and how they count."""
    if not early:
        return ""
    if len(early) < len(members):
        return f"{len(early)} of {len(members)} left out"
    runs = sorted({int(board.loc[t, "epochs_run"]) for t in early}) if "epochs_run" in board else []
    planned = sorted({int(board.loc[t, "epochs"]) for t in early}) if "epochs" in board else []
    at = f" (epoch {'/'.join(map(str, runs))} of {'/'.join(map(str, planned))})" if runs and planned else ""
    return f"yes{at}: not compared"


def verdict(diff: dict) -> str:
    """How a row's paired AUC difference reads: its 95 % interval above, below, or overlapping 0 (the baseline)."""
    point, lo, hi = diff.get("auc", (np.nan, np.nan, np.nan))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "–"
    if lo > 0:
        return "above baseline"
    if hi < 0:
        return "below baseline"
    return "overlaps baseline (interval includes 0)"


def comparison_sections(cfg: Config, board: pd.DataFrame, best_scores: dict[str, pd.DataFrame],
                        n_boot: int = N_BOOT) -> list[Section]:
    """One Section per view over the finished trials that kept test scores.

    Trials the scheduler stopped early (``stopped_early``) trained for fewer epochs than the row says,
    so they never enter a paired difference: a row with full-length trials averages those only (the
    ``stopped early`` column counts the ones left out); a row with none is shown from its stopped
    trials, marked, and not compared.
    """
    done = board[(board["status"] == "TERMINATED") & board["trial_id"].isin(list(best_scores))]
    if done.empty:
        return []
    done = done.sort_values("trial_id", kind="stable").set_index("trial_id", drop=False)  # creation order
    early_ids = set(done.index[stopped_early(done).to_numpy()])
    scores = {t: (held_out_rows(best_scores[t]), trial_threshold(best_scores[t])) for t in done.index}
    keys = row_keys(cfg, done)
    sections = []
    for view in dict.fromkeys(done["view"].astype(str)):
        mine = done[done["view"].astype(str) == view]
        groups: dict[tuple, list[str]] = {}
        for trial_id, values in zip(mine.index, mine[keys].astype(str).itertuples(index=False, name=None)):
            groups.setdefault(values, []).append(trial_id)
        labels = [dict(zip(keys, values)) for values in groups]
        base_i = _baseline_index(labels, cfg.report.baseline)
        trials = list(groups.values())
        full = [[t for t in members if t not in early_ids] for members in trials]  # what a paired difference uses
        fold_of, cache = fold_map(mine, mine.index), {}
        rows, diffs = [], []
        for i, (label, members) in enumerate(zip(labels, trials)):
            early = [t for t in members if t in early_ids]
            scored = full[i] or members  # a row of stopped trials only: shown, marked, not compared
            per_trial = [_metrics(scores[t][0]["label"], scores[t][0]["score"], scores[t][1]) for t in scored]
            row = {**label, **{k: _cell([m[k] for m in per_trial]) for k in PAPER_ORDER}}
            row["threshold"] = _cell([scores[t][1] for t in scored])  # each trial's validation Youden threshold
            row["n"] = int(round(np.mean([len(scores[t][0]) for t in scored])))
            row["trials"] = len(scored)
            row["seeds"] = int(mine.loc[scored, "seed"].nunique())
            row["folds"] = mine.loc[scored, "fold"].nunique() if "fold" in mine else 1
            row["stopped early"] = _early_mark(early, members, mine)
            row["baseline"] = "yes" if i == base_i else ""
            rows.append(row)
            if i == base_i:
                continue
            if not full[i] or not full[base_i]:
                which = "this row" if not full[i] else "the baseline"
                diffs.append({**label, **{f"Δ {k}": "–" for k in PAPER_ORDER},
                              "vs baseline": f"not compared: {which} only has trials stopped early"})
                continue
            d = paired_difference(full[i], full[base_i], mine, scores, n_boot=n_boot, seed=cfg.search.seed,
                                  fold_of=fold_of, cache=cache)
            diffs.append({**label, **{f"Δ {k}": f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for k, v in d.items()},
                          "vs baseline": verdict(d)})
        sections.append(Section(title=f"{view} view", rows=pd.DataFrame(rows), diffs=pd.DataFrame(diffs)))
    return sections


def section_markdown(section: Section, markdown_table) -> str:
    """A section as markdown: the rows, then the paired differences to the baseline."""
    lines = [
        f"### {section.title}",
        "",
        ("Test split, each trial at its best-on-validation epoch; accuracy, F1, specificity and sensitivity at "
         "each trial's threshold chosen on validation (Youden's J; the `threshold` column: its mean); "
         "mean ± std over the row's trials (seeds × folds); n = test images per trial. Trials stopped early "
         "by the scheduler (`stopped early`) are left out of a row that has full-length trials and out of every "
         "paired difference; a row with only stopped trials is shown, marked, and not compared."),
        "",
        markdown_table(section.rows),
        "",
    ]
    if not section.diffs.empty:
        lines += [
            ("Paired difference to the baseline row (row − baseline, test, each at its validation threshold), "
             "with a 95 % interval from a paired bootstrap over test patients; `vs baseline` reads the AUC "
             "interval (overlapping 0: the row cannot be told from the baseline on this test set):"),
            "",
            markdown_table(section.diffs),
            "",
        ]
    return "\n".join(lines)


def write_tensorboard_text(log_dir, sections: list[str]) -> None:
    """The report's sections in TensorBoard's Text tab (tag ``report/<i>``) of the experiment's top-level run."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for i, text in enumerate(sections):
            writer.add_text(f"report/{i:02d}", text, 0)
