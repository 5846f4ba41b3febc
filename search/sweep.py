"""Run and resume a Ray Tune sweep (DESIGN §4.4, §4.5).

The driver builds (or reuses) every store variant and frozen STN the space needs
before any trial starts; trials (``search.trial``) only open them by absolute path.
Experiment layout: Ray Tune's own (``tuner.pkl``, ``experiment_state-*.json``,
searcher state, ``trial_<id>/`` with ``result.json``, ``progress.csv``,
``checkpoint_*``), plus fsweep's ``fsweep_sweep.yaml``, ``fsweep_variants.yaml``,
the TensorBoard files, ``leaderboard.csv``, ``winners.json`` and the report.
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
from cluster.storage import exists, is_uri, join, resolve_storage
from fsmodels.config import Config, config_from_dict, entry_values, load_config
from preprocessing.vocab import ConfigError, is_off
from search import space
from search.expdir import get_text, put_text, upload_dir
from search.tb import TensorBoardCallback, write_experiment_summary
from search.trial import train_trial

SWEEP_CONFIG = "fsweep_sweep.yaml"  # the resolved sweep config, in the experiment directory
STORE_VARIANTS = "fsweep_variants.yaml"  # HE mode -> store variant key prepared by the driver


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


def sweep_he_modes(cfg: Config) -> list[str]:
    """HE modes the space can draw, plus 'off' (the plain ROI crop shown in TensorBoard)."""
    modes = entry_values("he", cfg.space.he)
    return list(dict.fromkeys(["off", *modes]))


def prepare_store(cfg: Config) -> dict[str, str]:
    """Build or reuse every variant (HE mode x size) and frozen STN the sweep needs; HE mode -> key."""
    from fsmodels.stn import ensure_frozen_stn
    from preprocessing.store import build_store

    modes = sweep_he_modes(cfg)
    variants = build_store(
        cfg.data.dataset, cfg.data.store, roi=cfg.roi.detector, size=cfg.data.size, he_modes=modes,
        margin=cfg.roi.margin, aspect=cfg.data.aspect,
    )
    stn_modes = entry_values("stn", cfg.space.stn)
    searched_he = entry_values("he", cfg.space.he)
    for he, variant in zip(modes, variants):
        if "frozen" in stn_modes and he in searched_he:
            ensure_frozen_stn(variant, epochs=cfg.train.stn_epochs, seed=0)  # the seed run_trial asks for
    return {he: variant.key for he, variant in zip(modes, variants)}


SCRATCH_ROOT = Path(tempfile.gettempdir()) / "fsweep-scratch"  # trials' working checkpoints, one folder per experiment


def scratch_root(experiment: str | Path) -> Path:
    """This node's scratch folder of ``experiment``; a resume reuses it, so it also clears a killed driver's."""
    return SCRATCH_ROOT / hashlib.sha256(str(experiment).encode()).hexdigest()[:12]


def trainable(cfg: Config, variants: dict[str, str], scratch: Path):
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


def trial_dirname(trial) -> str:
    """Short trial directory (and TensorBoard run) names: trial_<id>."""
    return f"trial_{trial.trial_id}"


def concurrency(cfg: Config, cluster: dict) -> int:
    """search.max_concurrent, or as many trials as the cluster's CPUs/GPUs hold."""
    if cfg.search.max_concurrent > 0:
        return cfg.search.max_concurrent
    slots = [cluster["cpus"] / cfg.resources.cpu] if cfg.resources.cpu > 0 else []
    if cfg.resources.gpu > 0:
        slots.append(cluster["gpus"] / cfg.resources.gpu)
    return max(1, int(min(slots))) if slots else 1


def run_config(cfg: Config, storage: str, name: str) -> tune.RunConfig:
    """Storage, checkpoint retention, retries, loggers (ours replace Ray's TensorBoard logger)."""
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        # the latest checkpoint is enough: it resumes the trial and carries the best epoch's weights
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TensorBoardCallback()],
        verbose=1,
    )


def _connect(address: str | None) -> dict:
    """Join or start Ray, with Tune's logger defaults set for this driver."""
    from cluster.connect import connect

    # Ray's TBX logger writes HParams only when a trial ends and drops non-numeric values;
    # search.tb replaces it, so Tune must not add it (run_config adds the CSV and JSON loggers).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # Tiny CPU trials checkpoint faster than Tune's snapshot-rate warning assumes.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return connect(address)


def write_sweep_files(experiment: str, cfg: Config, variants: dict[str, str], name: str) -> None:
    """The resolved config, the variant keys and the HParams experiment record, into the experiment dir."""
    put_text(join(experiment, SWEEP_CONFIG), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    put_text(join(experiment, STORE_VARIANTS), yaml.safe_dump(variants))
    with tempfile.TemporaryDirectory() as tmp:
        write_experiment_summary(tmp, cfg, description=f"fsweep sweep {name}")
        upload_dir(Path(tmp), experiment)


def load_sweep_config(experiment: str) -> Config:
    """The resolved sweep config saved in an experiment directory (path or URI)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SWEEP_CONFIG
        local.write_text(get_text(join(experiment, SWEEP_CONFIG)))
        return load_config(local)


def _location(experiment: str) -> Path | str:
    return experiment if is_uri(experiment) else Path(experiment)


def run_sweep(
    cfg: Config, address: str | None = None, name: str | None = None, storage: str | None = None
) -> Path | str:
    """Run the sweep described by ``cfg``; write leaderboard.csv and score the winners.

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
    cluster = _connect(address)
    variants = prepare_store(cfg)
    limit = concurrency(cfg, cluster)
    scratch = scratch_root(experiment)
    tuner = tune.Tuner(
        trainable(cfg, variants, scratch),
        param_space=params,
        tune_config=tune.TuneConfig(  # no metric here: it would override the searcher's and the scheduler's own
            num_samples=cfg.search.num_samples,
            search_alg=space.search_algorithm(cfg, limit),
            scheduler=space.scheduler(cfg),
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,  # same resources per trial: skip a process start + torch import per trial
        ),
        run_config=run_config(cfg, storage, name),
    )
    write_sweep_files(experiment, cfg, variants, name)
    fit_and_clean(tuner, scratch)
    finish_experiment(experiment, cfg)
    return _location(experiment)


def resume_sweep(experiment: str | Path, address: str | None = None) -> Path | str:
    """Finish an interrupted sweep (``Tuner.restore``): completed trials are kept, the rest continue."""
    from search.select import finish_experiment

    experiment = resolve_storage(experiment)
    if not exists(join(experiment, SWEEP_CONFIG)) or not tune.Tuner.can_restore(experiment):
        raise FsweepError(f"{experiment}: not a resumable fsweep experiment (no {SWEEP_CONFIG} or tuner.pkl)")
    cfg = load_sweep_config(experiment)
    variants = yaml.safe_load(get_text(join(experiment, STORE_VARIANTS)))
    _connect(address)
    scratch = scratch_root(experiment)
    tuner = tune.Tuner.restore(experiment, trainable=trainable(cfg, variants, scratch), resume_errored=False)
    fit_and_clean(tuner, scratch)
    finish_experiment(experiment, cfg)
    return _location(experiment)
