"""The process environment GPU work relies on, set before anything touches CUDA.

- ``CUBLAS_WORKSPACE_CONFIG``: cuBLAS reads it once, when its first handle is created, so
  ``train.deterministic`` can only make GEMMs reproducible if it is in the environment before
  the first CUDA matmul of the process (a frozen STN pretrained before the trial, a benchmark).
  ``set_process_env`` sets it at process start (``fsweep`` main) and ``worker_env`` puts it into
  every Ray worker's environment. Its cost is a fixed 8 x 4 MiB cuBLAS workspace per stream.
- ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``: in Ray 2.60 a task or actor given zero GPUs keeps the
  node's ``CUDA_VISIBLE_DEVICES`` and so sees every GPU; with this variable Ray's worker process sets
  ``CUDA_VISIBLE_DEVICES=""`` for it when it assigns the visible accelerators. So ``gpu: 0``
  trials and the store-build tasks never touch a GPU outside Ray's accounting.
- ``no_cuda_line``: the one line a trial that asked for a GPU and sees none fails with.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

CUBLAS_WORKSPACE = ":4096:8"  # the cuBLAS workspace setting that makes its GEMMs deterministic (CUDA docs)
ZERO_GPU_HIDES = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"  # Ray's switch: zero GPUs -> CUDA_VISIBLE_DEVICES=""


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker of an fsweep job gets (``runtime_env["env_vars"]``)."""
    return {ZERO_GPU_HIDES: "1", "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)}


def cuda_initialised() -> bool:
    """Whether this process has created its CUDA context already (torch imported and initialised)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def set_process_env() -> None:
    """Put ``CUBLAS_WORKSPACE_CONFIG`` into this process's environment; warn when CUDA started before it."""
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    if cuda_initialised():
        warnings.warn("CUDA was initialised before CUBLAS_WORKSPACE_CONFIG was set: cuBLAS GEMMs of this process "
                      "may not be deterministic (set it in the environment, or start through `fsweep`)",
                      RuntimeWarning, stacklevel=2)


def driver_version() -> str:
    """The NVIDIA driver's version from ``nvidia-smi`` ('no nvidia-smi' when it is not installed)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed ({type(exc).__name__})"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else f"nvidia-smi exit {out.returncode}"


def no_cuda_line(asked: str) -> str:
    """The one-line reason a GPU run cannot go on: torch's CUDA build, the driver and the visible devices."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{asked} but torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none (a CPU build)'}; driver {driver_version()}; CUDA_VISIBLE_DEVICES="
            f"{'unset' if visible is None else repr(visible)})")
