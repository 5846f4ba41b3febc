"""GPU lane (issues 14, 20): model step rate, trial-loop efficiency, trials packed per device, projected GPU-hours.

On a GPU: ResNet50 at 512 px. On the CPU (only with --cpu where nvidia-smi exists): a tiny stand-in
(resnet10t at 64 px), and the paper backbones at 32-64 px scaled to 512 px by pixels. The trials' own
settings apply: their runtime (AMP bf16 where native, else fp16; channels_last) and cuDNN settings
(``benchmark`` on unless ``train.deterministic``). Printed, in this order:
- model step img/s at batch 4 and 32, fp32 NCHW vs AMP + channels_last (``amp_speedup_x``: the batch-4 ratio);
- the trial loop's img/s over the model step's (``pipeline_efficiency``): run_trial's loop (resident uint8
  data, per-epoch shuffle, gather + cross-view flip + normalise, ``engine.train_epoch``, scheduler step)
  against forward + backward + SGD on one ready batch; the memmap DataLoader path too;
- with ``--compile``: ``torch.compile``'s compile time and step rate against eager;
- packing: aggregate img/s of 1, 2 and 4 batch-4 trial loops as separate processes on one device, all
  given one shared start and deadline (``packing_4_x``), printed before anything MPS does;
- the vmap fusion probe: 4 trials fused into one program (``torch.func.stack_module_state`` + ``vmap``)
  against the 4 packed processes;
- on a GPU, packing under CUDA MPS: a running daemon, or with ``--mps`` one started in this run's own
  pipe/log directories; timeouts on every wait, never fatal (the cluster files do not run MPS by default);
- every paper backbone's training rate (fine-tuned and frozen) and fp32 evaluation rate at 512 px batch 4;
- ``paper_tables_gpu_hours``: the 87 trials ``fsweep plan`` lists for configs/paper_table3..6.yaml, on the
  paper's data shape (798 patients, 60/20/20; Flip doubles the training images), each at its backbone's
  fine-tuned or frozen rate plus its validation passes, divided by the packing gain of the trials that
  share a GPU on the worker the cluster files deploy (headline: cluster/ray-cluster.yaml's g5.xlarge).
On the CPU every process runs one torch thread and in-process rates are timed in CPU time; packing is timed
in wall time. Last line: ``pipeline_efficiency=.. amp_speedup_x=.. packing_4_x=.. paper_tables_gpu_hours=..``.
Usage: ``python bench/gpu.py [--quick] [--mps] [--compile] [--cpu]`` (a GPU's --quick: within 3 minutes).
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cluster.gpuenv import no_cuda_line
from fsmodels.config import load_config
from fsmodels.engine import (
    Runtime,
    compile_model,
    epoch_batches,
    place_data,
    runtime,
    set_determinism,
    to_input,
    train_epoch,
)
from fsmodels.model import build_model
from fsmodels.train import make_optimizer, make_scheduler
from preprocessing.loader import ArraySet, Part

PAPER_CONFIGS = tuple(Path(__file__).resolve().parents[1] / "configs" / f"paper_table{t}.yaml" for t in (3, 4, 5, 6))
PAPER_PATIENTS, PAPER_SPLIT = 798, (0.6, 0.2, 0.2)  # the paper's data: 798 patients x 2 views, 60/20/20
PAPER_BACKBONES = ("resnet50", "resnext50", "wide_resnet50", "res2net101", "vgg16", "vgg19")
TRIAL_BATCH = 4  # the paper's batch size: what packed trials run
# Forward GFLOPs at 224 px (timm's model cards): only the CPU --quick stand-in scales rates by them
GFLOPS_224 = {"resnet50": 4.1, "resnext50": 4.3, "wide_resnet50": 11.4, "res2net101": 8.1, "vgg16": 15.5,
              "vgg19": 19.6}
# What the cluster files deploy per GPU worker: (vCPUs, GPUs). g5.xlarge: 4 vCPUs, one A10G (AWS's figures);
# the KubeRay GPU group requests 8 CPUs and one GPU.
DEPLOYED = {"cluster/ray-cluster.yaml (g5.xlarge)": (4, 1), "cluster/kuberay.yaml": (8, 1)}
DEFAULTS = load_config(None)  # the trial's defaults: optimizer, schedule, loader settings, determinism


def setting(cuda: bool, quick: bool) -> dict:
    """Model, size and loop lengths: the real thing on a GPU (``quick``: within 3 minutes), a stand-in on the CPU."""
    if cuda:
        return dict(backbone="resnet50", size=512, images=128 if quick else 256, rounds=2 if quick else 3,
                    seconds=8.0 if quick else 20.0, rate_size=512, rate_steps=6 if quick else 12,
                    probe_steps=3 if quick else 8, ready_timeout=180.0)
    return dict(backbone="resnet10t", size=64, images=64 if quick else 128, rounds=2 if quick else 3,
                seconds=1.5 if quick else 4.0, rate_size=32 if quick else 64, rate_steps=1 if quick else 2,
                probe_steps=1 if quick else 2, ready_timeout=300.0, flops_standin=quick)


def trial_runtime(amp: bool | None, channels_last: bool | None) -> Runtime:
    """The trial runtime (None = the trial's own default: on with CUDA) with AMP / channels_last forced if given."""
    flags = {"amp": amp, "channels_last": channels_last}
    return runtime(load_config(None, [f"train.{k}={'auto' if v is None else 'on' if v else 'off'}"
                                      for k, v in flags.items()]))


def fresh_model(backbone: str, rt: Runtime):
    """An FsNet (random weights) on the runtime's device, its SGD optimizer and BCE loss."""
    torch.manual_seed(0)
    model = build_model(backbone, "none", True).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, make_optimizer(DEFAULTS, model, DEFAULTS.space.lr), nn.BCEWithLogitsLoss()


def sync(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.synchronize()


def clock(rt: Runtime):
    """The timer of one process's own rate: wall time on a GPU; on the CPU this process's CPU time, so other
    work on a shared machine does not count (one torch thread: CPU time is the time computing)."""
    return time.perf_counter if rt.device.type == "cuda" or torch.get_num_threads() > 1 else time.process_time


def model_step_rate(model, optimizer, criterion, rt: Runtime, size: int, batch: int, steps: int) -> float:
    """img/s of forward + backward + SGD on one ready float batch (the model's own speed), after a warm-up step."""
    x = to_input(torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=rt.device), rt)
    y = torch.randint(0, 2, (batch,), device=rt.device).float()
    model.train()

    def step():
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    sync(rt)
    timer = clock(rt)
    start = timer()
    for _ in range(steps):
        step()
    sync(rt)
    return steps * batch / (timer() - start)


def synthetic_set(images: int, size: int) -> ArraySet:
    """A two-view training set as run_trial sees it with Flip: each view plus the other view mirrored."""
    rng = np.random.default_rng(0)
    half = images // 4
    parts = []
    for view in ("right", "left"):
        arr = rng.integers(0, 256, (half, size, size), dtype=np.uint8)
        ids = tuple(f"{view}{i}" for i in range(half))
        labels = rng.integers(0, 2, half).astype(np.int64)
        parts.append(Part(images=arr, labels=labels, image_ids=ids, mirrored=False))
    parts += [Part(images=p.images, labels=p.labels, image_ids=p.image_ids, mirrored=True) for p in parts]
    return ArraySet(parts)


def loop_rate(model, optimizer, criterion, rt: Runtime, data, batch: int, epochs: int = 0,
              seconds: float = 0.0) -> float:
    """img/s of run_trial's training loop (epoch batches + train_epoch + scheduler step): ``epochs`` epochs
    timed by ``clock``, or as many as fit in ``seconds`` of wall time (a packed worker: wall-time rate)."""
    scheduler = make_scheduler(DEFAULTS, optimizer, DEFAULTS.space.epochs)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    sync(rt)
    timer = time.perf_counter if seconds else clock(rt)
    start, seen, epoch = timer(), 0, 0
    while epoch < epochs or timer() - start < seconds:
        batches = epoch_batches(data, batch, rt, DEFAULTS, seed=epoch)
        train_epoch(model, batches, criterion, optimizer, scaler, rt)  # synchronises once, at its end
        scheduler.step()
        seen, epoch = seen + len(batches) * batch, epoch + 1
    return seen / (timer() - start)


def pipeline(s: dict, rt: Runtime) -> tuple[float, float, float]:
    """(model step img/s, resident loop img/s, DataLoader loop img/s), best of interleaved rounds (``clock``)."""
    host = synthetic_set(s["images"], s["size"])
    (resident,) = place_data(rt, DEFAULTS, host)
    model, optimizer, criterion = fresh_model(s["backbone"], rt)
    steps = len(resident) // TRIAL_BATCH
    loop_rate(model, optimizer, criterion, rt, resident, TRIAL_BATCH, 1)  # warm-up (allocator, kernels)
    best = [0.0, 0.0, 0.0]
    for _ in range(s["rounds"]):  # interleaved, best of: other load on the machine only ever slows a round down
        best[0] = max(best[0], model_step_rate(model, optimizer, criterion, rt, s["size"], TRIAL_BATCH, steps))
        best[1] = max(best[1], loop_rate(model, optimizer, criterion, rt, resident, TRIAL_BATCH, 1))
        best[2] = max(best[2], loop_rate(model, optimizer, criterion, rt, host, TRIAL_BATCH, 1))
    return tuple(best)


def amp_rates(s: dict, steps: int) -> dict:
    """Model step img/s per (batch, mode): fp32 NCHW and bf16 autocast + channels_last."""
    rates = {}
    for batch in (4, 32):
        for mode, amp in (("fp32", False), ("bf16+cl", True)):
            rt = trial_runtime(amp, amp)
            model, optimizer, criterion = fresh_model(s["backbone"], rt)
            rates[batch, mode] = model_step_rate(model, optimizer, criterion, rt, s["size"], batch,
                                                 max(2, steps * 4 // batch))
    return rates


def compile_rates(s: dict, rt: Runtime, steps: int) -> tuple[float, float, float]:
    """(compile seconds, eager img/s, compiled img/s) of the batch-4 model step."""
    model, optimizer, criterion = fresh_model(s["backbone"], rt)
    eager = model_step_rate(model, optimizer, criterion, rt, s["size"], TRIAL_BATCH, steps)
    compiled = compile_model(model, True)
    start = time.perf_counter()
    model_step_rate(compiled, optimizer, criterion, rt, s["size"], TRIAL_BATCH, 0)  # the first step compiles
    seconds = time.perf_counter() - start
    return seconds, eager, model_step_rate(compiled, optimizer, criterion, rt, s["size"], TRIAL_BATCH, steps)




def backbone_rates(s: dict, rt: Runtime, backbones=PAPER_BACKBONES) -> dict:
    """Per paper backbone at batch 4: training img/s fine-tuned and frozen (the trial's runtime) and fp32
    evaluation img/s (TF32 off, as ``engine.score_loader``), at ``s['rate_size']`` px, scaled to 512 px by pixels.

    On a GPU that size is 512 (measured as is); on the CPU a small size stands in, said so in the output.
    """
    size, steps = s["rate_size"], s["rate_steps"]
    scale = (size / 512) ** 2
    rates = {}
    if s.get("flops_standin"):  # CPU --quick: one measured ResNet50, the rest by published FLOPs (said so)
        measured = backbone_rates({**s, "flops_standin": False}, rt, ("resnet50",))
        for name in backbones:
            ratio = GFLOPS_224[name] / GFLOPS_224["resnet50"]
            rates.update({(name, key): measured["resnet50", key] / ratio for key in (True, False, "eval")})
        return rates
    for name in backbones:
        for finetune in (True, False):
            torch.manual_seed(0)
            model = build_model(name, "none", finetune).to(rt.device)
            if rt.channels_last:
                model = model.to(memory_format=torch.channels_last)
            optimizer = make_optimizer(DEFAULTS, model, DEFAULTS.space.lr)
            rates[name, finetune] = model_step_rate(model, optimizer, nn.BCEWithLogitsLoss(), rt, size, TRIAL_BATCH,
                                                    steps) * scale
        rates[name, "eval"] = eval_rate(model, rt, size, steps) * scale
        del model, optimizer
    return rates


def eval_rate(model, rt: Runtime, size: int, steps: int, batch: int = 32) -> float:
    """img/s of run_trial's evaluation forward (autocast off, TF32 off) at the evaluation batch."""
    from fsmodels.precision import true_fp32

    x = to_input(torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=rt.device), rt)
    model.eval()
    with torch.no_grad(), torch.autocast(rt.device.type, enabled=False), true_fp32():
        model(x)
        sync(rt)
        timer = clock(rt)
        start = timer()
        for _ in range(max(1, steps // 4)):
            model(x)
        sync(rt)
    return max(1, steps // 4) * batch / (timer() - start)


def paper_rows() -> pd.DataFrame:
    """A dataset index shaped like the paper's (798 patients, both views, patient-level 60/20/20)."""
    n_train, n_val = (round(PAPER_PATIENTS * f) for f in PAPER_SPLIT[:2])
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (PAPER_PATIENTS - n_train - n_val)
    return pd.DataFrame({"view": ["left", "right"] * PAPER_PATIENTS, "split": [s for s in split for _ in (0, 1)]})


def paper_plan_work(configs=PAPER_CONFIGS, rows: pd.DataFrame | None = None) -> list[dict]:
    """Every trial ``fsweep plan`` lists for the paper configs, with what it costs per epoch on the paper's data:
    backbone, finetune, epochs, training images (Flip doubles: the other view mirrored) and validation images,
    and the config's ``resources`` (cpu, gpu)."""
    from preprocessing.vocab import VIEWS
    from search.plan import planned_trials, train_images

    rows = paper_rows() if rows is None else rows
    val = rows[rows["split"] == "val"]
    work = []
    for path in configs:
        cfg = load_config(path)
        for trial in planned_trials(cfg):
            views = VIEWS if trial["view"] == "both" else (trial["view"],)
            work.append(dict(table=Path(path).stem, backbone=trial["backbone"], finetune=bool(trial["finetune"]),
                             epochs=int(trial["epochs"]), train=train_images(rows, trial["view"], trial["flip"],
                                                                             trial["fold"]),
                             val=int(val["view"].isin(views).sum()), cpu=cfg.resources.cpu, gpu=cfg.resources.gpu))
    return work


def trials_per_gpu(cpus: int, gpus: int, cpu: float, gpu: float) -> int:
    """How many trials of ``cpu`` CPUs and ``gpu`` GPU share one GPU of a worker with ``cpus`` and ``gpus``."""
    by_gpu = int(round(1 / gpu)) if gpu > 0 else 1
    return max(1, min(int(cpus // cpu) // max(gpus, 1), by_gpu))


def projected_gpu_hours(work: list[dict], rates: dict, efficiency: float, packing: dict[int, float],
                        worker: tuple[int, int]) -> float:
    """GPU-hours the trials hold on workers of ``worker`` (vCPUs, GPUs): per trial, epochs x (training images at
    its backbone's fine-tuned or frozen rate / the loop efficiency + validation images at the fp32 evaluation
    rate), divided by the packing gain of the n trials that really share a GPU there (``packing[n]``: aggregate
    over one trial, measured; n the largest measured count not above what fits)."""
    hours = 0.0
    for trial in work:
        seconds = trial["epochs"] * (trial["train"] / (rates[trial["backbone"], trial["finetune"]] * efficiency)
                                     + trial["val"] / rates[trial["backbone"], "eval"])
        n = trials_per_gpu(*worker, trial["cpu"], trial["gpu"])
        gain = packing[max(k for k in packing if k <= n)]
        hours += seconds / gain / 3600  # n trials run side by side at `gain` times one trial's speed
    return hours


def vmap_probe(s: dict, rt: Runtime, n: int) -> float:
    """img/s of ``n`` batch-4 trials fused into one program: ``torch.func.stack_module_state`` + ``vmap`` of
    forward + backward, one SGD step over the stacked weights. BatchNorm runs without running statistics
    (``replace_all_batch_norm_modules_``: vmap cannot update them in place), so it is a throughput probe only."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, stack_module_state, vmap

    torch.manual_seed(0)
    models = [replace_all_batch_norm_modules_(build_model(s["backbone"], "none", True)).to(rt.device)
              for _ in range(n)]
    params, buffers = stack_module_state(models)
    base = models[0].to("meta")
    x = torch.rand(n, TRIAL_BATCH, 1, s["size"], s["size"], device=rt.device)
    y = torch.randint(0, 2, (n, TRIAL_BATCH), device=rt.device).float()

    def loss(p, b, xb, yb):
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
            logits = functional_call(base, (p, b), (xb,))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), yb)

    step_grad = vmap(grad(loss), in_dims=(0, 0, 0, 0))

    def step():
        grads = step_grad(params, buffers, x, y)
        with torch.no_grad():
            for key, value in params.items():
                value.sub_(grads[key], alpha=DEFAULTS.space.lr)

    step()
    sync(rt)
    steps = s["probe_steps"]
    timer = clock(rt)
    start = timer()
    for _ in range(steps):
        step()
    sync(rt)
    return n * TRIAL_BATCH * steps / (timer() - start)


def deadline_batches(batches, end: float, now=time.time):
    """``batches`` until the shared deadline ``end`` (wall clock, the same for every packed worker)."""
    for batch in batches:
        if now() >= end:
            return
        yield batch


def aggregate_rate(reports: list[tuple[int, float]], start: float) -> float:
    """Aggregate img/s of packed workers that all began at ``start``: their images over the shared window, which
    lasts until the last one finished (its queued steps included). Not the sum of per-worker rates: a worker
    that ran part of its window alone would count that part as if it had shared the GPU."""
    images = sum(count for count, _ in reports)
    return images / (max(done for _, done in reports) - start)


def worker(s: dict) -> None:
    """One packed 'trial': build, warm up, print READY; per ``GO start end`` line wait for ``start``, train until
    ``end`` (both wall clock, shared by all workers), print ``RATE images finished``."""
    set_determinism(DEFAULTS.train.deterministic)  # the trials' cuDNN settings (benchmark on unless deterministic)
    rt = trial_runtime(None, None)
    (data,) = place_data(rt, DEFAULTS, synthetic_set(s["images"], s["size"]))
    model, optimizer, criterion = fresh_model(s["backbone"], rt)
    loop_rate(model, optimizer, criterion, rt, data, TRIAL_BATCH, 1)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    print("READY", flush=True)
    for line in sys.stdin:  # stdin closed (or any other line): done
        parts = line.split()
        if not parts or parts[0] != "GO":
            break
        start, end = float(parts[1]), float(parts[2])
        time.sleep(max(0.0, start - time.time()))
        images, epoch = 0, 0
        while time.time() < end:
            counted = []
            batches = (counted.append(len(b[1])) or b
                       for b in deadline_batches(epoch_batches(data, TRIAL_BATCH, rt, DEFAULTS, seed=epoch), end))
            train_epoch(model, batches, criterion, optimizer, scaler, rt)  # synchronises at its end
            images, epoch = images + sum(counted), epoch + 1
        sync(rt)
        print(f"RATE {images} {time.time():.6f}", flush=True)


class Worker:
    """A packed worker process whose output lines arrive through a queue, so every wait has a timeout."""

    def __init__(self, cmd: list[str], env: dict | None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The next line starting with ``prefix``; RuntimeError when the worker exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"packing: no {prefix} from a worker in {timeout:.0f} s") from None
            if line is None:
                raise RuntimeError(f"packing: a worker exited with {self.proc.wait()}")
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def packed(counts: tuple[int, ...], args, s: dict, env: dict | None = None) -> dict[int, float]:
    """Aggregate img/s of n worker processes on one device for each n in ``counts``, over one shared window.

    The workers start once (imports and warm-up in parallel) and stay; each round tells the first n the same
    start and end time.
    """
    cmd = [sys.executable, __file__, "--worker", *(["--quick"] if args.quick else []), *(["--cpu"] if args.cpu else [])]
    if env is None and not torch.cuda.is_available():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as a CPU trial: resources.cpu = 1 thread
    workers = [Worker(cmd, env) for _ in range(max(counts))]
    try:
        for w in workers:
            w.expect("READY", s["ready_timeout"])
        aggregate = {}
        for n in counts:
            start = time.time() + 1.0  # every worker has its GO line before the window opens
            for w in workers[:n]:
                w.send(f"GO {start:.6f} {start + s['seconds']:.6f}")
            reports = [w.expect("RATE", s["seconds"] + s["ready_timeout"]).split()[1:] for w in workers[:n]]
            aggregate[n] = aggregate_rate([(int(c), float(t)) for c, t in reports], start)
        return aggregate
    finally:
        for w in workers:
            w.close()


def mps_running(pipe_dir: str | None = None) -> bool:
    """Whether a CUDA MPS control daemon answers in ``pipe_dir`` (default: its environment's or /tmp/nvidia-mps)."""
    return Path(pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control").exists()


def mps_packing(args, s: dict) -> tuple[dict, str]:
    """Aggregate img/s of 1 and 4 trials under CUDA MPS, and what happened; never raises.

    A daemon that already runs is used as it is; with ``--mps`` one is started in this run's own pipe and log
    directories (a temp folder: no clash with another user's daemon, always writable) and stopped afterwards.
    """
    control = shutil.which("nvidia-cuda-mps-control")
    if mps_running():
        try:
            return packed((1, 4), args, s), "the running daemon"
        except (RuntimeError, OSError) as exc:
            return {}, f"failed under the running daemon ({exc})"
    if not args.mps:
        return {}, "not running (--mps starts one)"
    if control is None:
        return {}, "nvidia-cuda-mps-control not found"
    with tempfile.TemporaryDirectory(prefix="fsweep-mps-") as tmp:
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": f"{tmp}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{tmp}/log"}
        for sub in ("pipe", "log"):
            Path(tmp, sub).mkdir()
        try:
            subprocess.run([control, "-d"], env=env, check=True, timeout=30, capture_output=True)
            return packed((1, 4), args, s, env=env), f"started in {tmp}"
        except (subprocess.SubprocessError, RuntimeError, OSError) as exc:
            return {}, f"failed ({type(exc).__name__}: {str(exc)[:120]})"
        finally:
            subprocess.run([control], input="quit\n", text=True, env=env, check=False, timeout=30,
                           capture_output=True)


def check_device(cuda: bool, allow_cpu: bool) -> None:
    """Refuse the CPU branch where a GPU should be (``nvidia-smi`` exists) unless ``--cpu`` says so: a CPU
    projection must never pass for a GPU figure (a driver older than torch's CUDA, a CPU-only torch)."""
    if not cuda and not allow_cpu and shutil.which("nvidia-smi"):
        raise SystemExit("bench/gpu.py: " + no_cuda_line("nvidia-smi is installed") + "; pass --cpu for the CPU branch")


def main() -> None:
    """Run every measurement, print one line each, then the headline line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer images, rounds and steps")
    parser.add_argument("--mps", action="store_true", help="on a GPU, start a CUDA MPS daemon for the packed run")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes on a CPU)")
    parser.add_argument("--cpu", action="store_true", help="allow the CPU branch on a machine with nvidia-smi")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    check_device(cuda, args.cpu)
    s = setting(cuda, args.quick)
    if not cuda:
        torch.set_num_threads(1)  # what run_trial gives a CPU trial with the default resources.cpu = 1
    if args.worker:
        return worker(s)
    set_determinism(DEFAULTS.train.deterministic)  # the trials' cuDNN settings: benchmark on unless deterministic
    started = time.perf_counter()
    rt = trial_runtime(None, None)
    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device={device} model={s['backbone']} size={s['size']} trial runtime: amp={rt.amp_dtype} "
          f"channels_last={rt.channels_last} cudnn.benchmark={torch.backends.cudnn.benchmark} quick={args.quick}")

    steps = len(synthetic_set(s["images"], s["size"])) // TRIAL_BATCH
    rates = amp_rates(s, steps)
    for batch in (4, 32):
        fp32, amp = rates[batch, "fp32"], rates[batch, "bf16+cl"]
        print(f"model step {s['backbone']} {s['size']}px batch {batch}: fp32 {fp32:.1f} img/s, "
              f"AMP + channels_last {amp:.1f} img/s (x{amp / fp32:.2f})")
    amp_x = rates[4, "bf16+cl"] / rates[4, "fp32"]

    step, resident, loader = pipeline(s, rt)
    efficiency = resident / step
    print(f"trial loop batch 4: model step {step:.1f} img/s, resident loop {resident:.1f} img/s "
          f"(efficiency {efficiency:.3f}), memmap DataLoader loop {loader:.1f} img/s (efficiency {loader / step:.3f})")

    if args.compile:
        seconds, eager, compiled = compile_rates(s, rt, steps)
        print(f"torch.compile {s['backbone']} batch 4: compile (first step) {seconds:.1f} s, eager {eager:.1f} img/s, "
              f"compiled {compiled:.1f} img/s (x{compiled / eager:.2f})")

    plain = packed((1, 2, 4), args, s)
    for n, rate in plain.items():  # printed before MPS: a failing MPS phase cannot lose them
        print(f"packing: {n} batch-4 trial(s) as processes, one shared window: aggregate {rate:.1f} img/s "
              f"(x{rate / plain[1]:.2f})", flush=True)
    fused = vmap_probe(s, rt, 4)
    print(f"vmap fusion probe: 4 {s['backbone']} batch-4 trials in one program {fused:.1f} img/s vs 4 packed "
          f"processes {plain[4]:.1f} img/s (x{fused / plain[4]:.2f}; BatchNorm without running stats)", flush=True)
    if cuda:
        mps, how = mps_packing(args, s)
        for n, rate in mps.items():
            print(f"packing under CUDA MPS ({how}): {n} trial(s): aggregate {rate:.1f} img/s (x{rate / mps[1]:.2f})")
        if not mps:
            print(f"CUDA MPS: {how}; the cluster files do not run it by default")
    else:
        print(f"CPU: {os.cpu_count()} cores shared by the packed processes, so packing cannot exceed what the "
              "cores allow; CUDA MPS not tried; the GPU figure is not measured here")
    pack_x = plain[4] / plain[1]  # the headline: plain processes, what the cluster files deploy

    backbone = backbone_rates(s, rt)
    for name in PAPER_BACKBONES:
        print(f"backbone {name} 512px batch 4: fine-tuned {backbone[name, True]:.2f} img/s, frozen "
              f"{backbone[name, False]:.2f} img/s, fp32 evaluation {backbone[name, 'eval']:.2f} img/s"
              + ("" if s["rate_size"] == 512 else f" (CPU: measured at {s['rate_size']} px, scaled by pixels"
                 + (", other backbones by their FLOPs)" if s.get("flops_standin") else ")")))
    work = paper_plan_work()
    packing_x = {n: rate / plain[1] for n, rate in plain.items()}
    label = "GPU" if cuda else "CPU projection (not a GPU figure)"
    hours = {}
    for name, deployed in DEPLOYED.items():
        hours[name] = projected_gpu_hours(work, backbone, min(efficiency, 1.0), packing_x, deployed)
        per_gpu = {trials_per_gpu(*deployed, t["cpu"], t["gpu"]) for t in work}
        print(f"paper Tables 3-6 from `fsweep plan` ({len(work)} trials, "
              f"{sum(t['epochs'] * t['train'] for t in work)} training + {sum(t['epochs'] * t['val'] for t in work)} "
              f"validation image-epochs) on {name}: {sorted(per_gpu)} trial(s) per GPU: {hours[name]:.2f} {label} "
              "GPU-hours")
    print(f"bench time {time.perf_counter() - started:.0f} s")
    print(f"pipeline_efficiency={efficiency:.3f} amp_speedup_x={amp_x:.2f} packing_4_x={pack_x:.2f} "
          f"paper_tables_gpu_hours={hours[next(iter(DEPLOYED))]:.2f}")


if __name__ == "__main__":
    main()
