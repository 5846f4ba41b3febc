"""cluster.ray_internals: each use of a Ray internal still does what fsweep relies on (run this after a Ray upgrade).

None of these start Ray; tests/test_cluster.py's local-start and cluster tests use the same functions on a live Ray.
"""
from __future__ import annotations

import os

import pytest
import ray
import yaml
from ray import tune

from cluster import ray_internals
from cluster.connect import PROJECT_ROOT


def test_loopback_only_makes_a_local_start_take_the_loopback_ip_and_then_puts_the_switch_back():
    from ray._private import ray_constants, services

    if ray.is_initialized():
        ray.shutdown()  # a connected driver answers with its node's IP instead of deciding one
    before = ray_constants.ENABLE_RAY_CLUSTER
    with ray_internals.loopback_only():
        assert ray_constants.ENABLE_RAY_CLUSTER is False
        assert services.get_node_ip_address() == "127.0.0.1"
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER is before


def test_the_tune_console_switch_picks_the_engine_that_is_silent_at_verbose_0(monkeypatch):
    from ray.tune.experimental.output import get_air_verbosity

    monkeypatch.delenv(ray_internals.TUNE_OUTPUT_SWITCH, raising=False)
    assert get_air_verbosity(0) is not None  # Ray's default engine: it prints its header even at 0
    ray_internals.set_tune_console(verbose=False)
    assert os.environ[ray_internals.TUNE_OUTPUT_SWITCH] == "0" and get_air_verbosity(0) is None  # legacy: silent
    ray_internals.set_tune_console(verbose=True, keep_set=True)
    assert os.environ[ray_internals.TUNE_OUTPUT_SWITCH] == "0"  # keep_set leaves a value already there
    ray_internals.set_tune_console(verbose=True)
    assert get_air_verbosity(1) is not None and ray_internals.tune_console_env(True) == {"RAY_AIR_NEW_OUTPUT": "1"}


def test_restored_run_config_is_the_tuners_own_and_changes_in_place(tmp_path):
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="probe", storage_path=str(tmp_path),
                                                                       verbose=0))
    run = ray_internals.restored_run_config(tuner)
    assert isinstance(run, tune.RunConfig) and run.name == "probe" and run.verbose == 0
    run.verbose = 1
    assert ray_internals.restored_run_config(tuner).verbose == 1  # the object fit() reads, not a copy


def test_launcher_config_check_fills_defaults_and_refuses_a_bad_schema():
    raw = yaml.safe_load((PROJECT_ROOT / "cluster" / "ray-cluster.yaml").read_text())
    config = ray_internals.validate_launcher_config(raw)
    assert config["provider"]["type"] == "aws" and "head_node_type" in config
    with pytest.raises(Exception, match="max_workers|not valid|is not of type"):
        ray_internals.validate_launcher_config({**raw, "max_workers": "many"})


def test_the_names_the_test_helpers_read_still_exist():
    import ray._private.worker
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert ray_constants.PROCESS_TYPE_RAYLET == "raylet"
    assert hasattr(ray._private.worker, "global_worker") and callable(get_authentication_mode)
    assert AuthenticationMode.TOKEN is not None


def test_variant_rng_draws_tunes_random_variants_reproducibly_per_seed():
    from ray.tune.search.variant_generator import generate_variants

    space = {"config": {"lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.choice([4, 8, 16])}}

    def draw(seed):
        rng = ray_internals.variant_rng(seed)
        return [spec["config"]["lr"] for _ in range(3) for _, spec in generate_variants(space, random_state=rng)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
