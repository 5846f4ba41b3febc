"""Calibration of the phantom (issues 11 and 19): do the demo-scale trials land in the useful range, per family and aspect?

Writes a phantom of one family (``--family``, the demo's scale: 100 patients at the default image size),
ingests it, trains the demo's YOLO ROI detector, builds the ``--size`` px store (HE off and global, one
variant per ``--aspect``), then trains a few trials of ``configs/demo_trial.yaml`` that differ only in
the paper's methods, once per aspect (the detector and data set are shared by every row):

    crop_only   he off,    flip off, stn off   (the baseline: ROI crop + resnet10t from scratch)
    he          he global, flip off, stn off
    flip        he off,    flip on,  stn off
    demo_trial  he global, flip on,  stn frozen (configs/demo_trial.yaml as shipped)

Each trial reports its validation AUC (what a sweep selects on), its test AUC, and its AUC on
``--new-patients`` newly generated patients of the same family (phantom seed NEW_SEED, which no split
was drawn from), scored through the trial's own recipe (detector, HE, aspect, size).
Targets: crop_only val AUC about 0.6-0.85, demo_trial between 0.6 and 0.97, and no row at 1.0.
Validation is 20 patients x 2 views, so one AUC is worth about +-0.08; ``--train-seeds`` repeats
every row with more initialisation seeds and reports the mean. ``--quick``: the smallest run (a
20-patient phantom of small images, the full frame instead of a trained detector, 32 px, one epoch, one row)
to check that the bench works.
Every step is the ``fsweep`` command a user would type (the phantom is written by the library).
Last line: ``crop_only_val_auc=<mean>`` (the first row's mean when crop_only is not run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/calibrate_phantom.py` from a checkout

from preprocessing.phantom import DEFAULT_DIFFICULTY, DEFAULT_FAMILY, FAMILIES, write_phantom  # noqa: E402
from preprocessing.vocab import ASPECTS  # noqa: E402

TRIAL_CONFIG = ROOT / "configs" / "demo_trial.yaml"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
NEW_SEED = 1234  # as fsweep.demo: a phantom seed no split was drawn from
ROWS = {
    "crop_only": ["space.he=off", "space.flip=false", "space.stn=off"],
    "he": ["space.he=global", "space.flip=false", "space.stn=off"],
    "flip": ["space.he=off", "space.flip=true", "space.stn=off"],
    "demo_trial": [],
}
QUICK = {"patients": 20, "image_size": (148, 252), "size": 32, "epochs": 1, "rows": "crop_only", "new_patients": 6}


def fsweep(*args: str) -> None:
    """Run one ``fsweep`` command of this environment; stop with its output when it fails."""
    command = [str(Path(sys.executable).parent / "fsweep"), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def aspect_key() -> str:
    """The config key of the crop's aspect: ``space.aspect``, or ``data.aspect`` for a config that still names the deprecated key."""
    from fsmodels.config import SpaceConfig

    return "space.aspect" if "aspect" in {f.name for f in dataclasses.fields(SpaceConfig)} else "data.aspect"


def sets(pairs: list[str]) -> list[str]:
    """``--set`` arguments for ``key=value`` pairs."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def prepare(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Phantom -> DATASET -> ROI detector -> STORE (HE off and global, each aspect); returns (dataset, roi, store)."""
    phantom, dataset, roi, store = (work / name for name in ("phantom", "dataset", "roi", "store"))
    started = time.monotonic()
    if not (dataset / "dataset.parquet").is_file():  # --out reused: one data set per family and seed
        write_phantom(phantom, patients=args.patients, seed=args.seed, difficulty=args.difficulty,
                      family=args.family, **({"size": args.image_size} if args.image_size else {}))
        fsweep("ingest", str(phantom / "manifest.csv"), "--out", str(dataset), "--seed", str(args.seed))
    print(f"phantom: family {args.family}, {args.patients} patients, seed {args.seed}, difficulty {args.difficulty} "
          f"({time.monotonic() - started:.1f} s)", flush=True)
    if args.no_detector:  # the full frame (--quick): YOLO training is most of a small run's time
        roi = None
    elif not (roi / "best.pt").is_file():  # --out reused: one detector per family and seed, whatever the size
        fsweep("roi", "train", str(dataset), "--out", str(roi), "--config", str(DEMO_CONFIG))
    if roi is not None:
        print(f"ROI detector mAP50={json.loads((roi / 'metrics.json').read_text()).get('map50')}", flush=True)
    for aspect in args.aspects:
        fsweep("store", "build", str(dataset), "--store", str(store), "--roi", str(roi or "none"), "--size",
               str(args.size), "--he", "off,global", "--aspect", aspect)
    print(f"prepared in {time.monotonic() - started:.0f} s", flush=True)
    return dataset, roi, store


def trial(work: Path, paths: tuple[Path, Path, Path], name: str, aspect: str, train_seed: int,
          args: argparse.Namespace) -> dict:
    """Train one row with one aspect and initialisation seed; returns its metrics.json (val, test, checkpoint)."""
    dataset, roi, store = paths
    out = work / "trials" / f"{name}_{aspect}_{args.size}px_s{train_seed}"
    pairs = [f"data.dataset={dataset}", f"data.store={store}", f"roi.detector={roi or 'none'}", f"data.size={args.size}",
             f"space.seed={train_seed}", f"{aspect_key()}={aspect}", "train.test=true", *ROWS[name],
             *([f"space.epochs={args.epochs}"] if args.epochs else [])]
    if not (out / "metrics.json").is_file():  # --out reused: a finished trial is not trained again
        fsweep("train", str(TRIAL_CONFIG), "--out", str(out), *sets(pairs))
    return json.loads((out / "metrics.json").read_text())


class NewPatients:
    """Newly generated patients of one family, detected once; each trial is scored through its own recipe."""

    def __init__(self, folder: Path, args: argparse.Namespace, roi: Path | None):
        import pandas as pd

        from preprocessing.decode import decode_image
        from preprocessing.recipe import locate_roi
        from preprocessing.roi import RoiDetector

        if not (folder / "manifest.csv").is_file():
            write_phantom(folder, patients=args.new_patients, seed=NEW_SEED, difficulty=args.difficulty,
                          family=args.family, **({"size": args.image_size} if args.image_size else {}))
        manifest = pd.read_csv(folder / "manifest.csv")
        detector = RoiDetector(roi) if roi is not None else None  # None: the full frame
        self.roi = roi
        self.labels = (manifest["label"] == "abnormal").to_numpy(int)
        self.images = [decode_image(str(folder / name)) for name in manifest["image"]]
        self.boxes = [locate_roi(image, detector)[0] for image in self.images]

    def auc(self, checkpoint: str, he: str, aspect: str, size: int) -> float:
        """AUC of a trial's best epoch on these patients, preprocessed with the trial's recipe."""
        import torch

        from fsmodels.metrics import auc_score
        from fsmodels.train import load_trial_model
        from preprocessing.recipe import VariantSpec, finish_crop
        from preprocessing.roi import crop_box

        model, cfg = load_trial_model(checkpoint)
        spec = VariantSpec(he=he, size=size, aspect=aspect, roi_dir=str(self.roi) if self.roi else None,
                           margin=cfg.roi.margin if self.roi else 0.0)
        arrays = [finish_crop(crop_box(image, box, spec.margin), spec) for image, box in zip(self.images, self.boxes)]
        x = torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32) / 255.0)
        with torch.no_grad():
            scores = torch.sigmoid(model(x)).numpy()
        return float(auc_score(self.labels, scores))


def he_of(name: str) -> str:
    """The HE mode a row trains with (demo_trial keeps the config's: global)."""
    return next((s.split("=")[1] for s in ROWS[name] if s.startswith("space.he=")), "global")


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def run_rows(work: Path, paths: tuple[Path, Path, Path], args: argparse.Namespace) -> dict[str, float]:
    """Every row x aspect x training seed; prints one markdown table row each; returns mean val AUC per row."""
    fresh = NewPatients(work / "new_patients", args, paths[1]) if args.new_patients else None
    print("| family | size | row | aspect | val AUC | test AUC | new-patient AUC |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)
    headline = {}
    for name in args.rows.split(","):
        for aspect in args.aspects:
            runs = [trial(work, paths, name, aspect, s, args) for s in range(args.train_seeds)]
            val = [r["val"]["auc"] for r in runs]
            test = [r["test"]["auc"] for r in runs if "test" in r]
            new = [fresh.auc(r["checkpoint"], he_of(name), aspect, args.size) for r in runs] if fresh else []
            headline.setdefault(name, []).extend(val)
            shown = [", ".join(f"{v:.3f}" for v in values) or "-" for values in (val, test, new)]
            print(f"| {args.family} | {args.size} | {name} | {aspect} | {' | '.join(shown)} |", flush=True)
            (work / "results.jsonl").open("a").write(json.dumps(
                {"family": args.family, "seed": args.seed, "size": args.size, "row": name, "aspect": aspect,
                 "val_auc": val, "test_auc": test, "new_patients_auc": new}) + "\n")
    return {name: mean(values) for name, values in headline.items()}


def parse_args() -> argparse.Namespace:
    """Command-line options; ``--quick`` replaces the sizes with the smallest run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="work directory (default: a temporary one); reused runs skip finished steps")
    parser.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILIES, help="phantom family")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="phantom and split seed")
    parser.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY)
    parser.add_argument("--size", type=int, default=64, help="store size (the demo's: 64)")
    parser.add_argument("--aspect", default="stretch", help=f"comma-separated aspects ({', '.join(ASPECTS)})")
    parser.add_argument("--train-seeds", type=int, default=1, help="initialisation seeds per row")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: demo_trial.yaml's)")
    parser.add_argument("--new-patients", type=int, default=60, help="newly generated patients to score (0: none)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--no-detector", action="store_true", help="crop nothing: the full frame (no YOLO training)")
    parser.add_argument("--quick", action="store_true", help="the smallest run (full frame), well under a minute")
    args = parser.parse_args()
    args.image_size = None
    if args.quick:
        args.patients, args.image_size, args.size, args.epochs = QUICK["patients"], QUICK["image_size"], QUICK[
            "size"], QUICK["epochs"]
        args.rows, args.new_patients, args.no_detector = QUICK["rows"], QUICK["new_patients"], True
    args.aspects = [a.strip() for a in args.aspect.split(",")]
    unknown = [a for a in args.aspects if a not in ASPECTS] + [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"unknown aspect or row: {', '.join(unknown)}")
    return args


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        paths = prepare(work, args)
        results = run_rows(work, paths, args)
    headline = results.get("crop_only", next(iter(results.values())))
    print(f"crop_only_val_auc={headline:.3f}")


if __name__ == "__main__":
    main()
