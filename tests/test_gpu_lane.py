"""GPU lane outside the trial loop: the leaderboard's and report's GPU-hours, and bench/gpu.py.

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
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    pairs = dict(item.split("=") for item in last.split())
    assert list(pairs) == ["pipeline_efficiency", "amp_speedup_x", "packing_4_x", "paper_tables_gpu_hours"]
    assert all(float(v) > 0 for v in pairs.values())
    import torch

    assert ("CPU projection" in done.stdout) != torch.cuda.is_available()  # the CPU figure says what it is
    assert re.search(r"packing: 4 batch-4 trial\(s\)", done.stdout) and "vmap fusion probe" in done.stdout
    assert "(87 trials" in done.stdout


def _bench_gpu():
    """bench/gpu.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packed_workers_share_one_deadline_and_one_window():
    gpu = _bench_gpu()
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0])
    assert list(gpu.deadline_batches(range(10), end=3.0, now=lambda: next(clock))) == [0, 1, 2]
    # two workers from t=0: one did 100 images and finished at 10 s, the other 60 by 12 s (its queued steps):
    # 160 images in the 12 s both held the device, not the 10 + 5 img/s their own windows would add up to
    assert gpu.aggregate_rate([(100, 10.0), (60, 12.0)], start=0.0) == pytest.approx(160 / 12)


def test_paper_gpu_hours_come_from_the_plans_of_the_four_paper_configs():
    gpu = _bench_gpu()
    work = gpu.paper_plan_work()
    assert len(work) == 87  # what `fsweep plan` lists for configs/paper_table3..6.yaml (not the old 35)
    assert {t["backbone"] for t in work} == set(gpu.PAPER_BACKBONES)
    plain = [t for t in work if t["train"] and not t["finetune"]]
    flipped = [t for t in work if t["table"] == "paper_table5" and t["train"] > plain[0]["train"]]
    assert flipped and flipped[0]["train"] == 2 * plain[0]["train"]  # Flip: the other view mirrored joins in
    rates = {(b, f): 100.0 for b in gpu.PAPER_BACKBONES for f in (True, False)}
    rates.update({(b, "eval"): 300.0 for b in gpu.PAPER_BACKBONES})
    alone = gpu.projected_gpu_hours(work, rates, 1.0, {1: 1.0}, (4, 1))
    expected = sum(t["epochs"] * (t["train"] / 100 + t["val"] / 300) for t in work) / 3600
    assert alone == pytest.approx(expected)  # validation passes counted
    slower_vgg = {**rates, ("vgg16", False): 20.0, ("vgg19", False): 20.0}
    assert gpu.projected_gpu_hours(work, slower_vgg, 1.0, {1: 1.0}, (4, 1)) > alone  # per-backbone rates
    frozen_fast = {**rates, **{(b, False): 400.0 for b in gpu.PAPER_BACKBONES}}
    assert gpu.projected_gpu_hours(work, frozen_fast, 1.0, {1: 1.0}, (4, 1)) < alone  # frozen backbones
    # the packing the cluster files deploy: cpu 2 per trial on a 4-vCPU g5.xlarge packs 2, not the 4 of gpu 0.25
    assert gpu.trials_per_gpu(4, 1, 2, 0.25) == 2 and gpu.trials_per_gpu(8, 1, 2, 0.25) == 4
    packing = {1: 1.0, 2: 1.5, 4: 2.0}
    assert gpu.projected_gpu_hours(work, rates, 1.0, packing, (4, 1)) == pytest.approx(alone / 1.5)
    assert gpu.projected_gpu_hours(work, rates, 1.0, packing, (8, 1)) == pytest.approx(alone / 2.0)


def test_bench_gpu_refuses_its_cpu_branch_where_nvidia_smi_exists(monkeypatch):
    gpu = _bench_gpu()
    monkeypatch.setattr(gpu.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    with pytest.raises(SystemExit, match="sees no CUDA device.*pass --cpu"):
        gpu.check_device(False, allow_cpu=False)
    gpu.check_device(False, allow_cpu=True)  # an explicit --cpu
    gpu.check_device(True, allow_cpu=False)  # a GPU: nothing to refuse
