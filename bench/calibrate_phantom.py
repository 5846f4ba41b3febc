"""Calibration of the phantom (issue 11, item 1): do the demo-scale trials land in the useful range?

Writes a phantom (the demo's scale: 100 patients at the default size), ingests it, trains the
demo's YOLO ROI detector, builds the 64 px store (HE off and global), then trains a few trials
of ``configs/demo_trial.yaml`` that differ only in the paper's methods:

    crop_only   he off,    flip off, stn off   (the baseline: ROI crop + resnet10t from scratch)
    he          he global, flip off, stn off
    flip        he off,    flip on,  stn off
    demo_trial  he global, flip on,  stn frozen (configs/demo_trial.yaml as shipped)

Targets: crop_only val AUC about 0.65-0.85, demo_trial between 0.6 and 0.97, and no row at 1.0.
Validation is 20 patients x 2 views, so one AUC is worth about +-0.08; ``--train-seeds`` repeats
every row with more initialisation seeds and reports the mean.
Every step is the ``fsweep`` command a user would type (the phantom is written by the library).
Last line: ``crop_only_val_auc=<mean>``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/calibrate_phantom.py` from a checkout

from preprocessing.phantom import DEFAULT_DIFFICULTY, write_phantom

TRIAL_CONFIG = ROOT / "configs" / "demo_trial.yaml"
ROWS = {
    "crop_only": ["space.he=off", "space.flip=false", "space.stn=off"],
    "he": ["space.he=global", "space.flip=false", "space.stn=off"],
    "flip": ["space.he=off", "space.flip=true", "space.stn=off"],
    "demo_trial": [],
}


def fsweep(*args: str) -> None:
    """Run one ``fsweep`` command of this environment; stop with its output when it fails."""
    command = [str(Path(sys.executable).parent / "fsweep"), *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def prepare(work: Path, patients: int, seed: int, difficulty: float, size: int) -> tuple[Path, Path, Path]:
    """Phantom -> DATASET -> ROI detector -> STORE (HE off and global); returns (dataset, roi, store)."""
    phantom, dataset, roi, store = (work / name for name in ("phantom", "dataset", "roi", "store"))
    started = time.monotonic()
    write_phantom(phantom, patients=patients, seed=seed, difficulty=difficulty)
    print(f"phantom: {patients} patients, seed {seed}, difficulty {difficulty} "
          f"({time.monotonic() - started:.1f} s)", flush=True)
    fsweep("ingest", str(phantom / "manifest.csv"), "--out", str(dataset), "--seed", str(seed))
    fsweep("roi", "train", str(dataset), "--out", str(roi), "--config", str(ROOT / "configs" / "demo.yaml"))
    map50 = json.loads((roi / "metrics.json").read_text()).get("map50")
    print(f"ROI detector mAP50={map50}", flush=True)
    fsweep("store", "build", str(dataset), "--store", str(store), "--roi", str(roi), "--size", str(size),
           "--he", "off,global")
    print(f"prepared in {time.monotonic() - started:.0f} s", flush=True)
    return dataset, roi, store


def trial(work: Path, paths: tuple[Path, Path, Path], name: str, overrides: list[str], train_seed: int) -> float:
    """Train one row of the table with one initialisation seed; returns its best-epoch val AUC."""
    dataset, roi, store = paths
    out = work / "trials" / f"{name}_s{train_seed}"
    sets = [f"data.dataset={dataset}", f"data.store={store}", f"roi.detector={roi}",
            f"space.seed={train_seed}", *overrides]
    fsweep("train", str(TRIAL_CONFIG), "--out", str(out), *[arg for s in sets for arg in ("--set", s)])
    return float(json.loads((out / "metrics.json").read_text())["val"]["auc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="phantom and split seed")
    parser.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY)
    parser.add_argument("--size", type=int, default=64, help="store size (the demo's)")
    parser.add_argument("--train-seeds", type=int, default=1, help="initialisation seeds per row")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        paths = prepare(work, args.patients, args.seed, args.difficulty, args.size)
        results = {}
        print("| row | val AUC per training seed | mean |", flush=True)
        print("|---|---|---|", flush=True)
        for name in args.rows.split(","):
            aucs = [trial(work, paths, name, ROWS[name], s) for s in range(args.train_seeds)]
            results[name] = sum(aucs) / len(aucs)
            print(f"| {name} | {', '.join(f'{a:.3f}' for a in aucs)} | {results[name]:.3f} |", flush=True)
    headline = results.get("crop_only", next(iter(results.values())))
    print(f"crop_only_val_auc={headline:.3f}")


if __name__ == "__main__":
    main()
