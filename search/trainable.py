"""One sweep trial: ``fsmodels.train.run_trial`` as a Ray Tune function trainable.

It reports once per epoch (``tune.report``), with the checkpoint on epochs that wrote one, resumes
from ``tune.get_checkpoint()`` after a failure or an interrupted driver, opens the
store variant and frozen STN by the keys the driver recorded (never builds or
re-derives one: a trial needs only the store) and adds sample images and the
validation ROC to the trial's TensorBoard run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import ray
from ray import tune

from fsmodels.config import SPACE_KEYS, Config, config_from_dict, save_config

SAMPLE_COUNT = 4  # sample images per preprocessing stage in TensorBoard


def trial_config(base: dict, params: dict) -> Config:
    """The one-trial Config: the sweep's sections with this trial's space values."""
    raw = {section: dict(values) for section, values in base.items()}
    raw["space"] = {key: params[key] for key in SPACE_KEYS if key in params}  # an older sweep's trials lack newer keys
    cfg = config_from_dict(raw)
    cfg.train.test = False  # selection is on validation; the driver scores the winners on test after it
    return cfg


def _node_label() -> str:
    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def artifact_handles(cfg: Config, record: dict) -> dict:
    """This trial's variant and frozen STN handles (and, with folds, its fold's detector), looked up in the
    driver's record (never recomputed)."""
    from fsmodels.params import fold_record, record_entry

    he, aspect = cfg.space.he, cfg.space.aspect
    record = fold_record(record, cfg.space.fold)  # with folds: this fold's own detector, variants and STNs
    stn = record_entry(record["stns"], he, aspect)[int(cfg.space.seed)] if cfg.space.stn == "frozen" else None
    detector = {"detector": record["detector"]} if "detector" in record else {}  # recorded in its checkpoints
    return {"variant": record_entry(record["variants"], he, aspect), "stn": stn, **detector}


def _sample_stages(cfg: Config, record: dict, handles: dict) -> dict[str, list]:
    """A few validation images of this trial's view: the plain ROI crop (when the sweep has he=off), after HE,
    after the frozen STN; only artifacts the sweep built anyway are opened."""
    import torch

    from fsmodels.params import fold_record, open_artifacts, variant_name
    from fsmodels.stn import load_frozen_stn

    record = fold_record(record, cfg.space.fold)
    variant, weights = open_artifacts(cfg, handles)
    # one model over every view shows its last view (right on the paper's data)
    view = variant.views[-1] if cfg.space.view in ("both", "all") else cfg.space.view
    stages = {}
    plain = variant_name("off", cfg.space.aspect)
    if plain in record["variants"]:
        crop, _ = open_artifacts(cfg, {"variant": record["variants"][plain]})
        stages["roi_crop"] = list(crop.images("val", view)[:SAMPLE_COUNT])
    stages["after_he"] = list(variant.images("val", view)[:SAMPLE_COUNT])
    if weights is not None and stages["after_he"]:
        batch = torch.from_numpy(np.stack(stages["after_he"])).unsqueeze(1).float() / 255.0
        with torch.no_grad():
            stages["after_stn"] = list(load_frozen_stn(weights)(batch).squeeze(1).clamp(0, 1).numpy())
    return stages


def train_trial(params: dict, *, base: dict, variants: dict, scratch_root: str) -> None:
    """Tune function trainable: one run_trial, reporting each epoch with its checkpoint.

    run_trial works in ``scratch_root/<trial id>`` outside the trial's working
    directory, so its epoch checkpoints are not synced twice (Ray persists the
    reported ones); the trial directory gets config.yaml, metrics.json and the
    TensorBoard images. The driver removes ``scratch_root`` when the sweep ends.
    ``variants``: the driver's record of variant and STN handles (``search.sweep.prepare_store``).
    """
    from fsmodels.train import run_trial
    from search.tb import write_roc, write_samples

    cfg = trial_config(base, params)
    handles = artifact_handles(cfg, variants)
    out = Path.cwd()  # the trial's working directory; Ray syncs it into the trial directory
    scratch = Path(scratch_root) / tune.get_context().get_trial_id()
    shutil.rmtree(scratch, ignore_errors=True)  # a failed attempt's leftovers
    node = _node_label()
    checkpoint = tune.get_checkpoint()
    resume_from = Path(checkpoint.to_directory(str(scratch / "resume"))) if checkpoint else None
    save_config(cfg, out / "config.yaml")
    if resume_from is None:
        write_samples(out, _sample_stages(cfg, variants, handles))

    def on_best(epoch: int, labels: np.ndarray, scores: np.ndarray) -> None:
        # every new best gets its ROC (written before the report syncs it), also for trials ASHA stops later
        write_roc(out, labels, scores, step=epoch, title=f"validation ROC, epoch {epoch}")

    def on_epoch(metrics: dict, checkpoint_dir: Path | None) -> None:
        # only epochs that wrote a checkpoint (train.checkpoint_every) hand one to Ray to persist
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report({**metrics, "node": node}, checkpoint=checkpoint)

    try:
        run_trial(cfg, scratch, on_epoch=on_epoch, resume_from=resume_from, on_best=on_best, handles=handles)
        shutil.copy2(scratch / "metrics.json", out / "metrics.json")
    finally:  # also when ASHA stops it inside tune.report (SystemExit) or it fails: Ray holds the reported checkpoints
        # (Ray may kill the actor of a trial that ended before this runs: the driver's cleanup covers that)
        shutil.rmtree(scratch, ignore_errors=True)
