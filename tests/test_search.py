"""search: config -> Ray Tune, real sweeps on the tiny phantom, TensorBoard, selection, resume, report.

Sweeps run on a private 2-CPU Ray at 32 px with timm's tiny ``test_resnet`` for 2-4 epochs.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from fsmodels.config import Config
from preprocessing.vocab import ConfigError
from search import space
from search.report import _winner_lines
from search.select import LEADERBOARD, WINNERS, leaderboard, pick_winners
from search.sweep import SCRATCH_ROOT, absolute_paths, prepare_store, resume_sweep, run_sweep, scratch_root
from fsmodels.metrics import SELECTABLE_METRICS

from conftest import tiny_sweep_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(dataset: Path, store: Path, **space_values) -> Config:
    """conftest's tiny sweep with no retries (a failing trial fails at once) and 2 trials at a time."""
    cfg = tiny_sweep_config(dataset, store, **space_values)
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 2
    return cfg


def store_snapshot(store: Path) -> dict:
    """Every store file with its size and mtime (lock files excluded: taking a lock is not writing)."""
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(store.rglob("*")) if p.is_file() and not p.name.endswith(".lock")
    }


def trial_dirs(experiment: Path) -> dict[str, Path]:
    """trial id -> trial directory."""
    from search.names import dirname_trial_id

    return {dirname_trial_id(p.name): p for p in experiment.glob("trial_*") if p.is_dir()}


def hparams_records(run_dir: Path) -> dict:
    """The HParams plugin's records of one TensorBoard run, read with TensorBoard's own reader."""
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return {"acc": acc, "content": acc.PluginTagToContent(metadata.PLUGIN_NAME)}


@pytest.fixture(scope="module")
def grid_sweep(local_ray, tiny_dataset, tmp_path_factory):
    """A 2 x 2 grid (backbone x HE) with frozen STN, where the unknown backbone's trials raise."""
    tmp = tmp_path_factory.mktemp("grid")
    cfg = tiny_config(tiny_dataset, tmp / "store", backbone=["test_resnet", "no_such_net"], he=["off", "global"],
                      stn="frozen")
    variants = prepare_store(absolute_paths(cfg))  # what run_sweep reuses: trials must not change it
    before = store_snapshot(tmp / "store")
    scratch_before = set(SCRATCH_ROOT.glob("*"))
    started = time.time()
    experiment = run_sweep(cfg, name="grid", storage=str(tmp / "runs"))
    return dict(cfg=cfg, experiment=experiment, variants=variants, before=before,
                after=store_snapshot(tmp / "store"), seconds=time.time() - started,
                scratch_left=set(SCRATCH_ROOT.glob("*")) - scratch_before)


# --- config -> Ray Tune (no Ray needed) -------------------------------------------------

def test_space_lists_become_grid_axes_or_choices_and_distributions_pass_through():
    cfg = Config()
    cfg.space.backbone, cfg.space.he, cfg.space.lr = ["resnet18", "vgg16"], [False, "clahe"], {"loguniform": [1e-4, 1e-2]}
    grid = space.param_space(cfg)
    assert grid["backbone"] == {"grid_search": ["resnet18", "vgg16"]}
    assert grid["he"] == {"grid_search": ["off", "clahe"]}  # YAML's bare `off` is False
    assert 1e-4 <= grid["lr"].sample() <= 1e-2
    cfg.search.algorithm = "optuna"
    tpe = space.param_space(cfg)
    assert sorted(tpe["backbone"].categories) == ["resnet18", "vgg16"]
    assert space.searched_keys(cfg) == ["backbone", "lr", "he"]


@pytest.mark.parametrize("section,key,value,needle", [
    ("space", "lr", {"lognormal": [1, 2]}, "unknown distribution"),
    ("space", "stn", ["off", "sideways"], "space.stn"),
    ("search", "algorithm", "hyperband", "search.algorithm"),
    ("search", "metric", "test_auc", "validation only"),
    ("train", "test", True, "train.test: a sweep scores only its winners"),  # trial_config would drop it silently
])
def test_bad_sweep_configs_fail_with_one_line_reason(section, key, value, needle):
    cfg = Config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=needle):
        space.param_space(cfg)


def test_asha_max_t_defaults_to_the_largest_epochs():
    cfg = Config()
    cfg.space.epochs, cfg.search.scheduler, cfg.search.grace_period = [3, 9], "asha", 2
    asha = space.scheduler(cfg)
    assert asha._max_t == 9 and asha._time_attr == "epoch"


def test_asha_max_t_excludes_the_upper_bound_of_integer_distributions():
    cfg = Config()
    for dist, expected in (("randint", 9), ("lograndint", 9), ("qrandint", 10)):
        cfg.space.epochs = {dist: [2, 10]}
        assert space.max_epochs(cfg) == expected


def test_an_off_detector_stays_off_and_is_not_made_a_path(tmp_path):
    cfg = Config()
    cfg.data.dataset, cfg.data.store, cfg.roi.detector = "ds", "st", "off"  # YAML's bare `off`
    out = absolute_paths(cfg)
    assert out.roi.detector == "off" and Path(out.data.store).is_absolute()


def test_winner_lines_work_when_selecting_by_validation_loss():
    winner = dict(trial_id="c", best_epoch=1, selected_by="val_loss (min) on validation", config={},
                  val={"val_loss": 0.2, "val_auc": 0.95}, test={})
    assert "val_loss = 0.200" in "\n".join(_winner_lines({"right": winner}, "val_loss"))


def test_pick_winners_reads_validation_only():
    board = pd.DataFrame([
        dict(trial_id="a", status="TERMINATED", view="left", val_auc=0.70, val_loss=0.3, best_epoch=3, test_auc=0.99),
        dict(trial_id="b", status="TERMINATED", view="left", val_auc=0.80, val_loss=0.6, best_epoch=2, test_auc=0.10),
        dict(trial_id="c", status="ERROR", view="left", val_auc=0.95, val_loss=0.1, best_epoch=1, test_auc=0.99),
        # diverged after a good first epoch: never a winner
        dict(trial_id="x", status="diverged", view="left", val_auc=0.99, val_loss=0.1, best_epoch=1, test_auc=0.99),
        dict(trial_id="d", status="TERMINATED", view="right", val_auc=0.60, val_loss=0.5, best_epoch=1, test_auc=0.50),
        dict(trial_id="e", status="TERMINATED", view="right", val_auc=float("nan"), val_loss=0.1, best_epoch=None,
             test_auc=0.9),
    ])
    winners = pick_winners(board, "val_auc", "max")
    assert {v: w["trial_id"] for v, w in winners.items()} == {"left": "b", "right": "d"}
    assert pick_winners(board, "test_auc", "max") == {}  # a test column can never select
    assert pick_winners(board.assign(val_auc=-board["val_auc"]), "val_auc", "min")["left"]["trial_id"] == "b"


def test_select_by_config_on_validation_loss_ranks_configurations_by_their_mean_loss():
    board = pd.DataFrame([
        dict(trial_id="a0", status="TERMINATED", view="right", he="off", seed=0, val_auc=0.9, val_loss=0.10, best_epoch=2),
        dict(trial_id="a1", status="TERMINATED", view="right", he="off", seed=1, val_auc=0.6, val_loss=0.90, best_epoch=2),
        dict(trial_id="b0", status="TERMINATED", view="right", he="global", seed=0, val_auc=0.8, val_loss=0.30,
             best_epoch=1),
        dict(trial_id="b1", status="TERMINATED", view="right", he="global", seed=1, val_auc=0.8, val_loss=0.35,
             best_epoch=2),
    ])
    assert pick_winners(board, "val_loss", "min", by="config")["right"]["trial_id"] == "b0"  # mean 0.325 < 0.5
    assert pick_winners(board, "val_loss", "min", by="trial")["right"]["trial_id"] == "a0"


def test_pick_winners_breaks_a_saturated_metric_by_validation_loss():
    board = pd.DataFrame([
        dict(trial_id="a", status="TERMINATED", view="right", val_auc=1.0, val_loss=1.21, best_epoch=4),
        dict(trial_id="b", status="TERMINATED", view="right", val_auc=1.0, val_loss=0.01, best_epoch=4),
        dict(trial_id="c", status="TERMINATED", view="right", val_auc=0.9, val_loss=0.001, best_epoch=1),
    ])
    assert pick_winners(board, "val_auc", "max")["right"]["trial_id"] == "b"
    assert pick_winners(board, "val_loss", "min")["right"]["trial_id"] == "c"


# --- a real grid sweep ----------------------------------------------------------------------

@pytest.mark.slow  # a real Ray Tune sweep
def test_grid_sweep_completes_and_trials_only_read_the_store(grid_sweep):
    experiment, variants = grid_sweep["experiment"], grid_sweep["variants"]
    board = pd.read_csv(experiment / LEADERBOARD)
    assert len(board) == 4 and set(board["status"]) == {"TERMINATED", "ERROR"}
    for key in (*space.SPACE_KEYS, "val_auc", "val_accuracy", "val_f1", "val_sensitivity", "val_specificity",
                "best_epoch", "node", "error", "device", "device_seconds", "img_per_s"):
        assert key in board.columns
    done = board[board["status"] == "TERMINATED"]
    assert sorted(done["he"]) == ["global", "off"] and set(done["backbone"]) == {"test_resnet"}
    assert done["val_auc"].between(0, 1).all() and done["best_epoch"].isin([1, 2]).all()
    assert done["node"].str.len().gt(0).all()
    assert done["device_seconds"].gt(0).all() and done["img_per_s"].gt(0).all()  # GPU-hours accounting
    assert grid_sweep["after"] == grid_sweep["before"]  # no variant built or rewritten by a trial
    assert not grid_sweep["scratch_left"]  # the trials' working checkpoints are gone with the sweep
    dirs = trial_dirs(experiment)
    for row in done.itertuples():
        metrics = json.loads((dirs[row.trial_id] / "metrics.json").read_text())
        assert metrics["variant"] == variants["variants"][f"{row.he}/{row.aspect}"]["key"]  # the driver-built variant of its HE mode
        assert "test" not in metrics  # trials never score the test split
        assert yaml.safe_load((dirs[row.trial_id] / "config.yaml").read_text())["data"]["store"].startswith("/")


@pytest.mark.slow  # a real Ray Tune sweep
def test_a_trial_that_raises_is_recorded_and_the_sweep_goes_on(grid_sweep):
    board = pd.read_csv(grid_sweep["experiment"] / LEADERBOARD)
    failed = board[board["status"] == "ERROR"]
    assert list(failed["backbone"]) == ["no_such_net", "no_such_net"]
    assert failed["error"].str.contains("no_such_net").all()
    assert failed["val_auc"].isna().all()
    assert (board["status"] == "TERMINATED").sum() == 2  # the others finished regardless


@pytest.mark.slow  # a real Ray Tune sweep
def test_tensorboard_has_hparams_scalars_and_images_for_every_trial(grid_sweep):
    experiment = grid_sweep["experiment"]
    root = hparams_records(experiment)["content"]
    exp = metadata.parse_experiment_plugin_data(root[metadata.EXPERIMENT_TAG])
    assert [h.name for h in exp.hparam_infos] == list(space.SPACE_KEYS)
    assert {m.name.tag for m in exp.metric_infos} >= {f"best/{name}" for name in SELECTABLE_METRICS}
    board = pd.read_csv(experiment / LEADERBOARD).set_index("trial_id")
    for trial_id, path in trial_dirs(experiment).items():
        records = hparams_records(path)
        start = metadata.parse_session_start_info_plugin_data(records["content"][metadata.SESSION_START_INFO_TAG])
        assert set(start.hparams) == set(space.SPACE_KEYS)
        assert start.hparams["backbone"].string_value == board.loc[trial_id, "backbone"]
        assert start.hparams["he"].string_value == board.loc[trial_id, "he"]
        assert start.hparams["lr"].number_value == pytest.approx(0.01)
        assert start.hparams["flip"].bool_value is True
        end = metadata.parse_session_end_info_plugin_data(records["content"][metadata.SESSION_END_INFO_TAG])
        acc = records["acc"]
        images = acc.Tags()["images"]
        assert {"samples/roi_crop", "samples/after_he", "samples/after_stn"} <= set(images)
        if board.loc[trial_id, "status"] == "TERMINATED":
            assert end.status == api_pb2.STATUS_SUCCESS
            history = json.loads((path / "metrics.json").read_text())["history"]
            assert [e.step for e in acc.Scalars("epoch/val_auc")] == [1, 2]  # the per-epoch curve
            assert [e.value for e in acc.Scalars("epoch/val_auc")] == pytest.approx([h["val_auc"] for h in history])
            # what the HParams tab shows (the tag's last value) is the leaderboard's best-epoch number
            for name in SELECTABLE_METRICS:
                assert acc.Scalars(f"best/{name}")[-1].value == pytest.approx(board.loc[trial_id, name], abs=1e-6,
                                                                               nan_ok=True)
            assert "roc/val" in images
        else:
            assert end.status == api_pb2.STATUS_FAILURE


@pytest.mark.slow  # a real Ray Tune sweep
def test_winner_is_best_on_validation_and_only_it_is_scored_on_test(grid_sweep):
    experiment = grid_sweep["experiment"]
    board = pd.read_csv(experiment / LEADERBOARD)
    winners = json.loads((experiment / WINNERS).read_text())
    done = board[board["status"] == "TERMINATED"]
    assert list(winners) == ["right"]
    best = done.sort_values(["val_auc", "val_loss", "best_epoch"], ascending=[False, True, True]).iloc[0]
    assert winners["right"]["trial_id"] == best["trial_id"]
    test = winners["right"]["test"]
    assert 0 <= test["auc"] <= 1 and test["auc_ci"][0] <= test["auc"] <= test["auc_ci"][1]
    assert not any(c.startswith("test") for c in board.columns)
    scores = pd.read_csv(experiment / "winner_right_test_scores.csv")
    assert len(scores) == test["n"] and scores["score"].between(0, 1).all()


@pytest.mark.slow  # a real Ray Tune sweep
def test_report_has_tables_and_plots(grid_sweep):
    from search.report import write_report

    path = write_report(grid_sweep["experiment"])
    text = path.read_text()
    board = pd.read_csv(grid_sweep["experiment"] / LEADERBOARD)
    for heading in ("## Winners", "## Comparison tables", "## Leaderboard", "## Failed trials"):
        assert heading in text
    # a default sweep scores only its winner on test, so its report has no test-scored rows, and says so
    assert "### right view\n" not in text and "scored only for the winners" in text
    assert all(trial_id in text for trial_id in board["trial_id"])
    assert "auc_ci" not in text and "[" in text  # intervals rendered as [lo, hi]
    for png in ("right_roc.png", "right_confusion.png"):
        image = cv2.imread(str(path.parent / png))
        assert image is not None and image.shape[0] > 100


# --- Optuna + ASHA ----------------------------------------------------------------------------

@pytest.mark.slow  # a real Ray Tune sweep
def test_optuna_proposes_inside_the_space_and_asha_stops_some_trials(local_ray, tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path / "store", lr={"loguniform": [1e-3, 0.3]}, batch_size=[4, 16], epochs=3)
    cfg.search.algorithm, cfg.search.num_samples, cfg.search.seed = "optuna", 6, 1
    cfg.search.scheduler, cfg.search.grace_period, cfg.search.reduction_factor = "asha", 1, 2
    experiment = run_sweep(cfg, name="tpe", storage=str(tmp_path / "runs"))
    board = leaderboard(experiment)
    assert len(board) == 6 and (board["status"] == "TERMINATED").all()
    assert board["lr"].between(1e-3, 0.3).all() and set(board["batch_size"]) <= {4, 16}
    assert board["lr"].nunique() == 6  # TPE proposed, not one fixed value
    runs = board["epochs_run"]
    assert (runs < 3).any() and (runs == 3).any()  # ASHA stopped some trials early, let others finish
    assert board["checkpoint"].str.len().gt(0).all()  # a stopped trial ends on a rung epoch, which checkpoints


# --- resume after a killed driver ------------------------------------------------------------

def _completed(experiment: Path) -> dict[str, list]:
    """trial id -> reported val_auc history, for trials whose metrics.json (written at the end) exists."""
    out = {}
    for trial_id, path in trial_dirs(experiment).items():
        if (path / "metrics.json").is_file() and (path / "result.json").is_file():
            out[trial_id] = [json.loads(l)["val_auc"] for l in (path / "result.json").read_text().splitlines() if l]
    return out


@pytest.mark.slow  # a real Ray Tune sweep
def test_resume_after_killed_driver_keeps_completed_trials_and_optuna_state(local_ray, tiny_dataset, tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    cfg = tiny_config(tiny_dataset, tmp_path / "store", lr={"loguniform": [1e-3, 0.1]}, epochs=2)
    cfg.search.algorithm, cfg.search.num_samples, cfg.search.max_concurrent = "optuna", 3, 1
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(absolute_paths(cfg).to_dict()))
    experiment = tmp_path / "runs" / "killed"
    driver = subprocess.Popen(
        [sys.executable, "-m", "fsweep.cli", "sweep", str(config_path), "--name", "killed",
         "--storage", str(tmp_path / "runs")],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        deadline = time.time() + 150
        while not _completed(experiment) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep ended before it could be killed"
        assert _completed(experiment), "no trial completed in time"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    before = _completed(experiment)
    assert 0 < len(before) < 3  # killed mid-sweep: something left to resume
    resume_sweep(experiment)
    assert not scratch_root(experiment).exists()  # the killed driver's scratch checkpoints are cleared too
    board = pd.read_csv(experiment / LEADERBOARD)
    assert len(board) == 3 and (board["status"] == "TERMINATED").all()
    after = _completed(experiment)
    for trial_id, history in before.items():
        assert after[trial_id] == history  # not rerun: same reports, none added
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(experiment))  # the TPE study Tune saved with the experiment
    study = searcher._ot_study.trials
    assert len(study) == 3 and all(t.value is not None for t in study)
    assert {round(t.params["lr"], 12) for t in study} == {round(v, 12) for v in board["lr"]}
    best_auc = {round(lr, 12): auc for lr, auc in zip(board["lr"], board["val_auc"])}
    for trial in study:  # TPE learns from each trial's best epoch, the value selection uses
        assert trial.value == pytest.approx(best_auc[round(trial.params["lr"], 12)])


@pytest.mark.slow  # a real Ray Tune sweep
def test_uri_storage_keeps_the_experiment_and_report_there(local_ray, tiny_dataset, tmp_path):
    from search.report import write_report

    cfg = tiny_config(tiny_dataset, tmp_path / "store", epochs=1)
    storage = f"file://{tmp_path / 'bucket'}"
    experiment = run_sweep(cfg, name="remote", storage=storage)
    assert experiment == f"{storage}/remote"
    assert write_report(experiment) == f"{storage}/remote/report.md"
    local = tmp_path / "bucket" / "remote"
    board = pd.read_csv(local / LEADERBOARD)
    assert list(board["status"]) == ["TERMINATED"]
    assert json.loads((local / WINNERS).read_text())["right"]["trial_id"] == board["trial_id"][0]
    assert "## Leaderboard" in (local / "report.md").read_text() and (local / "right_roc.png").is_file()


# --- every selection option on a real leaderboard -------------------------------------------

@pytest.fixture(scope="module")
def option_sweep(local_ray, tiny_dataset, tmp_path_factory):
    """A real 4-trial sweep (HE x 2 seeds, 2 epochs, ASHA stopping some at epoch 1) at the default train settings."""
    tmp = tmp_path_factory.mktemp("options")
    cfg = tiny_config(tiny_dataset, tmp / "store", he=["off", "global"], seed=[0, 1])
    cfg.search.scheduler, cfg.search.grace_period, cfg.search.reduction_factor = "asha", 1, 2
    cfg.search.keep_checkpoints = "all"  # every combination below may pick another winner: keep every weight
    return dict(cfg=cfg, experiment=Path(run_sweep(cfg, name="options", storage=str(tmp / "runs"))))


def test_no_trial_of_a_default_config_sweep_writes_a_test_split_score(option_sweep):
    """train.test_every_trial is off by default: the test split scores just the winner, after selection."""
    experiment = option_sweep["experiment"]
    dirs = trial_dirs(experiment)
    assert len(dirs) == 4
    for path in dirs.values():
        assert not list(path.rglob("*.parquet"))  # no per-image scores at all, in the trial dir or its checkpoints
        reported = [json.loads(line) for line in (path / "result.json").read_text().splitlines() if line]
        assert reported and not [k for r in reported for k in r if k.startswith("test")]
        if (path / "metrics.json").is_file():  # a trial ASHA stopped ends inside its report, before metrics.json
            assert "test" not in json.loads((path / "metrics.json").read_text())
    winners = json.loads((experiment / WINNERS).read_text())
    assert set(winners) == {"right"} and 0 <= winners["right"]["test"]["auc"] <= 1  # the winner alone, scored


@pytest.mark.parametrize("scheduler", ["fifo", "asha"])
@pytest.mark.parametrize("select_by", ["trial", "config"])
@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("metric", SELECTABLE_METRICS)
def test_every_selectable_option_goes_through_selection_winners_report_and_export(
        option_sweep, metric, mode, select_by, scheduler, monkeypatch):
    """The config check accepts the option (or refuses it in one line), and a finished sweep picks a winner,
    writes winners.json and report.md, and export finds the winner's checkpoint and operating threshold."""
    import search.select
    from fsmodels.checkpoint import load_state
    from fsmodels.train import load_trial_model, validation_threshold
    from fsweep.export import locate_checkpoint, read_winners
    from search.report import write_report
    from search.select import finish_experiment
    from search.expdir import SWEEP_CONFIG

    experiment, cfg = option_sweep["experiment"], copy.deepcopy(option_sweep["cfg"])
    cfg.search.metric, cfg.search.mode, cfg.search.select_by, cfg.search.scheduler = metric, mode, select_by, scheduler
    space.param_space(cfg), space.scheduler(cfg)  # what the sweep checks and builds before any trial runs
    tested = _scored_once(search.select.score_on_test)
    monkeypatch.setattr(search.select, "score_on_test", tested)  # the same checkpoint scores the same: once
    (experiment / SWEEP_CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # what report reads
    finish_experiment(experiment, cfg)
    board = pd.read_csv(experiment / LEADERBOARD)
    winner = read_winners(str(experiment))["right"]
    assert winner["selected_by"].startswith(f"{metric} ({mode}) on validation")
    row = board.set_index("trial_id").loc[winner["trial_id"]]
    done = board[(board["status"] == "TERMINATED") & board[metric].notna()]
    if select_by == "trial":  # the best value of the metric, in the direction asked
        assert row[metric] == (done[metric].max() if mode == "max" else done[metric].min())
    text = write_report(experiment).read_text()
    assert f"trial `{winner['trial_id']}`" in text and "selection never read" not in text  # no test-scored rows
    assert "scored only for the winners" in text
    checkpoint = locate_checkpoint(str(experiment), winner["checkpoint"])
    load_trial_model(checkpoint)
    threshold = validation_threshold(load_state(checkpoint))
    # one operating point: the leaderboard's rates, the winner's test figures and the export share the threshold
    assert row["val_rates_threshold"] == pytest.approx(threshold) == pytest.approx(winner["test"]["threshold"])


def _scored_once(score):
    cache = {}

    def scored(winner: dict) -> dict:
        if winner["checkpoint"] not in cache:
            cache[winner["checkpoint"]] = score(winner)
        return {**cache[winner["checkpoint"]], "scores": list(cache[winner["checkpoint"]]["scores"])}

    return scored


@pytest.mark.slow  # a real Ray Tune sweep and a full export
def test_a_sweep_selecting_configurations_by_validation_loss_finishes_and_exports(local_ray, tiny_dataset, tmp_path):
    from fsweep.export import export_experiment
    from search.report import write_report

    cfg = tiny_config(tiny_dataset, tmp_path / "store", he=["off", "global"], seed=[0, 1], epochs=1)
    cfg.search.select_by, cfg.search.metric, cfg.search.mode = "config", "val_loss", "min"
    experiment = Path(run_sweep(cfg, name="by_loss", storage=str(tmp_path / "runs")))
    board = pd.read_csv(experiment / LEADERBOARD)
    winner = json.loads((experiment / WINNERS).read_text())["right"]
    means = board.groupby("he")["val_loss"].mean()
    assert winner["config"]["he"] == means.idxmin()  # the configuration with the lowest mean validation loss
    mine = board[board["he"] == means.idxmin()]
    assert winner["trial_id"] == mine.sort_values("val_loss").iloc[0]["trial_id"]  # then its best trial
    assert "configuration mean over seeds and folds" in write_report(experiment).read_text()
    card = json.loads((export_experiment(experiment, tmp_path / "model") / "model_card.json").read_text())
    assert card["models"]["right"]["trial_id"] == winner["trial_id"]
    assert card["models"]["right"]["operating_threshold"]["value"] == pytest.approx(winner["test"]["threshold"])
