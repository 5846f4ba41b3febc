"""search.report / search.tables: test-scored comparison rows, validation thresholds, paired patient
bootstrap, folds and selection by configuration; two tiny paper-shaped sweeps on the phantom."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SALT, tiny_sweep_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fsmodels.config import Config, validate
from preprocessing.ingest import ingest
from search.plan import planned_trials
from search.report import write_report
from search.select import LEADERBOARD, pick_winners
from search.sweep import run_sweep
from search.tables import (
    comparison_sections,
    held_out_rows,
    paired_difference,
    trial_threshold,
)

SPACE = dict(backbone="test_resnet", batch_size=8, epochs=1, lr=0.01, he="off", flip=False, stn="off",
             finetune=True, seed=0, fold=0)


def scores_frame(val: tuple, test: tuple, patients: list[str] | None = None) -> pd.DataFrame:
    """A best_scores.parquet-like frame from (labels, scores) of val and test."""
    frames = []
    for split, (labels, scores) in (("val", val), ("test", test)):
        ids = [f"{split}{i:03d}" for i in range(len(labels))]
        pats = patients if split == "test" and patients is not None else ids
        frames.append(pd.DataFrame({"split": split, "epoch": 1, "image_id": ids, "patient": pats,
                                    "label": labels, "score": scores}))
    return pd.concat(frames, ignore_index=True)


def board_rows(specs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{**SPACE, "view": "right", "status": "TERMINATED", "val_auc": 0.8, "val_loss": 0.5,
                          "best_epoch": 1, **spec} for spec in specs])


def test_rows_are_scored_on_test_at_the_threshold_chosen_on_validation():
    val = ([0, 0, 0, 1, 1, 1], [0.55, 0.6, 0.65, 0.75, 0.8, 0.9])  # Youden's J: 0.75 separates validation
    test = ([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.85])  # at 0.5 every normal is wrong; at 0.75 all are right
    frame = scores_frame(val, test)
    assert trial_threshold(frame) == pytest.approx(0.75)
    assert list(held_out_rows(frame)["split"].unique()) == ["test"]
    cfg = validate(Config())
    board = board_rows([dict(trial_id="t0")])
    (section,) = comparison_sections(cfg, board, {"t0": frame}, n_boot=20)
    assert section.rows.loc[0, "accuracy"] == "1.000" and section.rows.loc[0, "specificity"] == "1.000"
    one_class = scores_frame(([1, 1], [0.2, 0.3]), test)  # no Youden threshold on validation: 0.5
    assert trial_threshold(one_class) == 0.5


def test_paired_difference_resamples_patients_and_is_zero_for_identical_rows():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=40)
    good = np.clip(labels * 0.6 + rng.random(40) * 0.4, 0, 1)
    noise = rng.random(40)
    patients = [f"p{i // 2}" for i in range(40)]  # two images per patient
    frames = {"a": scores_frame((labels, good), (labels, noise), patients),
              "b": scores_frame((labels, good), (labels, noise), patients),
              "c": scores_frame((labels, good), (labels, good), patients)}
    board = board_rows([dict(trial_id=t, seed=0) for t in frames]).set_index("trial_id", drop=False)
    scores = {t: (held_out_rows(f), trial_threshold(f)) for t, f in frames.items()}
    same = paired_difference(["b"], ["a"], board, scores, n_boot=200)
    assert same["auc"] == (0.0, 0.0, 0.0)  # paired: the same patients on both sides
    better = paired_difference(["c"], ["a"], board, scores, n_boot=200)
    point, lo, hi = better["auc"]
    assert lo > 0 and lo <= point <= hi


def test_selection_by_config_ranks_the_mean_over_seeds_and_folds_not_the_luckiest_trial():
    board = board_rows([
        dict(trial_id="a0", backbone="lucky", seed=0, val_auc=0.95), dict(trial_id="a1", backbone="lucky", seed=1, val_auc=0.55),
        dict(trial_id="b0", backbone="steady", seed=0, fold=0, val_auc=0.85),
        dict(trial_id="b1", backbone="steady", seed=0, fold=1, val_auc=0.84),
    ])
    assert pick_winners(board, "val_auc", "max", by="trial")["right"]["trial_id"] == "a0"
    assert pick_winners(board, "val_auc", "max", by="config")["right"]["trial_id"] == "b0"


def leaderboard_trials(experiment: Path) -> list[tuple]:
    board = pd.read_csv(experiment / LEADERBOARD)
    keys = ["backbone", "view", "he", "flip", "stn", "finetune", "seed", "fold", "epochs"]
    return sorted(tuple(str(v) for v in row) for row in board[keys].itertuples(index=False))


def plan_trials(cfg) -> list[tuple]:
    keys = ["backbone", "view", "he", "flip", "stn", "finetune", "seed", "fold", "epochs"]
    return sorted(tuple(str(t[k]) for k in keys) for t in planned_trials(validate(cfg)))


def tensorboard_texts(experiment: Path) -> list[str]:
    acc = EventAccumulator(str(experiment), size_guidance={"tensors": 0})
    acc.Reload()
    return [tag for tag in acc.Tags().get("tensors", []) if tag.startswith("report/")]


def test_table4_shaped_sweep_reports_both_arms_on_test_with_paired_intervals(local_ray, tiny_dataset, tmp_path):
    started = time.time()
    cfg = tiny_sweep_config(tiny_dataset, tmp_path / "store", view=["left", "right"], finetune=[False, True],
                            he="off", flip=False, stn="off", seed=[0, 1], epochs=1)
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 2
    cfg.report.baseline, cfg.train.test_every_trial = {"finetune": False}, True
    experiment = Path(run_sweep(cfg, name="table4", storage=str(tmp_path / "runs")))
    assert leaderboard_trials(experiment) == plan_trials(cfg)  # plan == what ran
    text = write_report(experiment).read_text()
    assert "### left view" in text and "### right view" in text
    section = text.split("### right view\n")[1]
    assert "| finetune |" in section and "| False |" in section and "| True |" in section  # both arms
    assert "best-on-validation epoch" in section and "Youden" in section and "Paired difference" in section
    assert section.count(" ± ") >= 5  # mean ± std over 2 seeds
    assert "| True | " in section.split("Paired difference")[1] and "[" in section.split("Paired difference")[1]
    assert len(tensorboard_texts(experiment)) == 2  # one text per section
    assert time.time() - started < 120


@pytest.mark.slow  # folds: a second ingest and store, 8 trials
def test_table5_shaped_sweep_over_folds_gives_the_spread_over_folds(local_ray, tiny_phantom, tmp_path):
    dataset = tmp_path / "dataset"
    ingest(tiny_phantom / "manifest.csv", dataset, seed=0, salt=TINY_SALT, echo=False, folds=3)
    cfg = tiny_sweep_config(dataset, tmp_path / "store", epochs=1, fold=[0, 1])
    cfg.space.points = [{"he": "off", "flip": False}, {"he": "global", "flip": False},
                        {"he": "off", "flip": True}, {"he": "global", "flip": True}]
    cfg.search.max_failures, cfg.search.max_concurrent, cfg.search.select_by = 0, 2, "config"
    cfg.train.test_every_trial = True
    experiment = Path(run_sweep(cfg, name="table5", storage=str(tmp_path / "runs")))
    assert leaderboard_trials(experiment) == plan_trials(cfg)
    board = pd.read_csv(experiment / LEADERBOARD)
    assert sorted(board["fold"].unique()) == [0, 1] and (board["status"] == "TERMINATED").all()
    text = write_report(experiment).read_text()
    section = text.split("### right view\n")[1]
    for he, flip in (("off", "False"), ("global", "False"), ("off", "True"), ("global", "True")):
        assert f"| {he} | {flip} |" in section
    rows = section.split("Paired difference")[0]
    assert rows.count("| 2 |") >= 4  # two folds per row (and its trials)
    assert " ± " in rows and "configuration mean over seeds and folds" in text
    from search.names import dirname_trial_id

    trials = [p for p in experiment.glob("trial_*/checkpoint_*/best_scores.parquet")]
    assert len(trials) == 8 and all("_he=" in p.parent.parent.name and "_fold=" in p.parent.parent.name
                                    for p in trials)  # readable runs
    by_fold = {}
    for path in trials:
        scores = pd.read_parquet(path)
        fold = int(board.set_index("trial_id").loc[dirname_trial_id(path.parent.parent.name), "fold"])
        by_fold.setdefault(fold, set()).update(scores.loc[scores["split"] == "test", "patient"])
    assert not by_fold[0] & by_fold[1]  # rotating test: no patient is tested in two folds


def test_a_sweep_over_folds_the_dataset_lacks_fails_before_it_starts(tiny_dataset, tmp_path):
    from preprocessing.vocab import ConfigError
    from search.sweep import check_data

    cfg = validate(tiny_sweep_config(tiny_dataset, tmp_path / "store", fold=[0, 1]))
    with pytest.raises(ConfigError, match="no fold 1"):
        check_data(cfg)


def test_trials_stopped_early_are_marked_and_kept_out_of_paired_differences():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=40)
    patients = [f"p{i // 2}" for i in range(40)]
    good = np.clip(labels * 0.5 + rng.random(40) * 0.5, 0, 1)
    frames = {t: scores_frame((labels, good), (labels, s), patients)
              for t, s in (("b0", rng.random(40)), ("b1", rng.random(40)), ("f0", good), ("f1", 1 - good),
                           ("h0", good))}
    # row flip=True: f1 (perfectly wrong on test) was stopped at epoch 1 of 2; row he=global: only a stopped trial
    board = board_rows([dict(trial_id="b0", seed=0), dict(trial_id="b1", seed=1),
                        dict(trial_id="f0", seed=0, flip=True), dict(trial_id="f1", seed=1, flip=True),
                        dict(trial_id="h0", seed=0, he="global")])
    board["epochs"], board["epochs_run"] = 2, [2, 2, 2, 1, 1]
    board["stopped_early"] = board["epochs_run"] < board["epochs"]
    (section,) = comparison_sections(validate(Config()), board, frames, n_boot=50)
    rows = section.rows.set_index(["he", "flip"])
    assert rows.loc[("off", "True"), "stopped early"] == "1 of 2 left out" and rows.loc[("off", "True"), "trials"] == 1
    assert rows.loc[("off", "True"), "auc"] == "1.000"  # f0 alone: f1's 0.000 is not averaged in
    assert rows.loc[("global", "False"), "stopped early"] == "yes (epoch 1 of 2): not compared"
    diffs = section.diffs.set_index(["he", "flip"])
    assert diffs.loc[("global", "False"), "Δ auc"] == "–"
    assert "not compared" in diffs.loc[("global", "False"), "vs baseline"]
    indexed = board.set_index("trial_id", drop=False)
    scores = {t: (held_out_rows(f), trial_threshold(f)) for t, f in frames.items()}
    full = paired_difference(["f0"], ["b0", "b1"], indexed, scores, n_boot=50)
    assert diffs.loc[("off", "True"), "Δ auc"].startswith(f"{full['auc'][0]:+.3f} [")
    assert diffs.loc[("off", "True"), "vs baseline"] == "above baseline"
    # a CSV leaderboard's text booleans read the same
    csv_board = board.assign(stopped_early=board["stopped_early"].map(str))
    (again,) = comparison_sections(validate(Config()), csv_board, frames, n_boot=50)
    assert again.rows["stopped early"].tolist() == section.rows["stopped early"].tolist()


class StopOne:
    """A Ray scheduler that stops the trial with ``he=off, flip=True`` after its first epoch, as ASHA would
    stop a trial at its first rung, but on purpose (ASHA's choice depends on scores and completion order)."""

    def __new__(cls):
        from ray.tune.schedulers import FIFOScheduler, TrialScheduler

        class _Stop(FIFOScheduler):
            def on_trial_result(self, tune_controller, trial, result):
                if trial.config.get("he") == "off" and trial.config.get("flip") is True and result.get("epoch") == 1:
                    return TrialScheduler.STOP
                return TrialScheduler.CONTINUE

        return _Stop()


def test_report_on_a_sweep_with_a_stopped_trial_marks_it_warns_and_leaves_it_out(local_ray, tiny_dataset, tmp_path,
                                                                                monkeypatch, capsys):
    import search.space

    cfg = tiny_sweep_config(tiny_dataset, tmp_path / "store", he=["off", "global"], flip=[False, True], epochs=2)
    cfg.search.scheduler, cfg.search.grace_period = "asha", 1  # what the config says: the report must warn
    cfg.search.max_failures, cfg.search.max_concurrent, cfg.train.test_every_trial = 0, 2, True
    monkeypatch.setattr(search.space, "scheduler", lambda cfg: StopOne())
    experiment = Path(run_sweep(cfg, name="stopped", storage=str(tmp_path / "runs")))
    board = pd.read_csv(experiment / LEADERBOARD)
    stopped = board[(board["he"] == "off") & board["flip"]]
    assert stopped["stopped_early"].tolist() == [True] and stopped["epochs_run"].tolist() == [1]
    assert (~board.loc[board.index != stopped.index[0], "stopped_early"]).all()
    assert board["val_rates_threshold"].tolist() == board["val_youden_threshold"].fillna(0.5).tolist()
    text = write_report(experiment).read_text()
    assert "asha" in capsys.readouterr().err  # fsweep report warns on the console too
    assert "> **Warning:** search.scheduler is asha" in text
    assert "4 terminated, 1 of them stopped early by the scheduler" in text
    section = text.split("### right view\n")[1]
    rows, diffs = section.split("Paired difference")
    assert "| off | True |" in rows and "yes (epoch 1 of 2): not compared" in rows
    stopped_diff = next(line for line in diffs.splitlines() if line.startswith("| off | True |"))
    assert "not compared: this row only has trials stopped early" in stopped_diff and "[" not in stopped_diff
    compared = [line for line in diffs.splitlines() if line.startswith("| global |")]
    assert len(compared) == 2 and all("[" in line and "baseline" in line for line in compared)
    leader = text.split("## Leaderboard")[1]
    assert "val_accuracy@youden" in leader and "epochs_run" in leader and "| yes |" in leader


@pytest.mark.parametrize("row, expected", [
    (dict(val_auc=0.75, val_auc_lo=0.52, val_auc_hi=0.93, train_auc=0.95, best_epoch=9, epochs=12), []),
    (dict(val_auc=0.75, val_auc_lo=0.48, val_auc_hi=0.93, train_auc=0.95, best_epoch=9, epochs=12),
     ["indistinguishable from chance on validation (AUC 0.75 [0.48, 0.93])"]),
    (dict(val_auc=0.30, val_auc_lo=0.10, val_auc_hi=0.45, train_auc=0.95, best_epoch=9, epochs=12),
     ["worse than chance on validation (AUC 0.30 [0.10, 0.45])"]),
    (dict(val_auc=0.8, val_auc_lo=0.6, val_auc_hi=0.9, train_auc=0.68, best_epoch=2, epochs=12),
     ["its best epoch is 2 of 12: it peaked at once or never learned", "it barely fits its training set (train AUC 0.68)"]),
    (dict(val_auc=0.8, val_auc_lo=0.6, val_auc_hi=0.9, train_auc=0.9, best_epoch=3, epochs=12), []),  # past a fifth
    (dict(val_auc=0.8, val_auc_lo=0.6, val_auc_hi=0.9, train_auc=0.9, best_epoch=2, epochs=12, epochs_run=2), []),
    (dict(val_auc=0.8), []),  # an older experiment without the diagnostics: nothing to say
])
def test_fit_warnings_name_chance_early_peaks_and_no_fit_in_plain_words(row, expected):
    from search.select import fit_warnings

    assert fit_warnings(row) == expected


@pytest.mark.slow  # a real Ray Tune sweep on labels that carry nothing
def test_a_winner_trained_on_shuffled_labels_is_named_so_in_the_sweep_and_the_report(local_ray, tiny_phantom,
                                                                                   tmp_path, capsys):
    manifest = pd.read_csv(tiny_phantom / "manifest.csv")
    manifest["image"] = [str(tiny_phantom / image) for image in manifest["image"]]
    manifest["label"] = np.random.default_rng(0).permutation(manifest["label"].to_numpy())  # no anatomy behind them
    manifest.to_csv(tmp_path / "shuffled.csv", index=False)
    ingest(tmp_path / "shuffled.csv", tmp_path / "dataset", seed=0, salt=TINY_SALT, echo=False)
    cfg = tiny_sweep_config(tmp_path / "dataset", tmp_path / "store", view="both", epochs=5, seed=[0, 1])
    cfg.search.max_failures = 0
    experiment = Path(run_sweep(cfg, name="shuffled", storage=str(tmp_path / "runs")))
    printed = capsys.readouterr().out
    board = pd.read_csv(experiment / LEADERBOARD)
    assert (board["val_auc_lo"] <= board["val_auc"]).all() and (board["val_auc"] <= board["val_auc_hi"]).all()
    assert board["train_auc"].between(0, 1).all()
    warned = [line for line in printed.splitlines() if line.startswith("WARNING winner both: ")]
    assert len(warned) == 1 and "barely fits its training set (train AUC" in warned[0]
    assert "chance on validation (AUC" in warned[0]
    text = write_report(experiment).read_text()
    assert f"> **Warning:** {warned[0][len('WARNING '):]}" in text  # the same words where researchers look
    assert "train_auc" in text.split("## Leaderboard")[1] and "val_auc_lo" in text


def test_best_scores_are_read_from_the_checkpoint_also_when_the_experiment_moved(tmp_path):
    from search.names import trial_dirname_text
    from search.tables import read_best_scores

    frame = scores_frame(([0, 1], [0.2, 0.8]), ([0, 1], [0.3, 0.7]))
    board = []
    for trial_id, label in (("3206b_00000", "he=global_flip=on"), ("3206b_00001", ""), ("3206b_00002", "")):
        checkpoint = tmp_path / trial_dirname_text(trial_id, label) / "checkpoint_000001"
        checkpoint.mkdir(parents=True)
        if trial_id != "3206b_00002":  # a trial that kept no test scores
            frame.to_parquet(checkpoint / "best_scores.parquet")
        # the leaderboard recorded the checkpoints where the sweep ran, before the experiment was moved here
        board.append({"trial_id": trial_id, "checkpoint": f"/elsewhere/{checkpoint.parent.name}/{checkpoint.name}"})
    found = read_best_scores(str(tmp_path), pd.DataFrame(board))
    assert sorted(found) == ["3206b_00000", "3206b_00001"] and len(found["3206b_00000"]) == 4
