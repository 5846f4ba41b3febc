"""The quiet sweep: the progress view (pure formatter, live Tune callback, `fsweep status`) and kept checkpoints.

Formatter and file-reading tests use synthetic states (no Ray); the sweep tests run the
tiny conftest sweep (32 px, test_resnet) on a private 2-CPU Ray or as a `fsweep sweep` subprocess.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_sweep_config

from cluster.errors import FsweepError
from fsmodels.checkpoint import (
    BEST_FILE,
    RESUME_KEYS,
    STATE_FILE,
    load_resumable_state,
    load_state,
    thin_checkpoint,
)
from fsmodels.config import load_config
from fsweep.cli import main
from preprocessing.vocab import ConfigError
from search.keep import CheckpointThinner, keep_checkpoints
from search.progress import (
    PROGRESS_FILE,
    ProgressView,
    TrialSnapshot,
    expected_epochs,
    format_block,
    format_duration,
    format_line,
    read_progress,
    summarize,
)
from search.select import LEADERBOARD, WINNERS
from search.expdir import SWEEP_CONFIG
from search.sweep import absolute_paths, run_sweep

ROOT = Path(__file__).resolve().parent.parent
QUIET_SWEEP_MAX_LINES = 25  # what a quiet 4-trial sweep may print (Ray's tables alone were ~220 lines)


def trial(trial_id, status, run=0, planned=4, best=None, lr=0.01, seconds=0.0, diverged=False) -> TrialSnapshot:
    return TrialSnapshot(trial_id=trial_id, status=status, config={"lr": lr, "epochs": planned, "he": "global"},
                         epochs_run=run, epochs_planned=planned, best=best, best_epoch=run or None,
                         seconds=seconds, diverged=diverged)


def progress(trials, total=None, mode="max"):
    return summarize(trials, name="s", metric="val_auc", mode=mode, keys=["lr", "he"], total=total, elapsed_s=75.0)


# --- the pure formatter --------------------------------------------------------------------

def test_summarize_counts_each_state_and_trials_not_created_yet():
    trials = [
        trial("a", "TERMINATED", run=4, best=0.8, seconds=8.0),  # done
        trial("b", "TERMINATED", run=1, best=0.6, seconds=2.0),  # stopped early by ASHA
        trial("c", "ERROR", run=0),
        trial("d", "TERMINATED", run=2, best=None, diverged=True, seconds=4.0),  # diverged counts as failed
        trial("e", "RUNNING", run=2, best=0.9, seconds=4.0),
        trial("f", "PENDING"),
        trial("g", "PAUSED", run=1, best=0.5, seconds=2.0),
    ]
    p = progress(trials, total=9)
    assert (p.done, p.stopped, p.failed, p.running, p.pending, p.total) == (1, 1, 2, 1, 4, 9)
    assert not p.finished and p.best.trial_id == "e"
    # 20 s over 10 epochs = 2 s/epoch; left: e 2 + f 4 + g 3 + two uncreated x mean planned 4 = 17 epochs, 1 running
    assert p.remaining_s == pytest.approx(17 * 2.0)
    two = summarize(trials, name="s", metric="val_auc", mode="max", keys=[], total=9, elapsed_s=0, slots=2)
    assert two.remaining_s == pytest.approx(17.0)  # search.max_concurrent trials at a time


def test_best_follows_the_mode_and_ignores_trials_without_a_finite_metric():
    trials = [trial("a", "TERMINATED", run=4, best=0.3), trial("b", "TERMINATED", run=4, best=0.7),
              trial("c", "RUNNING", run=1, best=None)]
    assert progress(trials).best.trial_id == "b"
    assert progress(trials, mode="min").best.trial_id == "a"
    assert progress([trial("a", "RUNNING")]).best is None
    assert progress([trial("a", "RUNNING")]).remaining_s is None  # no epoch timed yet


def test_block_and_line_show_counts_best_config_and_clock():
    p = progress([trial("a", "TERMINATED", run=4, best=0.81234, lr=0.003, seconds=8.0),
                  trial("b", "RUNNING", run=1, best=0.5, seconds=2.0)], total=3)
    block = format_block(p)
    assert len(block) == 3
    assert block[0] == "sweep s: 1/3 trials ended (1 done, 0 stopped early, 0 failed), 1 running, 1 pending"
    assert block[1] == "  best val_auc 0.812 (trial a, epoch 4): lr=0.003 he=global"
    assert block[2].startswith("  elapsed 1m15s, about ") and block[2].endswith(" left")
    line = format_line(p)
    assert "\n" not in line and line.startswith("[1m15s] 1/3 trials ended") and "lr=0.003" in line


def test_a_finished_sweep_says_so_and_no_best_yet_is_plain():
    p = progress([trial("a", "TERMINATED", run=4, best=0.7, seconds=4.0)], total=1)
    assert p.finished and p.remaining_s == 0.0 and format_block(p)[2] == "  elapsed 1m15s, finished"
    assert "best val_auc: none yet" in format_line(progress([trial("a", "PENDING")], total=2))


def test_asha_shortens_the_expected_epochs_left():
    assert expected_epochs(0, 4, None) == 4 and expected_epochs(3, 4, None) == 1
    # rungs at 1 and 2, half go on past each: 1 + 1/2 + 2/4 epochs for a new trial
    assert expected_epochs(0, 4, (1, 2)) == pytest.approx(2.0)
    assert expected_epochs(2, 4, (1, 2)) == pytest.approx(2.0)  # past the last rung: every epoch left
    trials = [trial("a", "TERMINATED", run=1, planned=4, seconds=2.0), trial("b", "PENDING", planned=4)]
    fifo, asha = progress(trials), summarize(trials, name="s", metric="val_auc", mode="max", keys=[], total=2,
                                             elapsed_s=0, asha=(1, 2))
    assert fifo.remaining_s == pytest.approx(8.0) and asha.remaining_s == pytest.approx(4.0)


def test_format_duration():
    assert [format_duration(s) for s in (None, 0, 59.4, 61, 3599, 3725)] == ["?", "0s", "59s", "1m01s", "59m59s", "1h02m"]


# --- the live view (a Tune callback fed fake trials) ---------------------------------------

def fake_trial(trial_id, status, epoch=0, best=None):
    result = {"epoch": epoch, "best_val_auc": best, "time_total_s": epoch * 1.0} if epoch else {}
    return SimpleNamespace(trial_id=trial_id, status=status, config={"lr": 0.01, "epochs": 2}, last_result=result)


def test_view_off_a_terminal_prints_one_line_per_change_throttled(tmp_path):
    out = io.StringIO()
    view = ProgressView(str(tmp_path), name="s", metric="val_auc", mode="max", keys=["lr"], stream=out, tty=False,
                        line_interval_s=3600)
    view.setup(total_num_samples=2)
    assert json.loads((tmp_path / PROGRESS_FILE).read_text())["total_trials"] == 2
    a, b = fake_trial("a", "RUNNING"), fake_trial("b", "PENDING")
    view.on_step_end(0, [a, b])
    view.on_trial_start(0, [a, b], a)
    view.on_trial_result(0, [a, b], fake_trial("a", "RUNNING", 1, 0.6), {})  # a change, but within the interval
    view.on_step_end(1, [a, b])  # no change
    assert len(out.getvalue().splitlines()) == 1
    done = [fake_trial("a", "TERMINATED", 2, 0.7), fake_trial("b", "TERMINATED", 1, 0.5)]
    view.on_experiment_end(done)  # the final state always prints
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "2/2 trials ended (1 done, 1 stopped early, 0 failed)" in lines[-1]
    assert "finished" in lines[-1] and "best val_auc 0.700 (trial a)" in lines[-1]


def test_view_on_a_terminal_redraws_one_block(tmp_path):
    out = io.StringIO()
    view = ProgressView(str(tmp_path), name="s", metric="val_auc", mode="max", keys=["lr"], stream=out, tty=True)
    view.setup(total_num_samples=1)
    view.on_trial_start(0, [], fake_trial("a", "RUNNING"))
    view.on_experiment_end([fake_trial("a", "TERMINATED", 2, 0.9)])
    text = out.getvalue()
    assert text.count("sweep s:") == 2 and text.count("\x1b[3F\x1b[J") == 1  # the second block overwrote the first


def test_view_pickles_without_its_stream(tmp_path):
    import pickle

    view = ProgressView(str(tmp_path), name="s", metric="val_auc", mode="max", keys=[], stream=io.StringIO())
    assert pickle.loads(pickle.dumps(view)).stream is sys.stdout  # Tune pickles callbacks into tuner.pkl


# --- `fsweep status` from the files of a sweep --------------------------------------------

def write_trial(experiment: Path, trial_id: str, results: list[dict], error: bool = False) -> None:
    """A trial directory as Ray Tune writes it: params.json, one result.json line per report, error.txt if it raised."""
    folder = experiment / f"trial_{trial_id}"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"lr": 0.01, "epochs": 3}))
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    if error:
        (folder / "error.txt").write_text("Failure # 1 (occurred at ...)\nValueError: boom\n")


def test_status_reads_a_running_sweep_from_its_files(tmp_path, capsys):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / SWEEP_CONFIG).write_text(yaml.safe_dump({"space": {"lr": [0.01, 0.1]}}))
    (experiment / PROGRESS_FILE).write_text(json.dumps({"total_trials": 4}))
    write_trial(experiment, "t0", [{"epoch": e, "best_val_auc": 0.7, "time_total_s": 9.0 * e} for e in (1, 2, 3)])
    write_trial(experiment, "t1", [{"epoch": 1, "best_val_auc": 0.6}, {"epoch": 2, "best_val_auc": 0.9,
                                                                       "time_total_s": 3.0}])
    write_trial(experiment, "t2", [])  # started: its directory exists, no result yet
    cfg = load_config(experiment / SWEEP_CONFIG)
    p = read_progress(experiment, cfg, now=time.time())
    assert (p.done, p.running, p.pending, p.total) == (1, 2, 1, 4)
    assert p.best.trial_id == "t1" and p.best.best == 0.9 and p.keys == ["lr"]
    assert p.age_s is not None and p.elapsed_s >= 30.0 and not p.finished
    assert "(state saved" in format_block(p)[2]
    assert main(["status", str(experiment)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sweep exp: 1/4 trials ended (1 done, 0 stopped early, 0 failed), 2 running, 1 pending"
    assert out[1] == "  best val_auc 0.900 (trial t1): lr=0.01"


def test_status_tells_stopped_failed_and_diverged_trials_from_their_files(tmp_path):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / SWEEP_CONFIG).write_text(yaml.safe_dump({"space": {"lr": [0.01, 0.1]}}))
    write_trial(experiment, "done", [{"epoch": 3, "best_val_auc": 0.8, "time_total_s": 6.0}])
    write_trial(experiment, "asha", [{"epoch": 1, "best_val_auc": 0.5, "time_total_s": 2.0, "done": True}])
    write_trial(experiment, "nan", [{"epoch": 1, "time_total_s": 2.0, "diverged": True}])
    write_trial(experiment, "raised", [{"epoch": 1, "best_val_auc": 0.9, "time_total_s": 2.0}], error=True)
    p = read_progress(experiment, load_config(experiment / SWEEP_CONFIG), now=time.time())
    assert (p.done, p.stopped, p.failed, p.running, p.pending) == (1, 1, 2, 0, 0)
    assert p.finished and p.elapsed_s == 12.0 and p.age_s is None  # the trials' training time, summed
    assert p.best.trial_id == "raised"  # its best epoch was scored before it raised


def test_quiet_run_config_has_the_view_and_verbose_brings_ray_tables_back(tmp_path):
    from search.sweep import run_config

    cfg = tiny_sweep_config(tmp_path, tmp_path, lr=[0.01, 0.1])
    quiet, loud = run_config(cfg, str(tmp_path), "x"), run_config(cfg, str(tmp_path), "x", verbose=True)
    assert quiet.verbose == 0 and sum(isinstance(cb, ProgressView) for cb in quiet.callbacks) == 1
    assert loud.verbose == 1 and not any(isinstance(cb, ProgressView) for cb in loud.callbacks)
    assert quiet.log_to_file and loud.log_to_file  # trial output always goes to the trial's files


def test_status_of_something_else_is_a_one_line_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not an fsweep experiment" in capsys.readouterr().err


# --- real sweeps -----------------------------------------------------------------------------

def quiet_config(tiny_dataset: Path, store: Path, path: Path, **space_values) -> Path:
    cfg = tiny_sweep_config(tiny_dataset, store, **space_values)
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 1
    path.write_text(yaml.safe_dump(absolute_paths(cfg).to_dict()))
    return path


@pytest.mark.slow  # a real 4-trial sweep in a subprocess (~60-90 s on 2 cores)
def test_a_quiet_sweep_prints_a_few_lines_and_status_works_while_it_runs_and_after(tiny_dataset, tmp_path, capsys):
    config = quiet_config(tiny_dataset, tmp_path / "store", tmp_path / "sweep.yaml", lr=[0.01, 0.03],
                          he=["off", "global"], epochs=12)
    experiment = tmp_path / "runs" / "quiet"
    driver = subprocess.Popen(
        [sys.executable, "-m", "fsweep.cli", "sweep", str(config), "--name", "quiet", "--storage",
         str(tmp_path / "runs")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None and not any(
                p.stat().st_size for p in experiment.glob("trial_*/result.json")):
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep ended before status could see it run"
        assert main(["status", str(experiment)]) == 0
        running = capsys.readouterr().out
        assert running.startswith("sweep quiet: ") and "/4 trials ended" in running and "finished" not in running
        output, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, output
    lines = output.split("\n")  # newlines only: a progress bar's carriage returns redraw one line
    assert len(lines) < QUIET_SWEEP_MAX_LINES, output
    assert not any("Trial status" in line or "(train_trial" in line for line in lines), output  # no Tune tables
    assert any("4/4 trials ended" in line and "finished" in line for line in lines), output
    assert main(["status", str(experiment)]) == 0
    done = capsys.readouterr().out.splitlines()
    assert done[0] == "sweep quiet: 4/4 trials ended (4 done, 0 stopped early, 0 failed), 0 running, 0 pending"
    assert done[2].endswith("finished")
    assert (experiment / "logs" / "driver.log").is_file()
    for trial_dir in experiment.glob("trial_*"):  # the full trial output went to files
        assert "epoch 12/12" in (trial_dir / "stdout").read_text()
    # a glance stays quick: `fsweep status` reads files and imports neither torch nor its writers
    glance = subprocess.run([sys.executable, "-c", "import sys; from fsweep.cli import main; main(sys.argv[1:]); "
                             "print(sorted(m for m in ('torch', 'ultralytics', 'timm') if m in sys.modules))",
                             "status", str(experiment)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert glance.returncode == 0 and glance.stdout.splitlines()[0] == done[0], glance.stderr[-2000:]
    assert glance.stdout.splitlines()[-1] == "[]", glance.stdout


def checkpoints(experiment: Path) -> dict[str, Path]:
    board = pd.read_csv(experiment / LEADERBOARD)
    return dict(zip(board["trial_id"], map(Path, board["checkpoint"])))


@pytest.mark.slow  # a real 3-trial sweep, then export
def test_only_the_winner_keeps_a_resumable_checkpoint_and_export_still_works(local_ray, tiny_dataset, tmp_path):
    cfg = tiny_sweep_config(tiny_dataset, tmp_path / "store", lr=[0.003, 0.01, 0.03], epochs=2)
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 2
    assert cfg.search.keep_checkpoints == "winners"  # the default
    experiment = Path(run_sweep(cfg, name="keep", storage=str(tmp_path / "runs")))
    winner = json.loads((experiment / WINNERS).read_text())["right"]["trial_id"]
    kept = checkpoints(experiment)
    assert len(kept) == 3
    for trial_id, folder in kept.items():
        state = load_state(folder)
        assert (folder / BEST_FILE).is_file() and "history" in state and "config" in state
        assert all(key in state for key in RESUME_KEYS) == (trial_id == winner)
    loser = next(f for t, f in kept.items() if t != winner)
    with pytest.raises(FsweepError, match="cannot resume"):
        load_resumable_state(loser)

    from fsweep.export import export_experiment

    model = export_experiment(experiment, tmp_path / "model")
    assert (model / "right" / "model.onnx").is_file()

    copy = tmp_path / "none"  # `none` on the same experiment: the winner keeps best weights only, others nothing
    shutil.copytree(experiment, copy)
    board = pd.read_csv(copy / LEADERBOARD)
    board["checkpoint"] = [str(copy / Path(p).parent.name / Path(p).name) for p in board["checkpoint"]]
    keep_checkpoints(board, {winner}, "none")
    for trial_id, location in zip(board["trial_id"], board["checkpoint"]):
        state = load_state(location)
        assert not any(key in state for key in RESUME_KEYS)
        assert (Path(location) / BEST_FILE).is_file() == (trial_id == winner)


# --- thinning one checkpoint and the config key (no Ray) ----------------------------------

def full_checkpoint(folder: Path) -> Path:
    """A checkpoint directory as run_trial writes it: resumable state.pt and best.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 2, "history": [{"epoch": 1}], "config": {"space": {}}, "variant": "v", "pos_weight": 1.0,
             "best_epoch": 1, **{key: {"w": torch.zeros(1000)} for key in RESUME_KEYS}}
    torch.save(state, folder / STATE_FILE)
    torch.save({"w": torch.ones(3)}, folder / BEST_FILE)
    return folder


def test_thinner_thins_each_ended_trial_that_can_no_longer_win(tmp_path):
    def ended(trial_id, best, view="right", diverged=False):
        folder = full_checkpoint(tmp_path / trial_id)
        return SimpleNamespace(trial_id=trial_id, config={"view": view}, checkpoint=SimpleNamespace(path=str(folder)),
                               last_result={"best_val_auc": best, "diverged": diverged})

    def resumable(trial_id):
        return all(key in load_state(tmp_path / trial_id) for key in RESUME_KEYS)

    thinner = CheckpointThinner(str(tmp_path), "val_auc", "max", "winners")
    for trial in (ended("a", 0.7), ended("b", 0.9), ended("c", 0.8), ended("d", 0.5, view="left"),
                  ended("e", 0.99, diverged=True), ended("f", float("nan"))):
        thinner.on_trial_complete(0, [], trial)
    thinner.on_trial_error(0, [], ended("g", None))
    assert {t: resumable(t) for t in "abcdefg"} == {"a": False, "b": True, "c": False, "d": True, "e": False,
                                                    "f": False, "g": False}
    assert all((tmp_path / t / BEST_FILE).is_file() for t in "abcdefg")  # winners policy: best weights stay
    none = CheckpointThinner(str(tmp_path), "val_auc", "max", "none")
    for trial in (ended("h", 0.7), ended("i", 0.6)):
        none.on_trial_complete(0, [], trial)
    assert not resumable("h") and (tmp_path / "h" / BEST_FILE).is_file()  # none: the best so far keeps best weights
    assert not (tmp_path / "i" / BEST_FILE).exists()


def test_thin_checkpoint_keeps_history_and_config_and_drops_resume_state(tmp_path):
    full_checkpoint(tmp_path)
    assert load_resumable_state(tmp_path)["epoch"] == 2
    big = (tmp_path / STATE_FILE).stat().st_size
    thin_checkpoint(tmp_path, keep_best=True)
    thinned = load_state(tmp_path)
    assert set(thinned) == {"epoch", "history", "config", "variant", "pos_weight", "best_epoch"}
    assert (tmp_path / STATE_FILE).stat().st_size < big / 4 and (tmp_path / BEST_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    thin_checkpoint(tmp_path, keep_best=False)
    assert not (tmp_path / BEST_FILE).exists() and load_state(tmp_path)["history"] == [{"epoch": 1}]


def test_keep_checkpoints_key_takes_three_values_and_off_means_none():
    assert load_config(None, []).search.keep_checkpoints == "winners"
    assert load_config(None, ["search.keep_checkpoints=ALL"]).search.keep_checkpoints == "all"
    assert load_config(None, ["search.keep_checkpoints=off"]).search.keep_checkpoints == "none"
    with pytest.raises(ConfigError, match="search.keep_checkpoints"):
        load_config(None, ["search.keep_checkpoints=latest"])
