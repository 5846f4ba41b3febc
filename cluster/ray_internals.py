"""Every use of Ray's internals in fsweep, in one place; tests/test_ray_internals.py fails when a Ray release
changes one.

Ray has no public API for these needs (checked against Ray 2.60). Everything else in fsweep uses
Ray's public API only, so a Ray upgrade is checked by running that one test file.

- ``loopback_only``: a private local Ray that listens on 127.0.0.1 only. Ray binds its services to every
  interface unless the node IP is the loopback one, and it picks the loopback IP only while its multi-node
  switch is off; that switch is read from the environment once, when Ray is imported, which is usually before
  fsweep decides to start Ray, and ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into the
  machine's address by the same switch.
- ``tune_console_env`` / ``set_tune_console``: Tune's console output. Its default output engine prints a
  header even at ``RunConfig(verbose=0)``; the legacy engine, chosen by the ``RAY_AIR_NEW_OUTPUT=0``
  environment variable that ``RunConfig``'s docstring names, prints nothing at 0.
- ``restored_run_config``: the ``RunConfig`` a ``Tuner.restore`` brought back from ``tuner.pkl``. Restore takes
  no ``run_config``, and fsweep's console settings (the live view, Ray's tables) must follow the resuming
  command, not the command that started the sweep.
- ``variant_rng``: the random state ``BasicVariantGenerator(random_state=seed)`` draws from, so that
  ``fsweep plan`` lists the trials a random sweep will create, in order, before any trial runs.
- For fsweep's tests: ``validate_launcher_config`` (the schema check ``ray up`` runs), ``raylet_process``,
  ``dashboard_url`` and ``token_auth`` (what a local start listens on and how it authenticates).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

TUNE_OUTPUT_SWITCH = "RAY_AIR_NEW_OUTPUT"  # "0": Tune's legacy console output, silent at verbose=0


@contextmanager
def loopback_only():
    """Inside: a local ``ray.init`` takes 127.0.0.1 as its node IP, so every service it starts listens there only."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def tune_console_env(verbose: bool) -> dict[str, str]:
    """The environment that makes Tune print its tables (``verbose``) or nothing at ``RunConfig(verbose=0)``."""
    return {TUNE_OUTPUT_SWITCH: "1" if verbose else "0"}


def set_tune_console(verbose: bool, *, keep_set: bool = False) -> None:
    """Put ``tune_console_env(verbose)`` into this process's environment; ``keep_set``: leave a value already set."""
    for name, value in tune_console_env(verbose).items():
        if not (keep_set and name in os.environ):
            os.environ[name] = value


def restored_run_config(tuner):
    """The ``RunConfig`` of a ``Tuner.restore``-d tuner, to change in place before ``fit``."""
    return tuner._local_tuner.get_run_config()


def variant_rng(seed: int | None):
    """The random state Tune's ``BasicVariantGenerator(random_state=seed)`` holds, for ``generate_variants``."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng

    return _BackwardsCompatibleNumpyRng(seed)


def validate_launcher_config(raw: dict) -> dict:
    """A cluster launcher YAML (parsed), Ray's defaults filled in, checked by Ray's own schema as ``ray up`` does."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(raw)
    validate_config(config)
    return config


def raylet_process(node):
    """The raylet's ``subprocess.Popen`` of one ``ray.cluster_utils.Cluster`` node."""
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process


def dashboard_url() -> str | None:
    """The dashboard's address of the Ray this process is connected to; None or empty when it runs none."""
    import ray._private.worker

    return ray._private.worker.global_worker.node.address_info.get("webui_url")


def token_auth() -> bool:
    """True when the connected Ray authenticates its clients with a token."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN
