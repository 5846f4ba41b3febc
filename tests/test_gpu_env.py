"""The GPU lane checked on the CPU: no silent CPU fallback, zero-GPU work off the GPUs, honest fp32, process-start
determinism, native-only bf16, device-seconds outside Ray, and what the cluster files pin and set."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from cluster.errors import FsweepError
from cluster.gpuenv import ZERO_GPU_HIDES, set_process_env, worker_env
from cluster.ray_internals import tune_console_env
from fsmodels.engine import Runtime, amp_dtype, device_share, require_device, score_loader, train_epoch
from fsmodels.precision import tf32_state, true_fp32

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: the driver pretends a GPU (CUDA_VISIBLE_DEVICES=0 and one declared GPU), starts Ray through
# cluster.connect, and reports what a gpu: 0 Tune trial, a store-build-shaped task (num_cpus=1) and a 0.25-GPU task
# see, plus device_share inside and outside a Ray worker.
ZERO_GPU_PROBE = r"""
import json, os, sys
import ray
from ray import tune
import torch
from cluster.connect import connect
from fsmodels.engine import Runtime, device_share

cuda = Runtime(torch.device("cuda"), None, False)  # a CUDA runtime object; nothing touches a GPU
connect(None, num_cpus=2, num_gpus=1)

def seen():
    return os.environ.get("CUDA_VISIBLE_DEVICES")

def trial(config):
    tune.report({"visible": str(seen()), "share": device_share(cuda)})

@ray.remote(num_cpus=1)
def store_task():
    return seen()

@ray.remote(num_cpus=1, num_gpus=0.25)
def gpu_task():
    return seen(), device_share(cuda)

tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1, "gpu": 0}),
                   run_config=tune.RunConfig(storage_path=sys.argv[1], name="zero", verbose=0))
result = tuner.fit()[0].metrics
visible, share = ray.get(gpu_task.remote())
print("PROBE " + json.dumps({"trial": result["visible"], "trial_share": result["share"], "store": ray.get(store_task.remote()),
                             "gpu_task": visible, "gpu_share": share, "driver_share": device_share(cuda)}))
"""


@pytest.mark.slow  # a Ray start and one Tune trial in a fresh process: ~1 min on 2 shared cores
def test_zero_gpu_trials_and_store_tasks_see_no_gpu_when_the_driver_pretends_one(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": str(ROOT), **tune_console_env(verbose=False)}
    env.pop(ZERO_GPU_HIDES, None)
    done = subprocess.run([sys.executable, "-c", ZERO_GPU_PROBE, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("PROBE "))[6:])
    assert probe["trial"] == "" and probe["store"] == ""  # Ray 2.60 alone would leave them CUDA_VISIBLE_DEVICES=0
    assert probe["gpu_task"] == "0"  # a task given a GPU share still gets its GPU
    assert probe["gpu_share"] == 0.25 and probe["trial_share"] == 1.0 and probe["driver_share"] == 1.0


def test_joining_a_cluster_ships_the_worker_env_either_way(monkeypatch):
    import cluster.connect as connect

    for installed in (False, True):
        monkeypatch.setattr(connect, "installed_as_distribution", lambda: installed)
        env = connect.job_runtime_env()["env_vars"]
        assert env[ZERO_GPU_HIDES] == "1" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_a_trial_asking_for_a_gpu_without_cuda_fails_at_once_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    require_device(0)  # a CPU trial goes on
    with pytest.raises(FsweepError) as caught:
        require_device(0.25)
    line = str(caught.value)
    assert "\n" not in line and "resources.gpu=0.25" in line and "CUDA_VISIBLE_DEVICES='3'" in line
    assert f"CUDA {torch.version.cuda or 'none'}" in line and "driver " in line
    from fsweep.cli import main as fsweep

    cfg = tmp_path / "trial.yaml"
    cfg.write_text("data: {dataset: nowhere, store: nowhere}\nresources: {gpu: 0.5}\n")
    assert fsweep(["train", str(cfg), "--out", str(tmp_path / "out")]) == 2  # before the data is even opened
    assert not (tmp_path / "out").exists()


def test_bf16_only_where_native_else_fp16_with_a_grad_scaler():
    assert amp_dtype(False) == torch.bfloat16  # CPU autocast: bf16
    assert amp_dtype(True, (8, 0)) == amp_dtype(True, (9, 0)) == torch.bfloat16  # A100, H100
    assert amp_dtype(True, (7, 0)) == amp_dtype(True, (7, 5)) == torch.float16  # V100, T4: emulated bf16 only


def test_device_seconds_use_share_one_outside_ray():
    cpu = Runtime(torch.device("cpu"), None, False)
    assert device_share(cpu) == 1.0
    assert device_share(Runtime(torch.device("cuda"), None, False)) == 1.0  # fsweep train: whole GPU, not 0.25


def test_evaluation_and_the_stn_run_without_tf32_and_training_keeps_it():
    from fsmodels.stn import STN

    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.setdefault("train" if self.training else "eval", tf32_state())
            return x.flatten(1).mean(1) * self.w

    before = tf32_state()
    assert "ieee" not in before and False not in before  # torch's defaults allow TF32 convolutions
    rt = Runtime(torch.device("cpu"), torch.bfloat16, False)
    batches = [(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))]
    model, criterion = Probe(), torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, batches, criterion, optimizer, torch.amp.GradScaler("cpu", enabled=False), rt)
    score_loader(model, batches, criterion, rt)
    assert seen["train"] == before and seen["eval"] in (("ieee", "ieee"), (False, False))
    assert tf32_state() == before  # restored after the pass

    stn, inside = STN(), []
    real = stn.theta
    stn.theta = lambda x: (inside.append(tf32_state()), real(x))[1]
    stn(torch.rand(1, 1, 64, 64))
    assert inside == [seen["eval"]] and tf32_state() == before
    with true_fp32():
        with true_fp32():
            pass
        assert tf32_state() == seen["eval"]  # nesting restores the outer setting


def test_process_start_sets_the_cublas_workspace_and_warns_when_cuda_came_first(monkeypatch):
    import cluster.gpuenv as gpuenv

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(gpuenv, "cuda_initialised", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_process_env()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(gpuenv, "cuda_initialised", lambda: True)
    with pytest.warns(RuntimeWarning, match="CUDA was initialised before CUBLAS_WORKSPACE_CONFIG"):
        set_process_env()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting is kept
    assert worker_env()["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    done = subprocess.run([sys.executable, "-c", "import os, sys; from fsweep.cli import main; "
                           "sys.argv=['fsweep','--help']\ntry: main(['--help'])\nexcept SystemExit: pass\n"
                           "print('ENV', os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"],
                          env={k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"},
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "ENV :4096:8" in done.stdout, done.stderr[-2000:]  # fsweep main sets it before parsing anything


def test_cluster_files_pin_the_tested_torch_and_hide_gpus_from_zero_gpu_work():
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    setup = " ".join(launcher["setup_commands"])
    assert f"torch=={torch.__version__.split('+')[0]}" in setup
    for command in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]:
        assert f"{ZERO_GPU_HIDES}=1" in command and "CUBLAS_WORKSPACE_CONFIG=:4096:8" in command
    assert "torch.cuda.is_available()" in " ".join(launcher["worker_setup_commands"])
    text = (ROOT / "cluster" / "kuberay.yaml").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in text
    cluster = [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "RayCluster"][0]["spec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e["value"] for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env[ZERO_GPU_HIDES] == "1" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
