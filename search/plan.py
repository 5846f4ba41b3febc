"""``fsweep plan CONFIG``: the trials a sweep will run, and what they cost, before anything runs.

The trials come from the same param space (``search.space.param_space``) and the same
sampler the sweep uses: Ray Tune's variant generator with ``search.seed`` for grid and
random search (so the rows are the trials, in order), and Optuna's TPE with the same seed
for ``optuna``. Optuna's rows are its proposals before any result: its first (random
start-up) proposals are the ones that run; later ones adapt to results. No Ray cluster
starts and nothing trains: the plan takes seconds.

Cost: trial-epochs (the sum of ``epochs``) and images x epochs, where a trial's images are
the training images of its view(s) and fold in DATASET/dataset.parquet, plus the other
view's mirrored training images with Flip (``preprocessing.loader.train_set``); column
``flip_as`` says which Flip a trial gets (cross-view, horizontal, or off). What is
fitted before the trials is listed with its images x epochs too: the frozen STNs (one per
variant and seed, and per fold on a DATASET with folds) and, with folds and a detector, one
ROI detector per fold (``fsmodels.params``), each on its fold's training patients only.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain
from ray.tune.search.variant_generator import generate_variants

from cluster.errors import FsweepError
from cluster.ray_internals import variant_rng
from fsmodels.config import SPACE_KEYS, Config, key_values
from fsmodels.params import variant_name, variant_recipes
from preprocessing.ingest import load_dataset
from preprocessing.loader import train_views
from preprocessing.splits import dataset_folds, fold_column
from preprocessing.vocab import VIEWS, ConfigError, flip_as, is_off, pair_views, store_views
from search import space


def planned_trials(cfg: Config) -> list[dict]:
    """One dict of space values per trial, in the order the sweep creates them."""
    params = space.param_space(cfg)
    if cfg.search.algorithm == "optuna":
        return _optuna_trials(cfg, params)
    rng = variant_rng(cfg.search.seed)  # what BasicVariantGenerator(random_state=seed) holds
    trials = []
    for _ in range(cfg.search.num_samples):  # Tune's trial iterator: the whole grid once per sample
        for _, spec in generate_variants({"config": params}, random_state=rng):
            trials.append({key: spec["config"][key] for key in SPACE_KEYS})
    return trials


def _optuna_trials(cfg: Config, params: dict) -> list[dict]:
    searcher = OptunaSearch(metric=space.tune_metric(cfg), mode=cfg.search.mode, seed=cfg.search.seed)
    searcher.set_search_properties(space.tune_metric(cfg), cfg.search.mode, params)
    fixed = {key: value for key, value in params.items() if not isinstance(value, Domain)}
    return [{**fixed, **searcher.suggest(f"plan_{i}")} for i in range(cfg.search.num_samples)]


def _dataset_rows(cfg: Config) -> pd.DataFrame | None:
    """DATASET's rows when it has been ingested (a plan may come before the data)."""
    exists = cfg.data.dataset and (Path(cfg.data.dataset) / "dataset.parquet").is_file()
    return load_dataset(cfg.data.dataset) if exists else None


def train_images(rows: pd.DataFrame, view: str, flip: bool, fold: int, pair: tuple[str, ...] = VIEWS) -> int:
    """Training images one epoch of a trial reads (its view(s) in its fold; Flip adds the mirrored other view)."""
    column = fold_column(fold) if fold else "split"
    train = rows[rows[column] == "train"] if column in rows else rows.iloc[:0]
    views, mirrored = train_views(view, flip, store_views(rows["view"]), pair)
    return int(train["view"].isin(views).sum()) + int(train["view"].isin(mirrored).sum())


def plan_table(cfg: Config) -> tuple[pd.DataFrame, bool]:
    """The plan: one row per trial (space keys, epochs' cost) and whether image counts are known."""
    rows = _dataset_rows(cfg)
    trials = planned_trials(cfg)
    folds_used = (rows is not None and dataset_folds(rows.columns) > 0) or key_values(cfg, "fold") != [0]
    keys = [k for k in SPACE_KEYS if k != "fold" or folds_used]
    table = pd.DataFrame([{k: t[k] for k in keys} for t in trials], columns=keys)
    if rows is not None and len(table):
        pair = pair_views(cfg.data.mirror_pair)
        table["images"] = [train_images(rows, t["view"], t["flip"], t["fold"], pair) for t in trials]
        table["image_epochs"] = table["images"] * table["epochs"]
        table["flip_as"] = [flip_as(t["view"], t["flip"], store_views(rows["view"]), pair) for t in trials]
    return table, rows is not None


def device_hours(cfg: Config, image_epochs: int, rate: float) -> float:
    """Device-hours of ``image_epochs`` training images at ``rate`` img/s per trial, each holding its device share.

    ``rate`` is one trial's measured training rate where it will run (``img_per_s`` in a leaderboard, or
    ``bench/gpu.py``'s trial loop: the packed aggregate over the number of trials packed); a trial with
    ``resources.gpu`` g holds g of a GPU, so its hours count g times (a CPU trial: its wall time).
    """
    share = cfg.resources.gpu if cfg.resources.gpu > 0 else 1.0
    return image_epochs / rate * share / 3600


def fitted_artifacts(cfg: Config, rows: pd.DataFrame | None) -> list[str]:
    """What is fitted before any trial, one line per fold: its frozen STNs and, on a DATASET with folds and a
    detector, the fold's ROI detector, each with the images it learns from x epochs."""
    from search.sweep import frozen_stn_runs

    try:
        runs = frozen_stn_runs(cfg)
    except ConfigError as exc:
        return [f"frozen STNs: unknown ({exc})"]
    count = dataset_folds(rows.columns) if rows is not None else 0
    values = key_values(cfg, "fold")
    folds = ((sorted({int(v) for v in values}) if values is not None else list(range(count))) if count else [None])
    names = ", ".join(f"{variant_name(he, aspect)}/seed {seed}" for he, aspect, seed in runs)
    lines = []
    for fold in folds:
        where = "" if fold is None else f" of fold {fold}"
        if fold is not None and not is_off(cfg.roi.detector):
            lines.append(detector_line(cfg, rows, fold))
        if not runs:
            continue
        column = "split" if fold is None else fold_column(fold)
        train = int((rows[column] == "train").sum()) if rows is not None else None
        cost = (f"each {cfg.train.stn_epochs} epochs x {train} training images{where} (both views) = "
                f"{cfg.train.stn_epochs * train} image-epochs" if train is not None else "images unknown")
        lines.append(f"frozen STNs{where}: {len(runs)} ({names}; {cost})")
    if count and not is_off(cfg.roi.detector):
        recipes = variant_recipes(cfg)
        lines.append(f"store variants per fold: {len(recipes)} x {len(folds)} folds = {len(recipes) * len(folds)} "
                     "(each fold's detector crops every image once for its own variants)")
    return lines


def detector_line(cfg: Config, rows: pd.DataFrame, fold: int) -> str:
    """The plan's line for fold ``fold``'s own ROI detector: its key, the images it learns from, its cost."""
    from fsmodels.params import detector_settings
    from preprocessing.fold_roi import fold_detector_key, fold_rows

    try:
        fit, select = fold_rows(rows, fold, cfg.roi.annotated, f"{cfg.data.dataset}/dataset.parquet")
        key = fold_detector_key(rows, fold, detector_settings(cfg))
    except FsweepError as exc:
        return f"ROI detector of fold {fold}: cannot be trained ({exc})"
    return (f"ROI detector of fold {fold}: {key}, {cfg.roi.epochs} epochs x {len(fit)} boxed images of "
            f"{fit['patient'].nunique()} training patients = {cfg.roi.epochs * len(fit)} image-epochs at "
            f"{cfg.roi.imgsz} px (best epoch picked on {len(select)} training images of the fold)")


def plan_summary(cfg: Config, table: pd.DataFrame, known: bool, rate: float | None = None,
                 rows: pd.DataFrame | None = None) -> list[str]:
    """The totals: trial count, trial-epochs, images x epochs and, given a measured ``rate``, device-hours;
    with DATASET's ``rows``, what is fitted before the trials (``fitted_artifacts``)."""
    recipes = variant_recipes(cfg)
    lines = [f"trials: {len(table)}", f"trial-epochs: {int(table['epochs'].sum()) if len(table) else 0}",
             f"store variants: {len(recipes)} (he/aspect: {', '.join(variant_name(*r) for r in recipes)}; "
             f"each built once at {cfg.data.size} px)", *fitted_artifacts(cfg, rows)]
    if known:
        lines.append(f"images x epochs: {int(table['image_epochs'].sum()) if len(table) else 0} "
                     f"(training images of each trial's view(s) and fold, Flip doubling; {cfg.data.dataset})")
    else:
        lines.append(f"images x epochs: unknown (no dataset.parquet at data.dataset={cfg.data.dataset or '(empty)'})")
    if rate is None:
        lines.append("device-hours: give --rate IMG_PER_S (a trial's measured img/s: a leaderboard's img_per_s, "
                     "or bench/gpu.py)")
    elif known and len(table):
        share = cfg.resources.gpu if cfg.resources.gpu > 0 else 1.0
        lines.append(f"device-hours: {device_hours(cfg, int(table['image_epochs'].sum()), rate):.2f} at {rate:g} img/s "
                     f"per trial x device share {share:g} (training; fp32 validation adds about a tenth)")
    else:
        lines.append("device-hours: unknown (the image count is unknown)")
    if cfg.search.algorithm == "optuna":
        lines.append("optuna: rows are TPE's proposals before any result; after its start-up trials it adapts")
    return lines


def write_plan(cfg: Config, out: str | Path | None = None, rate: float | None = None) -> str:
    """The plan as printable text (device-hours from ``rate``, img/s per trial, when given); ``out``: rows as CSV."""
    table, known = plan_table(cfg)
    if out is not None:
        table.to_csv(out, index_label="trial")
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        text = table.to_string(index_names=False)
    return "\n".join([text, "", *plan_summary(cfg, table, known, rate, _dataset_rows(cfg))])
