"""One trial: the paper's training protocol on one store variant, resumable, with honest metrics.

``run_trial`` is what ``fsweep train`` runs and what the sweep wraps in a Ray
Tune trainable. Per epoch it trains, scores the validation split (abnormal =
positive, threshold 0.5, Youden's threshold recorded), writes a checkpoint
directory and calls ``on_epoch(metrics, checkpoint_dir)``. The best epoch by
``search.metric`` is kept; ``train.test`` scores it on the test split with
patient-level bootstrap 95 % intervals at the validation threshold (Youden's J on the
best epoch's validation ROC). With ``train.best_scores`` every new best epoch also
scores the test split and writes ``best_scores.parquet`` (per image: split, patient,
label, score), which the sweep report reads; nothing selects on it. On CUDA: AMP (bf16 where supported), channels_last,
pinned memory, non-blocking copies and no host sync inside an epoch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cluster.errors import FsweepError
from fsmodels.backbones import resolve_backbone, weights_file
from fsmodels.checkpoint import (
    CheckpointWriter,
    checkpoint_config,
    checkpoint_epochs,
    cpu_copy,
    load_best_weights,
    load_resumable_state,
    load_state,
    plain,
    prune_checkpoints,
    recorded_variant,
)
from fsmodels.config import Config, asha_settings, config_from_dict, save_config
from fsmodels.engine import (
    Runtime,
    compile_error,
    compile_model,
    device_label,
    device_share,
    epoch_batches,
    epoch_seed,
    make_loader,
    place_data,
    predict,
    require_device,
    runtime,
    seed_everything,
    set_determinism,
    train_epoch,
)
from fsmodels.metrics import (
    FIT_METRICS,
    SELECTABLE_METRICS,
    all_finite,
    auc_interval,
    SPLIT_METRICS,
    binary_metrics,
    bootstrap_ci,
    json_safe,
)
from fsmodels.model import FsNet, build_model, model_skeleton
from fsmodels.params import TrialParams, open_artifacts, trial_handles, trial_params

__all__ = ["run_trial", "evaluate_checkpoint", "load_trial_model", "trial_params"]
REPORTED = SPLIT_METRICS  # metrics.json val/test keys
BEST_SCORES = "best_scores.parquet"  # the best epoch's per-image val and test scores (train.best_scores)
EVAL_BATCH = 32  # evaluation batch size floor (no gradients: larger batches are cheap and change nothing)
EpochCallback = Callable[[dict, Path | None], None]
BestCallback = Callable[[int, np.ndarray, np.ndarray], None]  # (epoch, validation labels, scores)


@dataclass
class TrainingState:
    """What changes from epoch to epoch (and what a checkpoint restores)."""

    history: list  # one dict per finished epoch
    best_epoch: int = 0  # epoch of the best ``search.metric`` so far (0 = none yet)
    best_value: float | None = None  # its value
    best_model: dict | None = None  # its model state dict (CPU)
    last_epoch: int = 0  # the last finished epoch
    checkpoint: Path | None = None  # directory of the last checkpoint
    device_seconds: float = 0.0  # seconds x device share of earlier attempts (restored on resume)


def class_pos_weight(labels: np.ndarray, weighted: bool) -> float:
    """BCE pos_weight = n_normal / n_abnormal of the training set (the paper's class weights), or 1."""
    n_pos = int((labels == 1).sum())
    n_neg = int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise FsweepError(f"training set has {n_pos} abnormal and {n_neg} normal images: both classes are needed")
    return n_neg / n_pos if weighted else 1.0


def make_optimizer(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (paper) or AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer.lower() == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, epochs: int):
    """StepLR(step_size, gamma) (paper: 7, 0.1) or cosine over the trial's epochs; stepped once per epoch."""
    if cfg.train.schedule.lower() == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.train.step_size, gamma=cfg.train.gamma)


def split_metrics(labels: np.ndarray, scores: np.ndarray, loss: float) -> dict:
    """binary_metrics plus the loss."""
    return {**binary_metrics(labels, scores), "loss": loss}


def best_entry(history: list, best_epoch) -> dict:
    """The history entry of epoch ``best_epoch`` ({} when there is none, e.g. before the first best epoch)."""
    return next((h for h in history if h.get("epoch") == best_epoch), {})


def epoch_report(epoch: int, run: TrainingState, metric: str, diverged: bool) -> dict:
    """The dict ``on_epoch`` receives (from epoch ``epoch``'s history entry); Ray Tune reports it as is, so its
    keys are the sweep's result columns.

    ``val_*`` and ``train_*`` are this epoch's values (the per-epoch curves); ``best_val_*`` and
    ``best_train_auc`` are the best epoch's, the values selection, the leaderboard and TensorBoard's HParams show.
    """
    entry = best_entry(run.history, epoch)
    report = {"epoch": epoch, "train_loss": entry["train_loss"], "val_loss": entry["val_loss"]}
    for key in ("auc", "accuracy", "f1", "sensitivity", "specificity", "youden_threshold"):
        report[f"val_{key}"] = entry[f"val_{key}"]
    report.update({name: entry[name] for name in FIT_METRICS})
    best = best_entry(run.history, run.best_epoch)
    for name in (*SELECTABLE_METRICS, *FIT_METRICS):
        report[f"best_{name}"] = best.get(name, math.nan)
    report["best_epoch"] = run.best_epoch
    report["diverged"] = diverged
    return report


def _is_new_best(val: dict, metric: str, mode: str, run: TrainingState) -> bool:
    """Better ``metric`` than the best so far; on a tie the lower validation loss wins (AUC saturates early)."""
    value = val[metric[len("val_"):]]
    if math.isnan(value):  # a diverged epoch (or one undefined metric) is never the best
        return False
    if run.best_value is None:
        return True
    best = run.best_value
    if math.isnan(best) or (value > best if mode == "max" else value < best):
        return True
    return value == best and val["loss"] < best_entry(run.history, run.best_epoch)["val_loss"]


def _datasets(variant, params: TrialParams, mirror_pair: str):
    """Train, val and test sets of the trial's view and fold (``mirror_pair``: data.mirror_pair)."""
    from preprocessing.loader import eval_set, fold_splits, train_set
    from preprocessing.vocab import pair_views

    splits = fold_splits(variant, params.fold)
    return (train_set(variant, params.view, params.flip, splits, pair_views(mirror_pair)), eval_set(variant, params.view, "val", splits),
            eval_set(variant, params.view, "test", splits))


def patient_map(variant) -> dict:
    """image_id -> patient over the variant's whole index."""
    return dict(zip(variant.index["image_id"], variant.index["patient"]))


def write_best_scores(path: Path, epoch: int, patient_of: dict, scored: dict) -> None:
    """``best_scores.parquet``: per image of each scored split (``{split: (dataset, labels, scores)}``) its patient.

    ``patient_of``: ``patient_map`` of the variant.
    """
    frames = [
        pd.DataFrame({"split": split, "epoch": epoch, "image_id": list(data.image_ids),
                      "patient": [patient_of[i] for i in data.image_ids], "label": labels, "score": scores})
        for split, (data, labels, scores) in scored.items()
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
    tmp.replace(path)  # a reader (the report, a sync) never sees half a file


def _build(cfg: Config, params: TrialParams, stn_weights) -> FsNet:
    seed_everything(params.seed)
    return build_model(params.backbone, cfg.train.pretrained, params.finetune, params.stn, stn_weights)


def _setup(cfg: Config, params: TrialParams, stn_weights, rt: Runtime, train_labels: np.ndarray):
    """Model, optimizer, scheduler, grad scaler and loss of a fresh trial."""
    pos_weight = class_pos_weight(train_labels, cfg.train.class_weights)
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=rt.device))
    model = _build(cfg, params, stn_weights).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, params.lr)
    scheduler = make_scheduler(cfg, optimizer, params.epochs)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    return model, optimizer, scheduler, scaler, criterion, pos_weight


def _restore(resume_from, model, optimizer, scheduler, scaler) -> TrainingState:
    """Load a checkpoint's model/optimizer/scheduler/scaler state; return its history and best so far."""
    state = load_resumable_state(resume_from)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return TrainingState(
        history=list(state["history"]), best_epoch=state["best_epoch"], best_value=state["best_value"],
        best_model=load_best_weights(resume_from), last_epoch=state["epoch"], checkpoint=Path(resume_from),
        device_seconds=state.get("device_seconds", 0.0),
    )


def _check_metric(metric: str) -> None:
    if metric not in SELECTABLE_METRICS:
        raise FsweepError(f"search.metric: {metric!r} is not one of {', '.join(SELECTABLE_METRICS)}")


def run_trial(
    cfg: Config, out_dir, *, on_epoch: EpochCallback | None = None, resume_from=None,
    on_best: BestCallback | None = None, handles: dict | None = None,
) -> dict:
    """Train one trial; write ``out_dir/config.yaml``, per-epoch checkpoints and ``out_dir/metrics.json``.

    ``on_epoch(metrics, checkpoint_dir)`` runs after every epoch and must persist
    the directory before returning (``ray.tune.report`` does): only the newest
    epoch directory is kept under ``out_dir/checkpoints``. Checkpoints are written every
    ``train.checkpoint_every`` epochs, at the last and at ASHA's rungs, on a background
    thread; on other epochs ``checkpoint_dir`` is None. ``metrics`` also carries the GPU-hours
    accounting (``device``, ``device_seconds``, ``img_per_s``). ``resume_from`` is a
    checkpoint directory; training continues after its epoch with its optimizer,
    scheduler and history, giving the same numbers as an uninterrupted run.
    ``on_best(epoch, labels, scores)`` runs when an epoch becomes the best so far, with
    its validation labels and scores (e.g. for a ROC plot without scoring them again).
    ``handles``: the store variant and frozen STN the driver resolved (``fsmodels.params.trial_handles``),
    opened by key; without them (``fsweep train``) they are resolved here, once, and recorded in every checkpoint.
    Returns the metrics.json content.
    """
    started = time.time()
    cfg = config_from_dict(plain(cfg.to_dict()))  # a copy with plain Python values (Ray may sample numpy ones)
    params = trial_params(cfg)
    metric, mode = cfg.search.metric, cfg.search.mode
    _check_metric(metric)
    require_device(cfg.resources.gpu)  # before anything trains (a frozen STN included): no silent CPU fallback
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    if handles is None:
        weights_file(resolve_backbone(params.backbone), cfg.train.pretrained)  # fail before any STN pretraining
        handles = trial_handles(cfg, params)
    variant, stn_weights = open_artifacts(cfg, handles)
    rt = runtime(cfg)
    if rt.device.type == "cpu":
        # the trial's share of cores: more threads than that makes OpenMP spin against the other trials
        torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    set_determinism(cfg.train.deterministic)
    train_data, val_data, test_data = _datasets(variant, params, cfg.data.mirror_pair)
    model, optimizer, scheduler, scaler, criterion, pos_weight = _setup(
        cfg, params, stn_weights, rt, np.asarray(train_data.labels)
    )
    run = TrainingState(history=[])
    if resume_from is not None:
        run = _restore(resume_from, model, optimizer, scheduler, scaler)
    test_loader = make_loader(test_data, max(params.batch_size, EVAL_BATCH), rt, cfg, None) if cfg.train.best_scores else None
    patient_of = patient_map(variant)  # best_scores.parquet and the validation AUC's patient-bootstrap interval
    val_patients = [patient_of[i] for i in val_data.image_ids]
    train_src, val_src = place_data(rt, cfg, train_data, val_data)  # on the device once when they fit (the DataLoader's order)
    # in order and re-iterable: built once (a DataLoader draws its base seed per iteration, as before)
    val_batches = epoch_batches(val_src, max(params.batch_size, EVAL_BATCH), rt, cfg, None)
    step_model = compile_model(model, cfg.train.compile)  # ``model`` keeps the plain state-dict keys
    ckpt_root, writer = out / "checkpoints", CheckpointWriter()
    asha = asha_settings(cfg)
    rungs = (asha[0], asha[1], asha[2] or params.epochs) if asha else None
    ckpt_epochs = checkpoint_epochs(cfg.train.checkpoint_every, params.epochs, rungs)
    account = _Accounting(rt, cfg, run.device_seconds, started)  # the device is held from the trial's start
    for epoch in range(run.last_epoch + 1, params.epochs + 1):
        seed_everything(epoch_seed(params.seed, epoch))
        loader = epoch_batches(train_src, params.batch_size, rt, cfg, epoch_seed(params.seed, epoch))
        tick = time.perf_counter()
        fit = _step(cfg, train_epoch, step_model, loader, criterion, optimizer, scaler, rt)
        train_loss = fit.loss
        account.trained(len(loader) * params.batch_size, time.perf_counter() - tick)
        scheduler.step()
        val_labels, val_scores, val_loss = _step(cfg, predict, step_model, val_batches, criterion, rt)
        diverged = not (math.isfinite(train_loss) and all_finite(val_scores))
        val = split_metrics(val_labels, val_scores, val_loss if not diverged else math.nan)
        if _is_new_best(val, metric, mode, run):
            run.best_epoch, run.best_value = epoch, val[metric[len("val_"):]]
            run.best_model = cpu_copy(model.state_dict())  # one copy (.cpu().clone() copies twice from CUDA)
            if test_loader is not None:  # kept for the report's test-scored tables; never read by selection
                test_labels, test_scores, _ = predict(model, test_loader, criterion, rt)
                write_best_scores(out / BEST_SCORES, epoch, patient_of, {
                    "val": (val_data, val_labels, val_scores), "test": (test_data, test_labels, test_scores)})
            if on_best is not None:
                on_best(epoch, val_labels, val_scores)
        val_ci = auc_interval(val_labels, val_scores, val_patients, seed=params.seed)  # evaluate_checkpoint's draws
        run.history.append({"epoch": epoch, "train_loss": train_loss, "train_auc": fit.auc,
                            **{f"val_{k}": v for k, v in val.items()}, "val_auc_lo": val_ci[0], "val_auc_hi": val_ci[1]})
        run.last_epoch, written = epoch, None
        if epoch in ckpt_epochs or diverged:  # a diverged epoch is the trial's last: it keeps a checkpoint
            state = dict(
                epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), history=run.history,
                best_epoch=run.best_epoch, best_value=run.best_value, config=cfg.to_dict(), variant=variant.key,
                artifacts=handles,
                pos_weight=pos_weight, device_seconds=account.device_seconds(),
            )
            run.checkpoint = _finish_write(writer, ckpt_root) or run.checkpoint  # the previous write, long done
            written = writer.submit(ckpt_root, state, run.best_model, cfg)  # a CPU copy, written on a background thread
        report = {**epoch_report(epoch, run, metric, diverged), **account.report()}
        print(_progress_line(report, params.epochs, metric), flush=True)
        if on_epoch is not None:
            if written is not None:  # the callback persists the directory (tune.report copies it): it must be whole
                run.checkpoint = _finish_write(writer, ckpt_root)
            on_epoch(report, written)  # None on epochs without a checkpoint
        if diverged:  # more epochs cannot bring a NaN model back
            print(f"epoch {epoch}: non-finite loss or scores: the trial diverged", flush=True)
            break
    run.checkpoint = _finish_write(writer, ckpt_root) or run.checkpoint
    result = {**_final_metrics(run, metric, variant.key, time.time() - started), **account.report(),
              "checkpoint_seconds": round(writer.seconds, 3)}  # training-thread time spent on checkpoints
    if cfg.train.test and run.best_epoch:
        result["test"] = evaluate_checkpoint(run.checkpoint, split="test", with_scores=False)
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=2))
    return result


def _finish_write(writer: CheckpointWriter, root: Path) -> Path | None:
    """Wait for the pending checkpoint write; keep only that newest directory."""
    path = writer.wait()
    if path is not None:
        prune_checkpoints(root, keep=path)
    return path


def _step(cfg: Config, fn, *args):
    """``fn(*args)``; with train.compile, a failure of the compiler (raised at the first step) is one line."""
    if not cfg.train.compile:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - torch.compile raises many types from its backends
        if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise compile_error(exc) from None
        raise


class _Accounting:
    """GPU-hours accounting: the device, device-seconds (wall time x the trial's device share) and train img/s."""

    def __init__(self, rt: Runtime, cfg: Config, earlier: float, started: float):
        self.device = device_label(rt)
        # the share Ray gave this trial (a fractional-GPU trial holds its share); outside Ray all of it (a CPU
        # trial counts its wall time): `fsweep train` on a whole GPU must not record wall x resources.gpu
        self.share = device_share(rt)
        self.earlier, self.started = earlier, started  # started: time.time() at the trial's start
        self.images, self.seconds = 0, 0.0

    def trained(self, images: int, seconds: float) -> None:
        """Count one training epoch."""
        self.images += images
        self.seconds += seconds

    def device_seconds(self) -> float:
        """Device-seconds of this trial so far, earlier attempts included."""
        return self.earlier + (time.time() - self.started) * self.share

    def report(self) -> dict:
        """The accounting keys of an epoch report and of metrics.json."""
        rate = self.images / self.seconds if self.seconds > 0 else math.nan
        return {"device": self.device, "device_seconds": round(self.device_seconds(), 3), "img_per_s": rate}


def _progress_line(report: dict, epochs: int, metric: str) -> str:
    return (
        f"epoch {report['epoch']}/{epochs} train_loss={report['train_loss']:.4f} val_loss={report['val_loss']:.4f} "
        f"train_auc={report['train_auc']:.3f} val_auc={report['val_auc']:.3f} "
        f"[{report['val_auc_lo']:.2f}, {report['val_auc_hi']:.2f}] val_acc={report['val_accuracy']:.3f} "
        f"best_epoch={report['best_epoch']} best_{metric}={report[f'best_{metric}']:.4f}"
    )


def _final_metrics(run: TrainingState, metric: str, key: str, seconds: float) -> dict:
    """metrics.json: the best epoch's validation metrics; a trial without one (diverged) has all nan."""
    best = best_entry(run.history, run.best_epoch)
    val = {k: best.get(f"val_{k}", math.nan) for k in (*REPORTED, "youden_threshold")}
    val["auc_ci"] = [best.get("val_auc_lo", math.nan), best.get("val_auc_hi", math.nan)]
    diverged = any(not math.isfinite(h["train_loss"]) or math.isnan(h["val_loss"]) for h in run.history)
    return dict(
        best_epoch=run.best_epoch, metric=metric, val=val, train={"auc": best.get("train_auc", math.nan)},
        history=run.history, variant=key,
        status="diverged" if diverged else "finished", checkpoint=str(run.checkpoint), seconds=round(seconds, 1),
    )


def load_trial_model(checkpoint_dir) -> tuple[FsNet, Config]:
    """The best-epoch model of a trial checkpoint (eval mode, CPU) and its config; no weights files needed."""
    state = load_state(checkpoint_dir)
    cfg = checkpoint_config(state)
    params = trial_params(cfg)
    model = model_skeleton(params.backbone, params.stn)
    model.load_state_dict(load_best_weights(checkpoint_dir))
    return model.eval(), cfg


def validation_threshold(state: dict) -> float:
    """The decision threshold: Youden's J on the best epoch's validation ROC (0.5 when undefined, e.g. one class)."""
    value = best_entry(state.get("history", []), state.get("best_epoch")).get("val_youden_threshold")
    return float(value) if value is not None and math.isfinite(value) else 0.5


def evaluate_checkpoint(checkpoint_dir, split: str = "test", n_boot: int = 1000, with_scores: bool = True) -> dict:
    """Score a checkpoint's best epoch on ``split`` at the validation threshold: metrics, ``*_ci`` intervals, scores.

    The threshold (recorded as ``threshold``) is ``validation_threshold``; the intervals are a
    bootstrap over resampled patients (both views of a patient move together).
    """
    from preprocessing.loader import eval_set, fold_splits

    model, cfg = load_trial_model(checkpoint_dir)
    params = trial_params(cfg)
    state = load_state(checkpoint_dir)
    variant, _ = open_artifacts(cfg, {"variant": recorded_variant(state)})  # by its recorded key, never recomputed
    rt = runtime(cfg)
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.preserve_format)
    dataset = eval_set(variant, params.view, split, fold_splits(variant, params.fold))
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(state["pos_weight"], device=rt.device))
    loader = make_loader(dataset, max(params.batch_size, EVAL_BATCH), rt, cfg, None)
    labels, scores, loss = predict(model, loader, criterion, rt)
    threshold = validation_threshold(state)
    patient_of = patient_map(variant)
    patients = [patient_of[i] for i in dataset.image_ids]
    result = {**binary_metrics(labels, scores, threshold), "loss": loss,
              **bootstrap_ci(labels, scores, n=n_boot, seed=params.seed, threshold=threshold, patients=patients)}
    result.update(split=split, best_epoch=state["best_epoch"], n=int(len(labels)), threshold=threshold,
                  patients=len(set(patients)))
    if with_scores:
        ids = list(dataset.image_ids)
        result["scores"] = [
            {"image_id": i, "label": int(y), "score": float(s)} for i, y, s in zip(ids, labels, scores)
        ]
    return result
