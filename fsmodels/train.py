"""One trial: the paper's training protocol on one store variant, resumable, with honest metrics.

``run_trial`` is what ``fsweep train`` runs and what the sweep wraps in a Ray
Tune trainable. Per epoch it trains, scores the validation split (abnormal =
positive; accuracy, F1, sensitivity and specificity at the epoch's own validation
Youden threshold, the operating point export and test use), writes a checkpoint
directory and calls ``on_epoch(metrics, checkpoint_dir)``. The best epoch by
``search.metric`` is kept; ``train.test`` scores it on the test split with
patient-level bootstrap 95 % intervals at the validation threshold. With
``train.test_every_trial`` every new best epoch also scores the test split, and every
checkpoint carries those scores (``best_scores.parquet``: per image split, patient,
label, score), which the sweep report reads; nothing selects on them. On CUDA: AMP
(bf16 where supported), channels_last, pinned memory, non-blocking copies and no host
sync inside an epoch.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from cluster.errors import FsweepError
from fsmodels.backbones import resolve_backbone, weights_file
from fsmodels.checkpoint import (
    checkpoint_config,
    checkpoint_epochs,
    cpu_copy,
    load_best_scores,
    load_best_weights,
    load_resumable_state,
    load_state,
    python_values,
    prune_checkpoints,
    save_checkpoint,
    recorded_variant,
)
from fsmodels.config import Config, asha_settings, config_from_dict, save_config
from fsmodels.engine import (
    Runtime,
    TrainPass,
    compile_error,
    compile_model,
    device_label,
    device_share,
    epoch_batches,
    epoch_seed,
    make_loader,
    place_data,
    score_loader,
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
    operating_threshold,
)
from fsmodels.model import FsNet, build_model, model_skeleton
from fsmodels.params import TrialParams, open_artifacts, trial_handles, trial_params
from fsmodels.stn import load_weights

__all__ = ["run_trial", "evaluate_checkpoint", "load_trial_model", "trial_params"]
REPORTED = SPLIT_METRICS  # metrics.json val/test keys
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
    best_scores: pd.DataFrame | None = None  # its per-image val and test scores (train.test_every_trial)
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
    """An epoch's validation metrics plus the loss, with accuracy, F1, sensitivity and specificity at that epoch's
    own Youden threshold: the operating point export and test use, so a model selected on F1 is deployed at the
    threshold its F1 was measured at (0.5 would be an arbitrary cut under the class-weighted loss)."""
    return {**binary_metrics(labels, scores, threshold=None), "loss": loss}


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


def patient_map(variant) -> dict:
    """image_id -> patient over the variant's whole index."""
    return dict(zip(variant.index["image_id"], variant.index["patient"]))


def best_scores_frame(epoch: int, patient_of: dict, scored: dict) -> pd.DataFrame:
    """``best_scores.parquet``'s rows: per image of each scored split (``{split: (dataset, labels, scores)}``)
    its epoch, image, patient, label and score. ``patient_of``: ``patient_map`` of the variant."""
    frames = [
        pd.DataFrame({"split": split, "epoch": epoch, "image_id": list(data.image_ids),
                      "patient": [patient_of[i] for i in data.image_ids], "label": labels, "score": scores})
        for split, (data, labels, scores) in scored.items()
    ]
    return pd.concat(frames, ignore_index=True)


@dataclass
class TrialData:
    """A trial's three splits and how each epoch reads them."""

    train: object  # the training set (its labels weigh the loss)
    val: object
    test: object
    train_src: object  # the training set, on the device when it fits (train.resident_max_mb)
    val_batches: object  # validation batches in order, re-iterable
    test_loader: object | None  # train.test_every_trial only
    patient_of: dict  # image_id -> patient over the variant (best_scores.parquet)
    val_patients: list  # the validation images' patients (the AUC interval's bootstrap)


@dataclass
class Learner:
    """What trains: the model (and the module steps run through), optimizer, LR schedule, grad scaler, loss."""

    model: FsNet  # plain state-dict keys: what checkpoints hold
    step_model: nn.Module  # ``model`` itself, or compiled (train.compile)
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    pos_weight: float


class Scored(NamedTuple):
    """One epoch's validation: its metrics, labels and scores, and whether the trial diverged."""

    val: dict
    labels: np.ndarray
    scores: np.ndarray
    diverged: bool


def _check_metric(metric: str) -> None:
    if metric not in SELECTABLE_METRICS:
        raise FsweepError(f"search.metric: {metric!r} is not one of {', '.join(SELECTABLE_METRICS)}")


def prepare_trial(cfg: Config, out_dir) -> tuple[Config, TrialParams, Path]:
    """A plain copy of ``cfg`` (Ray may sample numpy values), its trial parameters and the output directory
    (created, with config.yaml); a bad metric or a GPU torch cannot see is refused before anything trains."""
    cfg = config_from_dict(python_values(cfg.to_dict()))
    params = trial_params(cfg)
    _check_metric(cfg.search.metric)
    require_device(cfg.resources.gpu)  # before anything trains (a frozen STN included): no silent CPU fallback
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return cfg, params, out


def open_trial_artifacts(cfg: Config, params: TrialParams, handles: dict | None):
    """(variant, frozen STN weights, handles): opened by the driver's keys, or (``fsweep train``) resolved here
    once, after checking the backbone's weights exist so that no STN is pretrained for a trial that cannot run."""
    if handles is None:
        weights_file(resolve_backbone(params.backbone), cfg.train.pretrained)
        handles = trial_handles(cfg, params)
    variant, stn_weights = open_artifacts(cfg, handles)
    return variant, stn_weights, handles


def trial_runtime(cfg: Config) -> Runtime:
    """The device and precision, the trial's share of CPU threads, and determinism as configured."""
    rt = runtime(cfg)
    if rt.device.type == "cpu":
        # the trial's share of cores: more threads than that makes OpenMP spin against the other trials
        torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    set_determinism(cfg.train.deterministic)
    return rt


def build_data(cfg: Config, params: TrialParams, variant, rt: Runtime) -> TrialData:
    """Train, val and test sets of the trial's view and fold; train and val on the device once when they fit."""
    from preprocessing.loader import eval_set, fold_splits, train_set
    from preprocessing.vocab import pair_views

    splits = fold_splits(variant, params.fold)
    train = train_set(variant, params.view, params.flip, splits, pair_views(cfg.data.mirror_pair))
    val, test = (eval_set(variant, params.view, split, splits) for split in ("val", "test"))
    train_src, val_src = place_data(rt, cfg, train, val)  # the DataLoader's order either way
    eval_batch, patient_of = max(params.batch_size, EVAL_BATCH), patient_map(variant)
    return TrialData(
        train, val, test, train_src,
        # in order and re-iterable: built once (a DataLoader draws its base seed per iteration)
        val_batches=epoch_batches(val_src, eval_batch, rt, cfg, None),
        test_loader=make_loader(test, eval_batch, rt, cfg, None) if cfg.train.test_every_trial else None,
        patient_of=patient_of, val_patients=[patient_of[i] for i in val.image_ids])


def build_model_and_optimizer(cfg: Config, params: TrialParams, stn_weights, rt: Runtime, labels) -> Learner:
    """The seeded model on the device, its optimizer, LR schedule, grad scaler and class-weighted loss."""
    pos_weight = class_pos_weight(np.asarray(labels), cfg.train.class_weights)
    seed_everything(params.seed)
    model = build_model(params.backbone, cfg.train.pretrained, params.finetune, params.stn, stn_weights).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, params.lr)
    return Learner(model, compile_model(model, cfg.train.compile), optimizer,
                   make_scheduler(cfg, optimizer, params.epochs),
                   torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16),
                   nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=rt.device)), pos_weight)


def resume(resume_from, learner: Learner) -> TrainingState:
    """A fresh state, or a checkpoint's: its model/optimizer/scheduler/scaler loaded, its history and best so far."""
    if resume_from is None:
        return TrainingState(history=[])
    state = load_resumable_state(resume_from)
    for name in ("model", "optimizer", "scheduler", "scaler"):
        getattr(learner, name).load_state_dict(state[name])
    return TrainingState(
        history=list(state["history"]), best_epoch=state["best_epoch"], best_value=state["best_value"],
        best_model=load_best_weights(resume_from), best_scores=load_best_scores(resume_from),
        last_epoch=state["epoch"], checkpoint=Path(resume_from), device_seconds=state.get("device_seconds", 0.0),
    )


def checkpoint_plan(cfg: Config, params: TrialParams) -> set[int]:
    """The epochs that write a checkpoint: every ``train.checkpoint_every``-th, the last and ASHA's rungs."""
    asha = asha_settings(cfg)
    rungs = (asha[0], asha[1], asha[2] or params.epochs) if asha else None
    return checkpoint_epochs(cfg.train.checkpoint_every, params.epochs, rungs)


def train_one_epoch(cfg: Config, params: TrialParams, learner: Learner, data: TrialData, rt: Runtime, epoch: int,
                    account: "_Accounting") -> TrainPass:
    """One pass over the training set, shuffled and augmented with the epoch's own seed (resume-safe), then the
    LR schedule's step."""
    seed_everything(epoch_seed(params.seed, epoch))
    loader = epoch_batches(data.train_src, params.batch_size, rt, cfg, epoch_seed(params.seed, epoch))
    tick = time.perf_counter()
    fit = _step(cfg, train_epoch, learner.step_model, loader, learner.criterion, learner.optimizer, learner.scaler, rt)
    account.trained(len(loader) * params.batch_size, time.perf_counter() - tick)
    learner.scheduler.step()
    return fit


def evaluate(cfg: Config, learner: Learner, data: TrialData, rt: Runtime, fit: TrainPass) -> Scored:
    """Score the validation split; the trial diverged when the training loss or a validation score is not finite."""
    labels, scores, loss = _step(cfg, score_loader, learner.step_model, data.val_batches, learner.criterion, rt)
    diverged = not (math.isfinite(fit.loss) and all_finite(scores))
    return Scored(split_metrics(labels, scores, loss if not diverged else math.nan), labels, scores, diverged)


def keep_best(cfg: Config, run: TrainingState, epoch: int, scored: Scored, learner: Learner, data: TrialData,
              rt: Runtime, on_best: BestCallback | None) -> None:
    """If the epoch is the best so far: keep its weights and, with train.test_every_trial, its per-image val and
    test scores (for the report's tables; selection never reads them); then call ``on_best``."""
    metric = cfg.search.metric
    if not _is_new_best(scored.val, metric, cfg.search.mode, run):
        return
    run.best_epoch, run.best_value = epoch, scored.val[metric[len("val_"):]]
    run.best_model = cpu_copy(learner.model.state_dict())  # one copy (.cpu().clone() copies twice from CUDA)
    if data.test_loader is not None:
        test_labels, test_scores, _ = score_loader(learner.model, data.test_loader, learner.criterion, rt)
        run.best_scores = best_scores_frame(epoch, data.patient_of, {
            "val": (data.val, scored.labels, scored.scores), "test": (data.test, test_labels, test_scores)})
    if on_best is not None:
        on_best(epoch, scored.labels, scored.scores)


def record_epoch(run: TrainingState, epoch: int, fit: TrainPass, scored: Scored, data: TrialData, seed: int) -> None:
    """Append the epoch to the history: losses, training AUC, validation metrics and the AUC's 95 % interval."""
    ci = auc_interval(scored.labels, scored.scores, data.val_patients, seed=seed)  # evaluate_checkpoint's draws
    run.history.append({"epoch": epoch, "train_loss": fit.loss, "train_auc": fit.auc,
                        **{f"val_{k}": v for k, v in scored.val.items()}, "val_auc_lo": ci[0], "val_auc_hi": ci[1]})
    run.last_epoch = epoch


def save_epoch_checkpoint(cfg: Config, run: TrainingState, learner: Learner, variant, handles: dict,
                          account: "_Accounting", out: Path) -> Path:
    """Write the epoch's checkpoint (what resuming needs, the best weights and scores) and keep only that one.

    On the training thread: Ray needs the directory whole before ``tune.report``, so a background writer is
    joined at once and hides nothing. Timed with ``run_trial`` and an ``on_epoch`` callback, as a sweep runs it
    (CPU, 64 px, 4 checkpoints): ResNet50 (270 MiB each) wrote for 2.92 s and the training thread waited 2.97 s;
    resnet10t (56 MiB) 0.24 s and 0.23 s.
    """
    tick = time.perf_counter()
    state = dict(
        epoch=run.last_epoch, model=learner.model.state_dict(), optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(), scaler=learner.scaler.state_dict(), history=run.history,
        best_epoch=run.best_epoch, best_value=run.best_value, config=cfg.to_dict(), variant=variant.key,
        artifacts=handles, pos_weight=learner.pos_weight, device_seconds=account.device_seconds(),
    )
    run.checkpoint = save_checkpoint(out / "checkpoints", state, run.best_model, cfg, run.best_scores)
    prune_checkpoints(out / "checkpoints", keep=run.checkpoint)
    account.checkpoint_seconds += time.perf_counter() - tick
    return run.checkpoint


def report_epoch(cfg: Config, params: TrialParams, run: TrainingState, scored: Scored, account: "_Accounting",
                 on_epoch: EpochCallback | None, checkpoint: Path | None) -> None:
    """Print the epoch's progress line; hand its report and checkpoint (None on other epochs) to ``on_epoch``."""
    epoch, metric = run.last_epoch, cfg.search.metric
    report = {**epoch_report(epoch, run, metric, scored.diverged), **account.report()}
    print(_progress_line(report, params.epochs, metric), flush=True)
    if on_epoch is not None:
        on_epoch(report, checkpoint)
    if scored.diverged:  # more epochs cannot bring a NaN model back
        print(f"epoch {epoch}: non-finite loss or scores: the trial diverged", flush=True)


def finish_trial(cfg: Config, run: TrainingState, out: Path, variant, account: "_Accounting", started: float) -> dict:
    """Write and return metrics.json: the best epoch's validation metrics, the history, the accounting and, with
    ``train.test`` (``fsweep train --test``), the best epoch on the test split at the validation threshold."""
    result = {**_final_metrics(run, cfg.search.metric, variant.key, time.time() - started), **account.report(),
              "checkpoint_seconds": round(account.checkpoint_seconds, 3)}  # training-thread time spent on checkpoints
    if cfg.train.test and run.best_epoch:
        result["test"] = evaluate_checkpoint(run.checkpoint, split="test", with_scores=False)
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=2))
    return result


def run_trial(
    cfg: Config, out_dir, *, on_epoch: EpochCallback | None = None, resume_from=None,
    on_best: BestCallback | None = None, handles: dict | None = None,
) -> dict:
    """Train one trial; write ``out_dir/config.yaml``, its newest checkpoint and ``out_dir/metrics.json`` (returned).

    ``on_epoch(metrics, checkpoint_dir)`` runs after every epoch and must persist the directory before returning
    (``ray.tune.report`` does); ``checkpoint_dir`` is None on epochs that write none (see ``checkpoint_plan``).
    ``resume_from``: a checkpoint directory; training continues after its epoch with the numbers of an
    uninterrupted run. ``on_best(epoch, labels, scores)``: a new best epoch's validation scores. ``handles``: the
    variant and frozen STN the driver resolved (``fsmodels.params.trial_handles``); without them, resolved here.
    """
    started = time.time()
    cfg, params, out = prepare_trial(cfg, out_dir)
    variant, stn_weights, handles = open_trial_artifacts(cfg, params, handles)
    rt = trial_runtime(cfg)
    data = build_data(cfg, params, variant, rt)
    learner = build_model_and_optimizer(cfg, params, stn_weights, rt, data.train.labels)
    run = resume(resume_from, learner)
    account = _Accounting(rt, cfg, run.device_seconds, started)  # the device is held from the trial's start
    checkpoint_at = checkpoint_plan(cfg, params)
    for epoch in range(run.last_epoch + 1, params.epochs + 1):
        fit = train_one_epoch(cfg, params, learner, data, rt, epoch, account)
        scored = evaluate(cfg, learner, data, rt, fit)
        keep_best(cfg, run, epoch, scored, learner, data, rt, on_best)
        record_epoch(run, epoch, fit, scored, data, params.seed)
        saved = None
        if epoch in checkpoint_at or scored.diverged:  # a diverged epoch is the trial's last: it keeps a checkpoint
            saved = save_epoch_checkpoint(cfg, run, learner, variant, handles, account, out)
        report_epoch(cfg, params, run, scored, account, on_epoch, saved)
        if scored.diverged:
            break
    return finish_trial(cfg, run, out, variant, account, started)


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
        self.checkpoint_seconds = 0.0  # training-thread time spent writing checkpoints

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
    load_weights(model, load_best_weights(checkpoint_dir), checkpoint_dir)
    return model.eval(), cfg


def validation_threshold(state: dict) -> float:
    """The decision threshold: Youden's J on the best epoch's validation ROC (0.5 when undefined, e.g. one class)."""
    return operating_threshold(best_entry(state.get("history", []), state.get("best_epoch")).get("val_youden_threshold"))


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
    labels, scores, loss = score_loader(model, loader, criterion, rt)
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
