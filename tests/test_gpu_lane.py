"""GPU lane (issue 14) outside the trial loop: the leaderboard's and report's GPU-hours, and bench/gpu.py.

The trial-loop parts (resident data, checkpoint_every, fp32 evaluation, determinism) are in test_train.py.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import search.select as select
from search.report import device_hours_lines

ROOT = Path(__file__).resolve().parents[1]


def test_leaderboard_rows_carry_device_seconds_device_and_rate(monkeypatch):
    last = {"epoch": 2, "best_epoch": 2, "node": "n1", "device": "cuda:H100", "device_seconds": 12.5,
            "img_per_s": 300.0}
    trial = SimpleNamespace(trial_id="t1", status="TERMINATED", last_result=last,
                            config={"view": "right", "backbone": "resnet50"})
    result = SimpleNamespace(metrics_dataframe=pd.DataFrame([{**last, "val_auc": 0.8}]), error=None, checkpoint=None)
    old = SimpleNamespace(trial_id="t0", status="TERMINATED", last_result={"epoch": 1, "best_epoch": 1},
                          config={"view": "left"})
    old_result = SimpleNamespace(metrics_dataframe=pd.DataFrame([{"epoch": 1, "val_auc": 0.7}]), error=None,
                                 checkpoint=None)
    monkeypatch.setattr(select, "ExperimentAnalysis", lambda *a, **k: SimpleNamespace(trials=[trial, old]))
    monkeypatch.setattr(select, "ResultGrid", lambda analysis: [result, old_result])
    rows = select.trial_rows("exp", "val_auc", "max")
    assert {k: rows[0][k] for k in ("device", "device_seconds", "img_per_s")} == {
        "device": "cuda:H100", "device_seconds": 12.5, "img_per_s": 300.0}
    assert rows[1]["device"] == "" and pd.isna(rows[1]["device_seconds"])  # an older trial: not recorded


def test_report_totals_device_hours_per_device_and_view():
    board = pd.DataFrame({"view": ["left", "right", "right", "left"], "device": ["cuda:H100"] * 3 + [None],
                          "device_seconds": [1800.0, 900.0, 900.0, float("nan")], "img_per_s": [100.0] * 4})
    text = "\n".join(device_hours_lines(board))
    assert "Total: **1.000 device-hours** over 3 trials" in text
    assert "| cuda:H100 | left | 1 | 0.500 |" in text and "| cuda:H100 | right | 2 | 0.500 |" in text
    assert "Not recorded" in "\n".join(device_hours_lines(board.drop(columns=["device_seconds"])))


@pytest.mark.slow  # five processes (the bench and four packed 'trials'), ~40 s on 2 idle cores
def test_bench_gpu_quick_prints_the_four_figures_last():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    pairs = dict(item.split("=") for item in last.split())
    assert list(pairs) == ["pipeline_efficiency", "amp_speedup_x", "packing_4_x", "paper_tables_gpu_hours"]
    assert all(float(v) > 0 for v in pairs.values())
    assert "CPU projection" in done.stdout and re.search(r"packing: 4 batch-4 trial\(s\)", done.stdout)
