"""Sweep config (DESIGN §4.4) -> Ray Tune param space, search algorithm and scheduler.

Each ``space`` key is a fixed value, a list, or a one-key mapping naming a Ray Tune
distribution, e.g. ``{loguniform: [1e-4, 1e-2]}``. A list is a grid axis under
``search.algorithm: grid`` and a categorical choice under ``random``/``optuna``
(TPE cannot take grid axes). ``{grid: [...]}`` and ``{choice: [...]}`` say it explicitly.
"""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from fsmodels.config import SPACE_KEYS, Config, distribution, entry_values
from fsmodels.metrics import SELECTABLE_METRICS
from preprocessing.vocab import ConfigError

ALGORITHMS = ("grid", "random", "optuna")
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
    if s.num_samples < 1:
        raise ConfigError(f"search.num_samples: must be >= 1, got {s.num_samples}")


def param_space(cfg: Config) -> dict:
    """Every ``space`` key as a fixed value or a Ray Tune domain."""
    check_search(cfg)
    return {key: tune_domain(key, getattr(cfg.space, key), cfg.search.algorithm) for key in SPACE_KEYS}


def searched_keys(cfg: Config) -> list[str]:
    """Space keys that take more than one value in this sweep."""
    return [k for k in SPACE_KEYS if len(entry_values(k, getattr(cfg.space, k)) or (0, 1)) > 1]


def max_epochs(cfg: Config) -> int:
    """The largest ``space.epochs`` any trial can get (ASHA's default max_t)."""
    value = cfg.space.epochs
    if isinstance(value, dict):
        name, args = distribution("epochs", value)
        if name in ("choice", "grid"):
            return int(max(args))
        return int(args[1]) - (1 if name in ("randint", "lograndint") else 0)  # their upper bound is exclusive
    return int(max(value)) if isinstance(value, list) else int(value)


def tune_metric(cfg: Config) -> str:
    """The metric Optuna learns from: the trial's best validation ``search.metric`` so far.

    Selection takes each trial's best epoch, so TPE must learn from that value and not
    from whatever the last epoch happened to score. ASHA keeps the epoch's own value:
    a running best saturates (many trials tie at AUC 1.0) and stops fewer weak trials.
    """
    return f"best_{cfg.search.metric}"


def search_algorithm(cfg: Config, concurrency: int) -> Searcher | None:
    """Optuna's TPE behind one concurrency limit; grid/random use Tune's variant generator."""
    if cfg.search.algorithm == "optuna":
        optuna = OptunaSearch(metric=tune_metric(cfg), mode=cfg.search.mode, seed=cfg.search.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=max(1, concurrency))
    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=concurrency)


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
