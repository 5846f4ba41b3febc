"""The one place that starts or joins Ray.

- Local (``address`` None or ``local``, no ``RAY_ADDRESS`` set): a private single-node
  Ray whose every service listens on 127.0.0.1 only, with the dashboard off and
  Ray's token authentication left as Ray sets it (Ray 2.60 turns it on for new local
  clusters; ``RAY_AUTH_MODE`` is never touched here).
- ``auto`` (or a ``HOST:PORT`` GCS address) joins the cluster this machine belongs
  to; ``ray://HOST:PORT`` connects a Ray Client. ``RAY_ADDRESS`` (set by
  ``ray job submit``) counts as the address when none is given.
- Joining ships fsweep's packages to the workers in a ``runtime_env`` unless fsweep
  is installed as a regular (non-editable) distribution, which the cluster files do.
- Every worker gets ``cluster.gpuenv.worker_env()``: work given zero GPUs (``gpu: 0``
  trials, store-build tasks) sees no GPU, and ``CUBLAS_WORKSPACE_CONFIG`` is set before
  its first CUDA call. Joining passes them in the job's ``runtime_env``; a local start
  puts them into the environment the new raylet (and so every worker) inherits. The
  cluster files also set them on ``ray start``, for jobs not started by fsweep.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from cluster.errors import FsweepError
from cluster.gpuenv import worker_env

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("preprocessing", "fsmodels", "search", "cluster")
LOCAL_ADDRESSES = (None, "", "local")  # values of ``address`` that start a private Ray


def project_runtime_env() -> dict:
    """A runtime_env that ships fsweep's packages to workers that lack them."""
    return {
        "py_modules": [str(PROJECT_ROOT / name) for name in PACKAGES],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"PYTHONUNBUFFERED": "1", **worker_env()},
    }


def job_runtime_env() -> dict:
    """The runtime_env of a job that joins a cluster: the project's packages unless installed, the worker env."""
    return project_runtime_env() if not installed_as_distribution() else {"env_vars": worker_env()}


def installed_as_distribution() -> bool:
    """True when fsweep was imported from site-packages (a wheel), so cluster nodes have it too."""
    spec = importlib.util.find_spec("fsmodels")
    return spec is not None and "site-packages" in str(spec.origin)


def _start_local(num_cpus: int | None, num_gpus: int | None, log_to_driver: bool) -> None:
    import ray

    from cluster.ray_internals import loopback_only

    for name, value in worker_env().items():  # inherited by the raylet this start launches, so by every worker
        os.environ.setdefault(name, value)
    with loopback_only():  # every service on 127.0.0.1: Ray has no public switch for it
        ray.init(
            address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
            logging_level="WARNING", log_to_driver=log_to_driver,
        )


def _join(address: str, log_to_driver: bool) -> None:
    import ray

    try:
        ray.init(address=address, runtime_env=job_runtime_env(), logging_level="WARNING", log_to_driver=log_to_driver)
    except ConnectionError as exc:  # no cluster there: bad input, so the one-line error, not a traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FsweepError(f"address {address}: cannot join Ray ({reason})") from None


def connect(
    address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None, log_to_driver: bool = True
) -> dict:
    """Start (``address`` None/'local') or join (``auto``, ``HOST:PORT``, ``ray://...``) Ray once per process.

    ``num_cpus``/``num_gpus`` size a local start and are ignored when joining (the
    cluster has its own). ``log_to_driver=False`` keeps the workers' output in their log
    files instead of this console (a quiet sweep). Returns :func:`describe`; prints its summary line when it
    connected. Calling it again while connected changes nothing.
    """
    import ray

    if ray.is_initialized():
        return describe()
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    if address in LOCAL_ADDRESSES:
        _start_local(num_cpus, num_gpus, log_to_driver)
    else:
        _join(address, log_to_driver)
    info = describe()
    print(summary_line(info), file=sys.stderr)
    return info


def describe() -> dict:
    """Alive nodes, CPUs, GPUs and node ids of the connected cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {
        "nodes": len(nodes),
        "cpus": float(total.get("CPU", 0.0)),
        "gpus": float(total.get("GPU", 0.0)),
        "node_ids": [n["NodeID"] for n in nodes],
    }


def summary_line(info: dict) -> str:
    """One line for people: ``ray: 3 nodes, 48 CPUs, 8 GPUs``."""
    return f"ray: {info['nodes']} nodes, {info['cpus']:g} CPUs, {info['gpus']:g} GPUs"
