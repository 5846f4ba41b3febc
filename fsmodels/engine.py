"""Epoch mechanics: device choice, loaders, one training pass, scoring a loader.

On CUDA: AMP (bf16 where the GPU has it natively, compute capability 8.0 or newer; else fp16
with a grad scaler), channels_last, pinned memory and non-blocking copies; losses and scores stay
on the device until the epoch ends, so there is no host sync per step. Evaluation runs in true
fp32 (autocast off and TF32 off: ``fsmodels.precision.true_fp32``), so the scores a trial is
selected by are the exported model's; training keeps cuDNN's TF32 default.
``train.deterministic`` makes reruns bit-identical; otherwise cuDNN autotunes. A trial that asks
for a GPU (``resources.gpu > 0``) and sees none fails at once (``require_device``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from cluster.errors import FsweepError
from cluster.gpuenv import CUBLAS_WORKSPACE, no_cuda_line, set_process_env  # noqa: F401 - CUBLAS_WORKSPACE re-exported
from fsmodels.config import Config
from fsmodels.metrics import auc_score
from fsmodels.model import FsNet
from fsmodels.precision import true_fp32
from preprocessing.vocab import normalise_choice



@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None = full precision
    channels_last: bool


def _auto_toggle(value, name: str) -> str:
    """auto / on / off, with YAML's bare on/off (read as true/false) accepted."""
    if value is True or str(value).lower() == "true":
        return "on"
    return normalise_choice(value, name, ("auto", "on", "off"))


def runtime(cfg: Config) -> Runtime:
    """CUDA when present; AMP and channels_last follow train.amp / train.channels_last (auto = on with CUDA)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    amp = _auto_toggle(cfg.train.amp, "train.amp")
    last = _auto_toggle(cfg.train.channels_last, "train.channels_last")
    use_amp = amp == "on" or (amp == "auto" and cuda)
    dtype = amp_dtype(cuda) if use_amp else None
    return Runtime(device, dtype, last == "on" or (last == "auto" and cuda))


def amp_dtype(cuda: bool, capability: tuple[int, int] | None = None) -> torch.dtype:
    """bf16 where it is native (CPU autocast; CUDA compute capability >= 8.0), else fp16 (with a GradScaler).

    Not ``torch.cuda.is_bf16_supported()``: it also says yes where bf16 is emulated (V100, T4: capability 7.x),
    which runs slower than fp16 there and would leave the fp16 + GradScaler branch dead.
    """
    if not cuda:
        return torch.bfloat16
    major, _ = capability if capability is not None else torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def require_device(gpu: float) -> None:
    """Fail at once, in one line, when ``resources.gpu`` asks for a GPU and torch sees no CUDA device.

    Without it such a trial would train on its CPU threads for hours without a word (a driver older
    than the wheel's CUDA, a CPU-only torch on a GPU node, a masked CUDA_VISIBLE_DEVICES).
    """
    if gpu > 0 and not torch.cuda.is_available():
        raise FsweepError(no_cuda_line(f"resources.gpu={gpu:g}"))


def device_share(rt: Runtime) -> float:
    """The share of its device a trial holds, for device-seconds: Ray's assigned GPU fraction inside a Ray
    worker, else 1 (``fsweep train`` on a GPU holds all of it, whatever ``resources.gpu`` says; a CPU trial
    counts its wall time)."""
    if rt.device.type != "cuda":
        return 1.0
    ray = sys.modules.get("ray")  # never imported here: a trial inside Ray has it loaded already
    if ray is not None and ray.is_initialized():
        try:
            gpu = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        except AssertionError:  # Ray's answer in a driver (not a worker): no assignment, e.g. `fsweep train`
            gpu = 0.0
        if gpu > 0:
            return gpu
    return 1.0


def device_label(rt: Runtime) -> str:
    """The device a trial ran on, for GPU-hours accounting: ``cuda:<GPU name>`` or ``cpu``."""
    if rt.device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(rt.device)}"
    return rt.device.type


def set_determinism(deterministic: bool) -> None:
    """Bit-identical reruns (deterministic algorithms, cuDNN deterministic) or cuDNN autotuning.

    ``warn_only``: the documented exceptions, ops with no deterministic CUDA kernel (the
    backward of ``grid_sample``, used by the STN, and of ``adaptive_avg_pool2d``), warn
    instead of failing the trial; they use atomic adds, so on CUDA those ops may still
    differ in the last bits. On the CPU every op the trial uses is deterministic.
    """
    if deterministic:
        set_process_env()  # CUBLAS_WORKSPACE_CONFIG, read when cuBLAS starts: warns if CUDA started before it
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by timing: not reproducible


def compile_model(model: FsNet, enabled: bool):
    """``torch.compile(model)`` when ``enabled`` (the module to run steps with; ``model`` keeps the state dict)."""
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - any backend failure becomes one line
        raise compile_error(exc) from None


def compile_error(exc: BaseException) -> FsweepError:
    """The one-line error of a torch.compile failure (it surfaces at the first step, not at compile_model)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return FsweepError(f"train.compile: torch.compile failed on this machine ({type(exc).__name__}: {first}); "
                       "set train.compile=off")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle and random ops: resume-safe without saving RNG state."""
    return seed * 100_003 + epoch


def make_loader(dataset, batch_size: int, rt: Runtime, cfg: Config, seed: int | None) -> DataLoader:
    """DataLoader of uint8 batches; shuffled with ``seed`` (None = in order, for evaluation)."""
    shuffle = seed is not None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        drop_last=shuffle and len(dataset) > batch_size,  # no size-1 last batch for BatchNorm
        num_workers=cfg.train.num_workers, pin_memory=rt.device.type == "cuda",
    )


def place_data(rt: Runtime, cfg: Config, *datasets):
    """The datasets as ``ResidentSet``s on the device when together they fit ``train.resident_max_mb``, else as is."""
    from fsmodels.resident import ResidentSet, resident_bytes

    if resident_bytes(*datasets) > cfg.train.resident_max_mb * 2**20:
        return datasets  # too big for the device: the memmap DataLoader path
    return tuple(ResidentSet(data, rt.device) for data in datasets)


def epoch_batches(data, batch_size: int, rt: Runtime, cfg: Config, seed: int | None):
    """One epoch's batches of ``data`` (a ResidentSet or an ArraySet), in the same order either way."""
    from fsmodels.resident import ResidentSet

    if isinstance(data, ResidentSet):
        return data.batches(batch_size, seed)
    return make_loader(data, batch_size, rt, cfg, seed)


def to_input(images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> float in [0, 1] on the device (normalisation happens inside FsNet)."""
    x = images.to(rt.device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


class TrainPass(NamedTuple):
    """What one training pass measured: the mean loss and the AUC of the scores it trained on."""

    loss: float
    auc: float  # running: each batch scored just before its own step (train mode, augmented); under-fitting shows


def train_epoch(model: FsNet, loader: DataLoader, criterion, optimizer, scaler, rt: Runtime) -> TrainPass:
    """One pass over the training set: its mean loss and training AUC (synchronised once, at the end)."""
    model.train()
    total = torch.zeros((), device=rt.device)
    count = 0
    scores, targets = [], []
    for images, labels in loader:
        x = to_input(images, rt)
        y = labels.to(rt.device, non_blocking=True).float()
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.float32, enabled=rt.amp_dtype is not None):
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach() * len(y)
        count += len(y)
        scores.append(logits.detach().float())  # AUC is rank-based: logits rank as probabilities do
        targets.append(y)
    if not scores:
        return TrainPass(float("nan"), float("nan"))
    auc = auc_score(torch.cat(targets).cpu().numpy(), torch.cat(scores).cpu().numpy())
    return TrainPass(float(total) / max(count, 1), auc)


@torch.no_grad()
def score_loader(model: FsNet, loader: DataLoader, criterion, rt: Runtime) -> tuple[np.ndarray, np.ndarray, float]:
    """Evaluate ``model`` over ``loader`` (fp32, no gradients): labels, abnormal probabilities and the mean loss."""
    model.eval()
    scores, targets = [], []
    total = torch.zeros((), device=rt.device)
    for images, labels in loader:
        y = labels.to(rt.device, non_blocking=True).float()
        # fp32 (autocast off): bf16 logits carry 8 bits, enough to reorder close scores and move the AUC;
        # TF32 off too (cuDNN's default for fp32 convolutions on Ampere and newer is TF32, ~1e-3 relative)
        with torch.autocast(rt.device.type, enabled=False), true_fp32():
            logits = model(to_input(images, rt)).float()
        total += criterion(logits, y) * len(y)
        scores.append(torch.sigmoid(logits))
        targets.append(y)
    if not scores:
        return np.zeros(0, dtype=np.int64), np.zeros(0), float("nan")
    y_all = torch.cat(targets).cpu().numpy().astype(np.int64)
    return y_all, torch.cat(scores).cpu().numpy().astype(np.float64), float(total) / len(y_all)
