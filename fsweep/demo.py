"""``fsweep demo``: the whole pipeline on the phantom, sized for a 2-core CPU.

synth → ingest → ROI detector → store → sweep (an HE × Flip ablation, FIFO:
every trial trains all its epochs) → report → export → predict on new raw radiographs →
the exported winner's AUC on newly generated patients beside its test AUC.
Every step is the same library call the command line makes; only the sizes
are small.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from fsmodels.config import Config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
NEW_PATIENTS = 60  # newly generated patients the exported winner is scored on
NEW_SEED = 1234  # a phantom seed no split was drawn from


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def score_new_patients(model_dir: Path, out: Path, patients: int, seed: int) -> dict:
    """AUC of an exported model on phantom patients generated anew (``seed`` unseen by any split), per its views.

    The phantom's labels are known, so this checks that a winner generalizes beyond the
    patients its data set was drawn from: ``{"auc", "n", "views"}``.
    """
    import pandas as pd

    from fsmodels.metrics import auc_score
    from fsweep.modelcard import CARD
    from fsweep.predict import predict
    from preprocessing.phantom import write_phantom
    from preprocessing.vocab import parse_label

    write_phantom(out, patients=patients, seed=seed)  # the default, calibrated phantom
    views = json.loads((model_dir / CARD).read_text())["views"]
    manifest = pd.read_csv(out / "manifest.csv")
    manifest = manifest[manifest["view"].isin(views)]
    manifest.to_csv(out / "manifest_scored.csv", index=False)
    preds = predict(model_dir, [out / "manifest_scored.csv"], out=out / "preds.csv")
    labels = manifest["label"].map(parse_label).to_numpy()
    return {"auc": auc_score(labels, preds["probability"].to_numpy()), "n": len(preds), "views": views}


def demo_paths(out: Path) -> dict[str, str]:
    """The config keys the demo fills in: its dataset, store and detector live under ``out``."""
    return {"data.dataset": str(out / "dataset"), "data.store": str(out / "store"), "roi.detector": str(out / "roi")}


def run_demo(out: str | Path, cfg: Config, patients: int = 100, verbose: bool = False) -> Path:
    """Run every stage on a fresh phantom under ``out`` with ``cfg`` (configs/demo.yaml); returns the experiment.

    Quiet unless ``verbose``: YOLO's log goes to ``train.log`` in the detector directory, Ray's to the experiment's ``logs/``.
    """
    from fsmodels.params import build_variants
    from fsweep.export import export_experiment, read_winners
    from fsweep.predict import predict
    from preprocessing.ingest import ingest
    from preprocessing.phantom import write_phantom
    from preprocessing.roi import train_detector
    from search.progress import logs_to_file
    from search.report import write_report
    from search.sweep import run_sweep

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    dataset, store, roi = cfg.data.dataset, cfg.data.store, cfg.roi  # demo_paths: under ``out`` unless --set moves them

    _step(f"fsweep synth --out {out / 'phantom'} --patients {patients}")  # the calibrated default phantom
    write_phantom(out / "phantom", patients=patients, seed=0)

    _step(f"fsweep ingest {out / 'phantom' / 'manifest.csv'} --out {dataset}")
    ingest(out / "phantom" / "manifest.csv", dataset, seed=0)

    _step(f"fsweep roi train {dataset} --out {roi.detector} --config {DEMO_CONFIG.name}")
    with nullcontext() if verbose else logs_to_file(Path(roi.detector) / "train.log", ("ultralytics",), streams=True):
        metrics = train_detector(dataset, roi.detector, annotated=roi.annotated, epochs=roi.epochs,
                                 imgsz=roi.imgsz, model=roi.model, batch=roi.batch)
    print(f"ROI detector mAP50={metrics['map50']:.3f} (paper: 0.97)")

    _step(f"fsweep store build {dataset} --store {store} --config {DEMO_CONFIG.name} --roi {roi.detector}")
    with nullcontext() if verbose else logs_to_file(out / "logs" / "store.log", ("ray",)):  # Ray's start-up notices
        build_variants(cfg)

    _step(f"fsweep sweep {DEMO_CONFIG} --storage {out / 'runs'} --name demo")
    experiment = run_sweep(cfg, address=None, name="demo", storage=str(out / "runs"), verbose=verbose)

    _step(f"fsweep report {experiment}")
    report = write_report(experiment)
    print(f"report: {report}")

    _step(f"fsweep export {experiment} --out {out / 'model'}")
    model = export_experiment(experiment, out / "model")
    print(f"exported model: {model}")

    new = out / "new_radiographs"
    _step(f"fsweep predict {out / 'model'} {new}/images/*_right.png --out {out / 'preds.csv'} --cam {out / 'cam'} --view right")
    write_phantom(new, patients=3, seed=99)  # patients no split has seen
    files = sorted((new / "images").glob("*_right.png"))  # any view the exported model serves
    preds = predict(model, files, out=out / "preds.csv", cam_dir=out / "cam", view="right")
    print(preds[["image", "view", "probability", "label"]].to_string(index=False))

    fresh = out / "new_patients"
    _step(f"generalization: the exported winner on {NEW_PATIENTS} newly generated patients (seed {NEW_SEED})")
    check = score_new_patients(model, fresh, NEW_PATIENTS, NEW_SEED)
    test_auc = {view: win["test"]["auc"] for view, win in read_winners(experiment).items()}
    shown = ", ".join(f"{view} {auc:.3f}" for view, auc in test_auc.items())
    print(f"test AUC (held-out split): {shown}; AUC on new patients: {check['auc']:.3f} "
          f"(n={check['n']} images, {'/'.join(check['views'])} view; chance 0.5)")
    summary = {"test_auc": test_auc, "new_patients_auc": check["auc"], "new_patients_images": check["n"],
               "new_patients_seed": NEW_SEED, "views": check["views"]}
    (out / "generalization.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    print(f"compare the trials: tensorboard --logdir {experiment}")
    return Path(experiment)
