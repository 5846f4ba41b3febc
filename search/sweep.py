"""Run and resume a Ray Tune sweep (docs/design.md, sections 'The config' and 'The experiment directory').

The driver builds (or reuses) every store variant and frozen STN the space needs
before any trial starts; trials (``search.trainable``) only open them by absolute path.
Experiment layout: Ray Tune's own (``tuner.pkl``, ``experiment_state-*.json``,
searcher state, ``trial_<id>/`` with ``result.json``, ``progress.csv``,
``checkpoint_*``, ``stdout``/``stderr``), plus fsweep's ``fsweep_sweep.yaml``, ``fsweep_variants.yaml``,
``fsweep_progress.json``, ``logs/driver.log``, the TensorBoard files, ``leaderboard.csv``, ``winners.json``
and the report. The console shows ``search.progress``'s view; ``search.keep`` thins ended trials' checkpoints.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from cluster.errors import FsweepError
from cluster.ray_internals import restored_run_config, set_tune_console
from cluster.storage import exists, is_uri, join, resolve_storage
from fsmodels.config import Config, config_from_dict, entry_values, key_values, space_points
from preprocessing.vocab import ConfigError, is_off
from search import space
from search.expdir import SWEEP_CONFIG, get_text, load_sweep_config, put_text, upload_dir
from search.keep import CheckpointThinner
from search.progress import ProgressView, asha_rungs, driver_logs
from search.tb import TensorBoardCallback, write_experiment_summary
from search.trainable import train_trial

STORE_VARIANTS = "fsweep_variants.yaml"  # the variant and STN handles the driver resolved (prepare_store)


def _absolute(path: str) -> str:
    if is_off(path) or is_uri(path):  # `roi.detector: off` must not become <cwd>/off
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose dataset/store/detector paths are absolute (trials run elsewhere)."""
    out = config_from_dict(cfg.to_dict())
    out.data.dataset = _absolute(cfg.data.dataset)
    out.data.store = _absolute(cfg.data.store)
    out.roi.detector = _absolute(cfg.roi.detector)
    return out


def check_data(cfg: Config) -> None:
    """One-line errors for a sweep without a dataset or store."""
    if not cfg.data.dataset or not (Path(cfg.data.dataset) / "dataset.parquet").is_file():
        raise ConfigError(f"data.dataset: {cfg.data.dataset or '(empty)'} has no dataset.parquet (run `fsweep ingest`)")
    if not cfg.data.store:
        raise ConfigError("data.store: empty (give the STORE path of `fsweep store build`)")
    _check_folds(cfg)
    _check_views(cfg)


def _check_views(cfg: Config) -> None:
    """space.view values the dataset has, and a frozen STN only where there are views to recognise, before
    any variant is built or trial started."""
    from preprocessing.ingest import dataset_views
    from preprocessing.vocab import check_view_choice

    views = dataset_views(cfg.data.dataset)
    for view in key_values(cfg, "view") or []:
        check_view_choice(view, views, "space.view")
    if len(views) < 2 and "frozen" in (key_values(cfg, "stn") or []):
        # the frozen STN learns its alignment by recognising the view; one view gives it nothing to tell apart
        raise ConfigError(f"space.stn: frozen needs two or more views to pretrain on (this data set has one, "
                          f"{views[0]}); use stn: joint (trained with the classifier) or stn: off")


def _check_folds(cfg: Config) -> None:
    """space.fold values the dataset has (fold 0 is its `split`), before any trial starts."""
    import pyarrow.parquet as pq

    from preprocessing.splits import dataset_folds

    folds = dataset_folds(pq.read_schema(Path(cfg.data.dataset) / "dataset.parquet").names)  # the footer only
    missing = [f for f in key_values(cfg, "fold") or [] if f >= max(folds, 1)]
    if missing:
        raise ConfigError(f"space.fold: {cfg.data.dataset} has no fold {missing[0]} ({folds} folds; "
                          "run `fsweep ingest --folds K`)")


def frozen_stn_runs(cfg: Config) -> list[tuple[str, str, int]]:
    """(HE mode, aspect, seed) of every trial the space can draw with a frozen STN: the STNs the driver pretrains."""
    runs = []
    for point in space_points(cfg):
        if "frozen" not in entry_values("stn", point["stn"]):
            continue
        seeds = entry_values("seed", point["seed"])
        if seeds is None:  # each seed pretrains its own STN, before the sweep: they must be known
            raise ConfigError("space.seed: with stn frozen, seeds must be a value or a list (each pretrains an STN)")
        runs += [(he, aspect, int(seed)) for he in entry_values("he", point["he"])
                 for aspect in entry_values("aspect", point["aspect"]) for seed in seeds]
    return list(dict.fromkeys(runs))


def prepare_store(cfg: Config) -> dict:
    """Build or reuse every variant and frozen STN the sweep needs; the record every trial opens them by.

    ``{"variants": {name: handle}, "stns": {name: {seed: handle}}}``, a name being ``he/aspect``
    (``fsmodels.params.variant_name``) and a handle ``{key, manifest}`` (``fsmodels.params.handle``):
    resolved here once, saved as ``fsweep_variants.yaml``. With a DATASET of folds, what is fitted is
    fitted per fold (``fsmodels.params``): ``{"folds": {fold: {"detector": handle | None, "variants": ...,
    "stns": ...}}}``, the fold detector, variants and STNs each trial of that fold opens.
    """
    from fsmodels.params import build_fold_variants, handle, variant_name
    from fsmodels.stn import ensure_frozen_stn

    built = build_fold_variants(cfg)
    sections = {}
    for fold, (detector, variants) in built.items():
        section = {"variants": {name: handle(variant) for name, variant in variants.items()}, "stns": {}}
        for he, aspect, seed in frozen_stn_runs(cfg):  # a trial's STN is pretrained with the trial's own seed
            name = variant_name(he, aspect)
            stn = ensure_frozen_stn(variants[name], epochs=cfg.train.stn_epochs, seed=seed, store=cfg.data.store,
                                    fold=fold)
            section["stns"].setdefault(name, {})[seed] = handle(stn)
        if fold is None:
            return section
        sections[fold] = {"detector": handle(detector) if detector is not None else None, **section}
    return {"folds": sections}


SCRATCH_ROOT = Path(tempfile.gettempdir()) / "fsweep-scratch"  # trials' working checkpoints, one folder per experiment


def scratch_root(experiment: str | Path) -> Path:
    """This node's scratch folder of ``experiment``; a resume reuses it, so it also clears a killed driver's."""
    return SCRATCH_ROOT / hashlib.sha256(str(experiment).encode()).hexdigest()[:12]


def trainable(cfg: Config, variants: dict, scratch: Path):
    """The Tune trainable with its small handles (config dict, variant keys, scratch folder) and per-trial resources."""
    base = cfg.to_dict()
    base.pop("space")
    fn = tune.with_parameters(train_trial, base=base, variants=variants, scratch_root=str(scratch))
    return tune.with_resources(fn, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})


def fit_and_clean(tuner: tune.Tuner, scratch: Path) -> None:
    """Run the sweep, then drop this node's scratch checkpoints (Ray kills some trial actors before their cleanup)."""
    try:
        tuner.fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def trial_dirname_creator(keys=(), cells=None):
    """Tune's ``trial_dirname_creator``: ``trial_<id>``, or ``trial_<id>_<label>`` naming ``keys`` (``search.names``).

    Ray stores the creator in every trial's state (``Trial.__getstate__`` -> cloudpickle): a module-level
    function is pickled by reference, and ``ExperimentAnalysis`` then needs fsweep importable to open the
    runs. This one is a closure (pickled by value) whose helpers come from ``search.names``, registered to
    be pickled by value too (stdlib only, no module globals), so the state loads with Ray alone.
    ``cells``: explicit points' grid cells (``search.space.grid_cells``); Ray names a trial before it resolves
    the cell's ``sample_from`` values, so the label reads them from the cell its ``point`` index names.
    """
    import ray.cloudpickle

    import search.names
    from search.names import trial_dirname_text, trial_label

    ray.cloudpickle.register_pickle_by_value(search.names)  # process-wide and idempotent; the driver pickles
    keys, cells, point = list(keys), list(cells or []), space.POINT  # locals: the closure refers to no fsweep module

    def trial_dirname(trial) -> str:
        config = trial.config
        if cells and isinstance(config.get(point), int):
            config = {**config, **cells[config[point]]}
        return trial_dirname_text(trial.trial_id, trial_label(config, keys, sep="_"))

    return trial_dirname


def progress_view(cfg: Config, experiment: str, name: str, verbose: bool) -> list:
    """The live view as a Tune callback; none with ``verbose`` (Ray's own tables instead)."""
    if verbose:
        return []
    return [ProgressView(experiment, name=name, metric=cfg.search.metric, mode=cfg.search.mode,
                         keys=space.searched_keys(cfg), asha=asha_rungs(cfg), slots=cfg.search.max_concurrent)]


def checkpoint_thinner(cfg: Config, experiment: str) -> list:
    """search.keep_checkpoints while the sweep runs: ended trials that cannot win are thinned at once."""
    if cfg.search.keep_checkpoints == "all" or cfg.search.select_by != "trial":
        return []
    return [CheckpointThinner(experiment, cfg.search.metric, cfg.search.mode, cfg.search.keep_checkpoints)]


def run_config(cfg: Config, storage: str, name: str, verbose: bool = False) -> tune.RunConfig:
    """Storage, checkpoint retention, retries, loggers (ours replace Ray's TensorBoard logger), console output."""
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        # the latest checkpoint is enough: it resumes the trial and carries the best epoch's weights
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TensorBoardCallback(space.searched_keys(cfg)),
                   *checkpoint_thinner(cfg, join(storage, name)),
                   *progress_view(cfg, join(storage, name), name, verbose)],
        verbose=1 if verbose else 0,  # 0: no Tune tables (the view replaces them)
        log_to_file=True,  # each trial's stdout/stderr into its directory, always
    )


def set_output(tuner: tune.Tuner, cfg: Config, experiment: str, verbose: bool) -> None:
    """A restored tuner's console output: Tuner.restore brings back the pickled RunConfig, with no setter for it."""
    run = restored_run_config(tuner)
    run.callbacks = [cb for cb in run.callbacks or [] if not isinstance(cb, ProgressView)]
    run.callbacks += progress_view(cfg, experiment, Path(experiment.rstrip("/")).name, verbose)
    run.verbose, run.log_to_file = (1 if verbose else 0), True


def _connect(address: str | None, verbose: bool = False) -> dict:
    """Join or start Ray, with Tune's logger defaults set for this driver."""
    from cluster.connect import connect

    # Ray's TBX logger writes HParams only when a trial ends and drops non-numeric values;
    # search.tb replaces it, so Tune must not add it (run_config adds the CSV and JSON loggers).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Tiny CPU trials checkpoint faster than Tune's snapshot-rate warning assumes.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    set_tune_console(verbose)  # quiet: not even Tune's header (cluster.ray_internals says why)
    return connect(address, log_to_driver=verbose)  # quiet: trial output only in the trials' log files


def write_sweep_files(experiment: str, cfg: Config, variants: dict, name: str) -> None:
    """The resolved config, the variant keys and the HParams experiment record, into the experiment dir."""
    put_text(join(experiment, SWEEP_CONFIG), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    put_text(join(experiment, STORE_VARIANTS), yaml.safe_dump(variants))
    with tempfile.TemporaryDirectory() as tmp:
        write_experiment_summary(tmp, cfg, description=f"fsweep sweep {name}")
        upload_dir(Path(tmp), experiment)


def _location(experiment: str) -> Path | str:
    return experiment if is_uri(experiment) else Path(experiment)


def run_sweep(
    cfg: Config, address: str | None = None, name: str | None = None, storage: str | None = None,
    verbose: bool = False,
) -> Path | str:
    """Run the sweep described by ``cfg``; write leaderboard.csv and score the winners.

    The console shows the live view (``search.progress``); ``verbose`` shows Ray's tables and the trials' output.

    Returns the experiment directory ``<storage>/<name>`` (a Path, or the URI string).
    """
    from search.select import finish_experiment

    cfg = absolute_paths(cfg)
    check_data(cfg)
    params = space.param_space(cfg)
    storage = resolve_storage(storage)
    name = name or f"sweep_{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = join(storage, name)
    if exists(join(experiment, SWEEP_CONFIG)):
        raise FsweepError(f"{experiment}: experiment exists; use `fsweep resume {experiment}` or another --name")
    with driver_logs(experiment, verbose):  # Ray's logs into <experiment>/logs/driver.log unless verbose
        _connect(address, verbose)
        variants = prepare_store(cfg)
        scratch = scratch_root(experiment)
        tuner = tune.Tuner(
            trainable(cfg, variants, scratch),
            param_space=params,
            tune_config=tune.TuneConfig(  # no metric here: it would override the searcher's and the scheduler's own
                num_samples=cfg.search.num_samples,
                search_alg=space.search_algorithm(cfg),
                scheduler=space.scheduler(cfg),
                trial_dirname_creator=trial_dirname_creator(space.searched_keys(cfg), space.grid_cells(cfg)
                                                            if cfg.space.points else None),  # readable runs
                reuse_actors=True,  # same resources per trial: skip a process start + torch import per trial
            ),
            run_config=run_config(cfg, storage, name, verbose),
        )
        write_sweep_files(experiment, cfg, variants, name)
        fit_and_clean(tuner, scratch)
        finish_experiment(experiment, cfg)
    return _location(experiment)


def resume_sweep(experiment: str | Path, address: str | None = None, verbose: bool = False) -> Path | str:
    """Finish an interrupted sweep (``Tuner.restore``): completed trials are kept, the rest continue."""
    from search.select import finish_experiment

    experiment = resolve_storage(experiment)
    if not exists(join(experiment, SWEEP_CONFIG)) or not tune.Tuner.can_restore(experiment):
        raise FsweepError(f"{experiment}: not a resumable fsweep experiment (no {SWEEP_CONFIG} or tuner.pkl)")
    cfg = load_sweep_config(experiment)
    variants = yaml.safe_load(get_text(join(experiment, STORE_VARIANTS)))
    with driver_logs(experiment, verbose):
        _connect(address, verbose)
        scratch = scratch_root(experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable(cfg, variants, scratch), resume_errored=False)
        set_output(tuner, cfg, experiment, verbose)
        fit_and_clean(tuner, scratch)
        finish_experiment(experiment, cfg)
    return _location(experiment)
