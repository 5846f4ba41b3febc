"""``fsweep demo``: the whole pipeline on the phantom, sized for a 2-core CPU.

synth → ingest → ROI detector → store → sweep (ASHA over the four paper
backbones × HE on/off) → report → export → predict on new raw radiographs.
Every step is the same library call the command line makes; only the sizes
are small.
"""
from __future__ import annotations

import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def run_demo(out: str | Path, patients: int = 100, difficulty: float = 0.8) -> Path:
    """Run every stage on a fresh phantom under ``out``; returns the experiment directory."""
    from fsmodels.config import load_config
    from preprocessing.ingest import ingest
    from preprocessing.phantom import write_phantom
    from preprocessing.roi import train_detector
    from preprocessing.store import build_store
    from search.export import export_experiment
    from search.predict import predict
    from search.report import write_report
    from search.sweep import run_sweep

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    # hard enough that the sweep's trials differ on validation (at 0.5 most reach AUC 1.0)
    _step(f"fsweep synth --out {out / 'phantom'} --patients {patients} --difficulty {difficulty}")
    write_phantom(out / "phantom", patients=patients, seed=0, difficulty=difficulty)

    _step(f"fsweep ingest {out / 'phantom' / 'manifest.csv'} --out {out / 'dataset'}")
    ingest(out / "phantom" / "manifest.csv", out / "dataset", seed=0)

    _step(f"fsweep roi train {out / 'dataset'} --out {out / 'roi'} --epochs 15 --imgsz 160")
    metrics = train_detector(out / "dataset", out / "roi", epochs=15, imgsz=160)
    print(f"ROI detector mAP50={metrics['map50']:.3f} (paper: 0.97)")

    cfg = load_config(
        DEMO_CONFIG,
        [f"data.dataset={out / 'dataset'}", f"data.store={out / 'store'}", f"roi.detector={out / 'roi'}"],
    )
    _step(f"fsweep store build {out / 'dataset'} --store {out / 'store'} --roi {out / 'roi'} --size {cfg.data.size}")
    build_store(out / "dataset", out / "store", roi=str(out / "roi"), size=cfg.data.size, he_modes=("off", "global"))

    _step(f"fsweep sweep {DEMO_CONFIG} --storage {out / 'runs'} --name demo")
    experiment = run_sweep(cfg, address=None, name="demo", storage=str(out / "runs"))

    _step(f"fsweep report {experiment}")
    report = write_report(experiment)
    print(f"report: {report}")

    _step(f"fsweep export {experiment} --out {out / 'model'}")
    model = export_experiment(experiment, out / "model")
    print(f"exported model: {model}")

    new = out / "new_radiographs"
    _step(f"fsweep predict {out / 'model'} {new}/images/*_right.png --out {out / 'preds.csv'} --cam {out / 'cam'} --view right")
    write_phantom(new, patients=3, seed=99)  # patients no split has seen
    files = sorted((new / "images").glob("*_right.png"))  # the demo sweep trains the right-view model
    preds = predict(model, files, out=out / "preds.csv", cam_dir=out / "cam", view="right")
    print(preds[["image", "view", "probability", "label"]].to_string(index=False))
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    print(f"compare the trials: tensorboard --logdir {experiment}")
    return Path(experiment)
