"""The demo's results table, regenerated from a demo's own output files (docs/results.md, "The demo's figures";
README's demo paragraph quotes it).

    python -m fsweep.demo_table DEMO_OUT      # the --out folder of `fsweep demo` (or `make demo`: demo_out)
    python -m fsweep.demo_table EXPERIMENT    # or any experiment folder (<storage>/<name>)

Reads only files the demo wrote: ``<experiment>/leaderboard.csv`` (validation AUC per trial: what selects),
``<experiment>/report.md`` (the comparison table: each trial's **test** AUC at its best-on-validation epoch),
``<experiment>/winners.json`` (the winner's test AUC and its patient-bootstrap interval) and, when present,
``DEMO_OUT/generalization.json`` (the exported winner on newly generated patients; `fsweep demo` writes it).
Prints a markdown table, then the winner's lines, then one ``name=value`` line (as the benchmarks do).
Nothing is trained or recomputed, so the figures in the docs are the figures of that run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from fsmodels.config import SPACE_KEYS

FIXED = ("trial_id", "status", "val_auc")
NOT_KEYS = {"seed", "fold"}  # repeated-run keys: never a row name


def find_experiment(path: Path) -> tuple[Path, Path | None]:
    """(experiment dir, demo out dir or None) for a demo --out folder or an experiment folder."""
    if (path / "leaderboard.csv").is_file():
        return path, path.parent.parent if (path.parent.parent / "generalization.json").is_file() else None
    runs = sorted((path / "runs").glob("*/leaderboard.csv")) if (path / "runs").is_dir() else []
    if not runs:
        raise SystemExit(f"{path}: no leaderboard.csv here or under runs/*/ (run `fsweep demo --out {path}` first)")
    return runs[0].parent, path


def searched_keys(board: pd.DataFrame, experiment: Path) -> list[str]:
    """The space keys that vary between the trials (the ablation's row names), in the leaderboard's order."""
    first_metric = list(board.columns).index("val_auc")
    # space keys only: a derived column such as flip_as varies too, but report.md's tables have no such column
    candidates = [c for c in board.columns[2:first_metric] if c in SPACE_KEYS and c not in NOT_KEYS]
    varying = [c for c in candidates if board[c].astype(str).nunique() > 1]
    return varying or candidates[:1]


def report_test_auc(report: Path, keys: list[str]) -> dict[tuple, str]:
    """Row name (values of ``keys``) -> the test AUC cell of report.md's comparison tables."""
    if not report.is_file():
        return {}
    rows: dict[tuple, str] = {}
    header: list[str] | None = None
    in_tables = False
    for line in report.read_text().splitlines():
        if line.startswith("## "):
            in_tables = line.startswith("## Comparison tables")
            header = None
            continue
        if not in_tables or not line.startswith("|"):
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set(cells[0]) <= set("-: ") or "auc" not in header or not all(k in header for k in keys):
            continue
        rows[tuple(cells[header.index(k)] for k in keys)] = cells[header.index("auc")]
    return rows


def table(path: Path) -> list[str]:
    experiment, out = find_experiment(path)
    board = pd.read_csv(experiment / "leaderboard.csv")
    keys = searched_keys(board, experiment)
    test = report_test_auc(experiment / "report.md", keys)
    lines = [f"Trials of {experiment} (validation AUC selects; test AUC from report.md, each trial at its "
             "best-on-validation epoch):", "",
             "| rank | " + " | ".join(keys) + " | val AUC | best epoch | epochs run | test AUC |",
             "|---" * (len(keys) + 5) + "|"]
    board = board.sort_values("val_auc", ascending=False, na_position="last").reset_index(drop=True)
    for rank, row in board.iterrows():
        name = tuple(str(row[k]) for k in keys)
        run = f"{row['epochs_run']}" + (" (stopped early)" if str(row.get("stopped_early")) == "True" else "")
        val = "n/a" if pd.isna(row["val_auc"]) else f"{row['val_auc']:.3f}"
        lines.append(f"| {rank + 1} | " + " | ".join(name) + f" | {val} | {row['best_epoch']} | {run} | "
                     f"{test.get(name, 'n/a')} |")
    winners = json.loads((experiment / "winners.json").read_text()) if (experiment / "winners.json").is_file() else {}
    lines.append("")
    for view, win in winners.items():
        chosen = ", ".join(f"{k}={win['config'][k]}" for k in keys if k in win.get("config", {}))
        auc, ci = win["test"]["auc"], win["test"].get("auc_ci") or [float("nan")] * 2
        lines.append(f"winner ({view} view): {chosen}: test AUC {auc:.3f} [95% CI {ci[0]:.3f}-{ci[1]:.3f}] "
                     f"({win['test'].get('tp', 0) + win['test'].get('fp', 0) + win['test'].get('tn', 0) + win['test'].get('fn', 0)} test images)")
    general = out / "generalization.json" if out is not None else None
    if general is not None and general.is_file():
        g = json.loads(general.read_text())
        lines.append(f"exported winner on {g['new_patients_images']} images of newly generated patients "
                     f"(phantom seed {g['new_patients_seed']}): AUC {g['new_patients_auc']:.3f}")
        lines.append(f"winner_new_patients_auc={g['new_patients_auc']:.3f}")
    else:
        lines.append("(no generalization.json: `fsweep demo` writes it; a hand-run sweep does not)")
        best = board["val_auc"].iloc[0]
        lines.append(f"winner_val_auc={best:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the demo's --out folder, or an experiment folder")
    args = parser.parse_args(argv)
    print("\n".join(table(args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
