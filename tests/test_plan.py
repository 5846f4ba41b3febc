"""search.plan and explicit points: the trials a sweep will run, and their cost, before anything runs."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fsmodels.config import key_values, load_config, space_points
from fsweep.cli import main
from preprocessing.vocab import ConfigError
from search import space
from search.plan import plan_table, planned_trials, train_images

ROOT = Path(__file__).resolve().parent.parent
PAPER = {t: ROOT / "configs" / f"paper_table{t}.yaml" for t in (3, 4, 5, 6)}
CROP_ONLY = dict(he="off", flip=False, stn="off")
ALL_METHODS = dict(he="global", flip=True, stn="frozen")
PAPER_TRAINING = dict(batch_size=4, epochs=25, lr=0.001, fold=0)


def rows_of(table: pd.DataFrame) -> list[tuple]:
    """The plan's rows as sorted (backbone, view, finetune, he, flip, stn, seed) tuples."""
    return sorted((r.backbone, r.view, bool(r.finetune), r.he, bool(r.flip), r.stn, int(r.seed))
                  for r in table.itertuples())


def expected(rows: list[dict]) -> list[tuple]:
    return sorted((r["backbone"], r["view"], r["finetune"], r["he"], r["flip"], r["stn"], seed)
                  for r in rows for seed in (0, 1, 2))


def test_plan_of_each_paper_table_lists_exactly_the_papers_experiments():
    started = time.time()
    tables = {t: plan_table(load_config(path))[0] for t, path in PAPER.items()}
    assert time.time() - started < 30  # no Ray cluster, no training
    for table in tables.values():  # the paper's training settings in every row
        assert all((table[k] == v).all() for k, v in PAPER_TRAINING.items() if k in table)
    table3 = [dict(backbone=b, view="left", finetune=False, **CROP_ONLY) for b in ("resnet50", "vgg16", "vgg19")]
    assert rows_of(tables[3]) == expected(table3)
    table4 = [dict(backbone="resnet50", view=v, finetune=f, **CROP_ONLY) for v in ("left", "right") for f in (False, True)]
    assert rows_of(tables[4]) == expected(table4)
    ablation = [dict(he="off", flip=False, stn="off"), dict(he="global", flip=False, stn="off"),
                dict(he="off", flip=True, stn="off"), dict(he="global", flip=False, stn="frozen"),
                dict(he="off", flip=False, stn="frozen"), dict(he="global", flip=True, stn="frozen")]
    table5 = [dict(backbone="resnet50", view=v, finetune=True, **a) for v in ("left", "right") for a in ablation]
    assert rows_of(tables[5]) == expected(table5)
    table6 = [dict(backbone="resnet50", view=v, finetune=False, **CROP_ONLY) for v in ("left", "right")]
    table6 += [dict(backbone=b, view=v, finetune=True, **ALL_METHODS) for v in ("left", "right")
               for b in ("resnet50", "resnext50", "wide_resnet50", "res2net101")]
    assert rows_of(tables[6]) == expected(table6)
    assert [len(tables[t]) for t in (3, 4, 5, 6)] == [9, 12, 36, 30]
    assert "fold" not in tables[3]  # no folds in the dataset, none asked for: no fold column


def test_explicit_points_take_the_space_values_they_leave_out_and_set_wins_over_them(tmp_path):
    path = tmp_path / "points.yaml"
    path.write_text(yaml.safe_dump({"space": [{"backbone": "resnet50", "finetune": False, "he": False},
                                              {"backbone": ["vgg16", "vgg19"], "seed": [0, 1]}]}))
    cfg = load_config(path)
    first, second = space_points(cfg)
    assert first["he"] == "off" and first["stn"] == "frozen" and second["finetune"] is True  # defaults fill in
    assert key_values(cfg, "backbone") == ["resnet50", "vgg16", "vgg19"]
    assert len(planned_trials(cfg)) == 1 + 2 * 2
    pinned = load_config(path, ["space.seed=3", "space.epochs=1"])
    assert {t["seed"] for t in planned_trials(pinned)} == {3} and {t["epochs"] for t in planned_trials(pinned)} == {1}
    # the mapping form: shared keys beside `points`
    path.write_text(yaml.safe_dump({"space": {"view": ["left", "right"], "points": [{"he": "off"}, {"he": "global"}]}}))
    assert len(planned_trials(load_config(path))) == 4


@pytest.mark.parametrize("points,algorithm,needle", [
    ([{"lr": {"loguniform": [1e-4, 1e-2]}}], "grid", "is a distribution"),
    ([{"colour": "red"}], "grid", "unknown key 'colour'"),
    ([{"stn": "sideways"}], "grid", "space.stn"),
    ([{"he": "off"}], "optuna", "run as a grid"),
    ([], "grid", "non-empty list"),
])
def test_bad_points_fail_with_one_line_reason(points, algorithm, needle):
    with pytest.raises(ConfigError, match=needle):
        space.param_space(load_config(None, [f"space.points={points}", f"search.algorithm={algorithm}"]))


def test_random_plan_is_drawn_with_the_search_seed():
    cfg = load_config(None, ["space.lr={loguniform: [0.0001, 0.01]}", "search.algorithm=random", "search.num_samples=4"])
    again = planned_trials(cfg)
    assert [t["lr"] for t in planned_trials(cfg)] == [t["lr"] for t in again]
    other = planned_trials(load_config(None, ["space.lr={loguniform: [0.0001, 0.01]}", "search.algorithm=random",
                                              "search.num_samples=4", "search.seed=1"]))
    assert [t["lr"] for t in other] != [t["lr"] for t in again]
    optuna = load_config(None, ["space.lr={loguniform: [0.0001, 0.01]}", "search.algorithm=optuna", "search.num_samples=3"])
    assert [t["lr"] for t in planned_trials(optuna)] == [t["lr"] for t in planned_trials(optuna)]


def test_plan_counts_training_images_per_view_fold_and_flip(tiny_dataset, tmp_path, capsys):
    rows = pd.read_parquet(tiny_dataset / "dataset.parquet")
    train = rows[rows["split"] == "train"]
    left, right = int((train["view"] == "left").sum()), int((train["view"] == "right").sum())
    assert train_images(rows, "left", False, 0) == left and train_images(rows, "left", True, 0) == left + right
    assert train_images(rows, "both", True, 0) == 2 * (left + right)
    out = tmp_path / "plan.csv"
    code = main(["plan", str(PAPER[4]), "--set", f"data.dataset={tiny_dataset}", "--set", "space.epochs=2",
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "trials: 12" in text and "trial-epochs: 24" in text
    assert f"images x epochs: {6 * 2 * left + 6 * 2 * right}" in text
    table = pd.read_csv(out)
    assert len(table) == 12 and {"backbone", "finetune", "seed", "images", "image_epochs"} <= set(table.columns)
    assert main(["plan", str(PAPER[5]), "--set", "search.algorithm=optuna"]) == 2  # points are a grid: one-line error


@pytest.mark.slow  # a real Ray Tune sweep
def test_random_plan_equals_the_trials_a_sweep_runs(local_ray, tiny_dataset, tmp_path):
    from conftest import tiny_sweep_config

    from search.sweep import run_sweep

    cfg = tiny_sweep_config(tiny_dataset, tmp_path / "store", epochs=1, lr={"loguniform": [1e-3, 1e-1]},
                            seed=[0, 1])
    cfg.search.algorithm, cfg.search.num_samples, cfg.search.seed = "random", 2, 7
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 2
    experiment = Path(run_sweep(cfg, name="random", storage=str(tmp_path / "runs")))
    ran = pd.read_csv(experiment / "leaderboard.csv")
    planned = planned_trials(load_config(None, [f"space.lr={cfg.space.lr}", "space.seed=[0, 1]",
                                                "search.algorithm=random", "search.num_samples=2", "search.seed=7"]))
    assert sorted(zip(ran["seed"], ran["lr"].round(12))) == sorted((t["seed"], round(t["lr"], 12)) for t in planned)


def test_plan_estimates_device_hours_from_a_measured_rate(tiny_dataset, capsys):
    args = ["plan", str(PAPER[4]), "--set", f"data.dataset={tiny_dataset}", "--set", "space.epochs=2"]
    assert main(args) == 0 and "device-hours: give --rate" in capsys.readouterr().out
    assert main([*args, "--rate", "0.01"]) == 0
    text = capsys.readouterr().out
    image_epochs = int(text.split("images x epochs: ")[1].split()[0])
    hours = image_epochs / 0.01 * 0.25 / 3600  # paper configs: four trials per GPU, each holds a quarter
    assert f"device-hours: {hours:.2f} at 0.01 img/s per trial x device share 0.25" in text
    assert main([*args, "--rate", "0"]) == 2
