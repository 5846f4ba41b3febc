"""The one place that starts or joins Ray.

Local by default: a private single-node Ray with the dashboard off and Ray's token
authentication left as Ray sets it (on by default since Ray 2.5x for new local
clusters). ``auto`` joins the cluster this machine belongs to; ``ray://HOST:PORT``
connects a Ray Client. When the project is not installed on the workers, its
packages travel with a ``runtime_env``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("preprocessing", "fsmodels", "search", "cluster")


def project_runtime_env() -> dict:
    """A runtime_env that ships fsweep's packages to workers that lack them."""
    return {
        "py_modules": [str(PROJECT_ROOT / name) for name in PACKAGES],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def _installed_as_distribution() -> bool:
    """True when fsweep came from a wheel (not this source tree); workers then have it too."""
    spec = importlib.util.find_spec("fsmodels")
    return spec is not None and "site-packages" in str(spec.origin)


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Start (``address`` None/'local') or join (``auto``, ``ray://...``) Ray once per process.

    Returns :func:`describe`. Calling it again while connected changes nothing.
    """
    import ray

    if not ray.is_initialized():
        common = {"log_to_driver": True, "logging_level": "WARNING", "configure_logging": True}
        if address in (None, "", "local"):
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
        else:
            runtime_env = None if _installed_as_distribution() else project_runtime_env()
            ray.init(address=address, runtime_env=runtime_env, **common)
    return describe()


def describe() -> dict:
    """Alive nodes, CPUs and GPUs of the connected cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return {
        "nodes": len(nodes),
        "cpus": float(total.get("CPU", 0.0)),
        "gpus": float(total.get("GPU", 0.0)),
        "node_ids": [n["NodeID"] for n in nodes],
    }


def local_cpu_budget() -> int:
    """CPUs this process may hand to Ray locally (honours cgroup/affinity limits)."""
    return max(1, len(os.sched_getaffinity(0)))
