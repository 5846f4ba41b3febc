"""Sweep config (docs/design.md, 'The config') -> Ray Tune param space, search algorithm and scheduler.

Each ``space`` key is a fixed value, a list, or a one-key mapping naming a Ray Tune
distribution, e.g. ``{loguniform: [1e-4, 1e-2]}``. A list is a grid axis under
``search.algorithm: grid`` and a categorical choice under ``random``/``optuna``
(TPE cannot take grid axes). ``{grid: [...]}`` and ``{choice: [...]}`` say it explicitly.

Explicit points (``space`` as a list, ``fsmodels.config.space_points``) run as a grid: every
point's grid axes are expanded into concrete cells, and Ray Tune grid-searches one ``point``
index (the cell) while every space key reads its value from that cell (``tune.sample_from``),
so trial configs stay flat and every cell runs ``search.num_samples`` times.
"""
from __future__ import annotations

import itertools
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from fsmodels.config import SPACE_KEYS, Config, distribution, entry_values, key_values, space_points
from fsmodels.metrics import SELECTABLE_METRICS
from preprocessing.vocab import ConfigError

ALGORITHMS = ("grid", "random", "optuna")
POINT = "point"  # the trial config key holding an explicit-point cell's index
SCHEDULERS = ("fifo", "asha")
# Distributions a space key may name; argument lists are passed to ray.tune as given.
DISTRIBUTIONS = {
    "uniform": tune.uniform,
    "quniform": tune.quniform,
    "loguniform": tune.loguniform,
    "qloguniform": tune.qloguniform,
    "randint": tune.randint,  # upper bound exclusive, as in ray.tune
    "qrandint": tune.qrandint,
    "lograndint": tune.lograndint,  # upper bound exclusive too
    "choice": None,  # categorical over the listed values
    "grid": None,  # grid axis over the listed values
}  # the names are fsmodels.config.DISTRIBUTIONS, checked when the config loads


def tune_domain(key: str, value: Any, algorithm: str) -> Any:
    """The Ray Tune form of one space entry under ``algorithm``."""
    if isinstance(value, dict):
        name, args = distribution(key, value)
        if name == "grid" and algorithm == "optuna":
            raise ConfigError(f"space.{key}: optuna cannot search a grid axis; use a list or {{choice: [...]}}")
        if name == "grid":
            return tune.grid_search(entry_values(key, value))
        if name == "choice":
            return tune.choice(entry_values(key, value))
        try:
            return DISTRIBUTIONS[name](*args)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"space.{key}: bad {name} arguments {args!r} ({exc})") from exc
    finite = entry_values(key, value)
    if not isinstance(value, list):
        return finite[0]
    return tune.grid_search(finite) if algorithm == "grid" else tune.choice(finite)


def check_search(cfg: Config) -> None:
    """Reject unknown algorithm/scheduler/mode values with a one-line reason."""
    s = cfg.search
    if s.algorithm not in ALGORITHMS:
        raise ConfigError(f"search.algorithm: {s.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if s.scheduler not in SCHEDULERS:
        raise ConfigError(f"search.scheduler: {s.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if s.mode not in ("max", "min"):
        raise ConfigError(f"search.mode: {s.mode!r} is not max or min")
    if s.metric not in SELECTABLE_METRICS:
        raise ConfigError(
            f"search.metric: {s.metric!r} is not one of {', '.join(SELECTABLE_METRICS)} (validation only: test never selects)"
        )
    if cfg.train.test:
        raise ConfigError("train.test: a sweep scores only its winners on test, after selection (train.test is "
                          "`fsweep train --test`); set train.test_every_trial to score every trial for the report")
    if s.num_samples < 1:
        raise ConfigError(f"search.num_samples: must be >= 1, got {s.num_samples}")
    if cfg.space.points and s.algorithm != "grid":
        raise ConfigError(f"search.algorithm: explicit points (space as a list) run as a grid, not {s.algorithm}")


def grid_cells(cfg: Config) -> list[dict]:
    """Every concrete combination of every explicit point's grid axes, point by point, in order."""
    cells = []
    for point in space_points(cfg):
        axes = [entry_values(key, point[key]) for key in SPACE_KEYS]
        cells += [dict(zip(SPACE_KEYS, combo)) for combo in itertools.product(*axes)]
    return cells


class CellValue:
    """``tune.sample_from`` callable: space key ``key`` of the cell the trial's ``point`` index names."""

    def __init__(self, cells: list[dict], key: str):
        self.cells, self.key = cells, key

    def __call__(self, spec) -> object:
        return self.cells[spec["config"][POINT]][self.key]


def param_space(cfg: Config) -> dict:
    """Every ``space`` key as a fixed value or a Ray Tune domain (explicit points: a grid over cells)."""
    check_search(cfg)
    if cfg.space.points:
        cells = grid_cells(cfg)
        return {POINT: tune.grid_search(list(range(len(cells)))),
                **{key: tune.sample_from(CellValue(cells, key)) for key in SPACE_KEYS}}
    return {key: tune_domain(key, getattr(cfg.space, key), cfg.search.algorithm) for key in SPACE_KEYS}


def searched_keys(cfg: Config) -> list[str]:
    """Space keys that take more than one value in this sweep."""
    return [k for k in SPACE_KEYS if len(key_values(cfg, k) or (0, 1)) > 1]


def max_epochs(cfg: Config) -> int:
    """The largest ``space.epochs`` any trial can get (ASHA's default max_t)."""
    values = key_values(cfg, "epochs")  # values, lists, choice, grid and explicit points
    if values is not None:
        return int(max(values))
    name, args = distribution("epochs", cfg.space.epochs)  # a numeric distribution (points hold none)
    return int(args[1]) - (1 if name in ("randint", "lograndint") else 0)  # their upper bound is exclusive


def tune_metric(cfg: Config) -> str:
    """The metric Optuna learns from: the trial's best validation ``search.metric`` so far.

    Selection takes each trial's best epoch, so TPE must learn from that value and not
    from whatever the last epoch happened to score. ASHA keeps the epoch's own value:
    a running best saturates (many trials tie at AUC 1.0) and stops fewer weak trials.
    """
    return f"best_{cfg.search.metric}"


OPTUNA_CONCURRENCY = 8  # TPE's default in-flight trials: each one it suggests learns from fewer finished ones


def concurrency(cfg: Config) -> int:
    """Trials in flight at once (0 = no fsweep limit), never sized from the cluster at the sweep's start.

    grid/random: ``search.max_concurrent`` or no limit, so Ray queues every pending trial and an
    autoscaler sees them all and adds nodes; optuna: ``search.max_concurrent`` or
    ``OPTUNA_CONCURRENCY``, since TPE suggests better points when fewer are pending.
    """
    if cfg.search.max_concurrent > 0:
        return cfg.search.max_concurrent
    return OPTUNA_CONCURRENCY if cfg.search.algorithm == "optuna" else 0


def search_algorithm(cfg: Config) -> Searcher | None:
    """Optuna's TPE behind its concurrency limit; grid/random use Tune's variant generator (0: unlimited)."""
    limit = concurrency(cfg)
    if cfg.search.algorithm == "optuna":
        optuna = OptunaSearch(metric=tune_metric(cfg), mode=cfg.search.mode, seed=cfg.search.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=limit)
    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=limit)


def scheduler(cfg: Config) -> TrialScheduler:
    """FIFO, or ASHA on the reported ``epoch`` (grace_period, reduction_factor, max_t)."""
    s = cfg.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    max_t = s.max_t or max_epochs(cfg)
    if s.grace_period < 1 or s.grace_period > max_t or s.reduction_factor < 2:
        raise ConfigError(
            f"search: ASHA needs 1 <= grace_period ({s.grace_period}) <= max_t ({max_t}) and reduction_factor >= 2"
        )
    return ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)
