"""``fsweep report EXPERIMENT``: report.md with the winners, the comparison tables, the leaderboard and plots.

Winners are selected on validation only and then scored on test (patient-level bootstrap
95 % intervals, threshold from validation). The comparison tables (``search.tables``) score
every row on test at its trials' best-on-validation epochs, say so, and pair each row with
its baseline; the same tables go to TensorBoard's Text tab. The leaderboard shows validation.
"""
from __future__ import annotations

import io
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.storage import exists, is_uri, join, resolve_storage
from fsmodels.metrics import FIT_METRICS, SELECTABLE_METRICS
from preprocessing.vocab import LABEL_NAMES
from search.expdir import SWEEP_CONFIG, get_text, load_sweep_config, upload_dir
from search.select import LEADERBOARD, WINNERS, finish_experiment, winner_warnings
from search.space import searched_keys
from search.tables import (
    PAPER_ORDER,
    comparison_sections,
    read_best_scores,
    row_keys,
    section_markdown,
    stopped_early,
    write_tensorboard_text,
)

REPORT = "report.md"
# the leaderboard's threshold-dependent columns, named with their threshold (each trial's validation Youden threshold)
LEADERBOARD_HEADERS = {f"val_{m}": f"val_{m}@youden" for m in ("accuracy", "f1", "sensitivity", "specificity")}


def scheduler_warnings(cfg, board: pd.DataFrame) -> list[str]:
    """Warnings for a comparison sweep (report rows or an ablation) run under an early-stopping scheduler.

    ASHA stops trials by comparing them at rungs, so which ones train to the end depends on the
    order trials finish in; a row stopped at epoch 2 is not an ablation result.
    """
    done = board[board["status"] == "TERMINATED"] if "status" in board else board
    if cfg.search.scheduler != "asha" or not (cfg.report.rows or (not done.empty and row_keys(cfg, done))):
        return []
    early = int(stopped_early(board).sum())
    return [f"search.scheduler is asha (an early-stopping scheduler) in a comparison sweep: {early} trial(s) "
            "stopped early; which trials ASHA stops depends on the order trials finish in, so the comparison "
            "rows are not equal trainings and may change between runs. Stopped trials are kept out of the paired "
            "differences; for an ablation or backbone table use search.scheduler: fifo."]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (floats to 3 decimals)."""
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _winner_lines(winners: dict, metric: str) -> list[str]:
    lines = []
    for view, win in winners.items():
        test = win.get("test", {})
        cells = []
        for m in PAPER_ORDER:
            ci = test.get(f"{m}_ci")
            interval = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
            cells.append(f"{m} {_fmt(test.get(m))}{interval}")
        config = ", ".join(f"{k}={v}" for k, v in win["config"].items())
        lines += [
            f"### {view} view: trial `{win['trial_id']}` (epoch {win['best_epoch']})",
            f"- selected by {win['selected_by']}: {metric} = {_fmt(win['val'].get(metric))}; validation AUC "
            f"{_fmt(win['val'].get('val_auc'))} [{_fmt(win['val'].get('val_auc_lo'))}, "
            f"{_fmt(win['val'].get('val_auc_hi'))}] (patient bootstrap), training AUC "
            f"{_fmt(win.get('train', {}).get('auc'))}",
            f"- config: {config}" + (f" (Flip ran as {win['flip_as']})" if win.get("flip_as") else ""),
            f"- **test** (scored once, after selection, at the validation threshold {_fmt(test.get('threshold'))}; "
            "95 % intervals from a bootstrap over patients): " + "; ".join(cells),
            f"- ![ROC]({view}_roc.png) ![confusion]({view}_confusion.png)",
            "",
        ]
    return lines


def roc_figure_png(y: np.ndarray, scores: np.ndarray, title: str) -> bytes:
    """A ROC curve plot as PNG bytes (the report's plots; TensorBoard's ``roc/val`` image draws the same)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fsmodels.metrics import auc_score, roc_curve_points

    fpr, tpr, _ = roc_curve_points(y, scores)
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc_score(y, scores):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def plot_roc(y: np.ndarray, scores: np.ndarray, title: str, path: Path) -> None:
    """Write the ROC curve of (y, scores) as a PNG."""
    path.write_bytes(roc_figure_png(y, scores, title))


def plot_confusion(test: dict, title: str, path: Path, classes: tuple[str, str] = LABEL_NAMES) -> None:
    """Write a 2x2 confusion matrix (rows truth, columns prediction; ``classes`` negative, positive) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = np.array([[test.get("tn", 0), test.get("fp", 0)], [test.get("fn", 0), test.get("tp", 0)]])
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    ax.imshow(cells, cmap="Blues")
    for (i, j), count in np.ndenumerate(cells):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=12)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def write_plots(experiment: Path, winners: dict) -> None:
    """ROC and confusion-matrix PNGs of each winner on the test split."""
    for view, win in winners.items():
        scores = pd.read_csv(experiment / f"winner_{view}_test_scores.csv")
        plot_roc(scores["label"].to_numpy(), scores["score"].to_numpy(), f"{view} view, test", experiment / f"{view}_roc.png")
        plot_confusion(win["test"], f"{view} view, test", experiment / f"{view}_confusion.png",
                       tuple(win.get("classes") or LABEL_NAMES))


def _working_copy(experiment: str) -> Path:
    """A local directory with the experiment's fsweep files (the experiment itself when it is a path)."""
    if not is_uri(experiment):
        return Path(experiment)
    work = Path(tempfile.mkdtemp(prefix="fsweep-report-"))
    names = [SWEEP_CONFIG, LEADERBOARD, WINNERS]
    winners = json.loads(get_text(join(experiment, WINNERS)))
    names += [f"winner_{view}_test_scores.csv" for view in winners]
    for name in names:
        (work / name).write_text(get_text(join(experiment, name)))
    return work


def write_report(experiment: str | Path) -> Path | str:
    """Write EXPERIMENT/report.md and its PNGs (leaderboard and winners first if missing); returns its location."""
    experiment = resolve_storage(experiment)
    cfg = load_sweep_config(experiment)
    if not exists(join(experiment, LEADERBOARD)) or not exists(join(experiment, WINNERS)):
        finish_experiment(experiment, cfg)
    work = _working_copy(experiment)
    board = pd.read_csv(work / LEADERBOARD)
    board["best_epoch"] = board["best_epoch"].astype("Int64")
    winners = json.loads((work / WINNERS).read_text())
    write_plots(work, winners)
    finished = board[board["status"] == "TERMINATED"]  # the only trials the tables score
    best_scores = read_best_scores(experiment, finished)
    sections = [section_markdown(s, markdown_table) for s in comparison_sections(cfg, board, best_scores)]
    write_tensorboard_text(work, sections)
    for line in scheduler_warnings(cfg, board):
        print(f"warning: {line}", file=sys.stderr)
    (work / REPORT).write_text(report_text(Path(experiment).name, cfg, board, winners, sections,
                                           test_scored=sorted(best_scores)))
    upload_dir(work, experiment)
    return join(experiment, REPORT) if is_uri(experiment) else Path(experiment) / REPORT


def split_scoring_line(winners: dict, test_scored: list[str]) -> str:
    """The header's word on the test split: which trials were scored on it, and that selection never read it."""
    won = ", ".join(f"`{win['trial_id']}` ({view})" for view, win in winners.items()) or "none"
    if not test_scored:
        return (f"**Test split:** scored only for the winners ({won}), once, after selection; no other trial was "
                "scored on test (`train.test_every_trial` is off), so there are no comparison tables.")
    return (f"**Test split:** the winners ({won}) and the {len(test_scored)} trial(s) of the comparison tables "
            f"(`train.test_every_trial`: {', '.join(f'`{t}`' for t in test_scored)}) were scored on test; selection "
            "never read those scores: it ranks validation only.")


def report_text(name: str, cfg, board: pd.DataFrame, winners: dict, sections: list[str] = (),
                test_scored: list[str] = ()) -> str:
    """The markdown of report.md; ``test_scored``: the trials whose test scores the comparison tables read."""
    metric, mode = cfg.search.metric, cfg.search.mode
    status = board["status"].value_counts().to_dict()
    early = stopped_early(board)
    if early.any() and "TERMINATED" in status:  # "4 terminated" alone reads as four full trainings
        done = status.pop("TERMINATED")
        status = {f"TERMINATED, {int(early.sum())} of them stopped early by the scheduler": done, **status}
    board = board.assign(**{"stopped early": early.map({True: "yes", False: ""})})
    shown = ["trial_id", "status", *searched_keys(cfg), *[c for c in SELECTABLE_METRICS if c != "val_loss"],
             *[c for c in FIT_METRICS if c in board], "best_epoch", "node"]
    shown[shown.index("best_epoch") + 1:shown.index("best_epoch") + 1] = \
        [c for c in ("epochs_run", "stopped early") if c in board]
    leader = board[shown].rename(columns=LEADERBOARD_HEADERS)
    lines = [
        f"# Sweep report: {name}",
        "",
        *[text for line in scheduler_warnings(cfg, board) + winner_warnings(winners)
          for text in (f"> **Warning:** {line}", "")],
        f"{len(board)} trials ({', '.join(f'{n} {s.lower()}' for s, n in status.items())}); "
        f"selection by **{metric}** ({mode}) on the validation split"
        f"{' (a configuration by its mean over seeds and folds)' if cfg.search.select_by == 'config' else ''}. "
        "The comparison tables are scored on the TEST split, each trial at its best-on-validation epoch with "
        "its validation threshold (Youden's J); the leaderboard shows validation metrics.",
        "",
        split_scoring_line(winners, list(test_scored)),
        "",
        "## Winners (test split)",
        "",
        *_winner_lines(winners, metric),
        "## Comparison tables (test split, rows at their best-on-validation epoch)",
        "",
        *(sections or ["No trial kept test scores (train.test_every_trial off, or none finished)."]),
        "",
        *device_hours_lines(board),
        "## Leaderboard",
        "",
        "Validation split, each trial at its best epoch by validation "
        f"{metric}; accuracy, F1, sensitivity and specificity at each trial's best-epoch validation Youden "
        "threshold (`@youden`, column `val_rates_threshold` of leaderboard.csv): the operating point selection, "
        "the tables and winners above and the exported model use. `epochs_run`: epochs the trial "
        "trained; `stopped early`: ended by the scheduler before its configured epochs. `train_auc`: the best "
        "epoch's AUC on the training images it trained on (scored in the training pass); `val_auc_lo`/`val_auc_hi`: "
        "the 95 % interval of val_auc from a bootstrap over validation patients.",
        "",
        markdown_table(leader),
        "",
    ]
    failed = board[board["status"] == "ERROR"]
    if not failed.empty:
        lines += ["## Failed trials", "", markdown_table(failed[["trial_id", "error"]]), ""]
    return "\n".join(lines)


def device_hours_lines(board: pd.DataFrame) -> list[str]:
    """The report's GPU-hours section: device-hours of the sweep (one paper table per sweep) per device and view.

    A trial's ``device_seconds`` is its wall time x its device share (``resources.gpu`` on a GPU), summed over
    its attempts, so the totals are what the sweep cost, fractional trials counted by their share.
    """
    lines = ["## GPU-hours (device-hours this sweep cost)", ""]
    if "device_seconds" not in board or board["device_seconds"].isna().all():
        return lines + ["Not recorded (the trials predate GPU-hours accounting).", ""]
    ran = board[board["device_seconds"].notna()].assign(device=lambda b: b["device"].fillna("?").astype(str))
    groups = ran.groupby(["device", ran["view"].astype(str)])["device_seconds"].agg(["sum", "size"])
    total = ran["device_seconds"].sum() / 3600
    rows = pd.DataFrame({"device": [d for d, _ in groups.index], "view": [v for _, v in groups.index],
                         "trials": groups["size"].to_numpy(), "device_hours": (groups["sum"] / 3600).to_numpy()})
    rate = ran["img_per_s"].median() if "img_per_s" in ran else float("nan")
    return lines + [f"Total: **{total:.3f} device-hours** over {len(ran)} trials "
                    f"(median training rate {_fmt(float(rate), 1)} img/s per trial).", "",
                    markdown_table(rows), ""]
