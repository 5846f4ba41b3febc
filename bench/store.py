"""Benchmark: per-access preprocessing against the preprocessing store.

(a) naive: every time an epoch needs an image, decode the raw file, detect the ROI with
    the YOLO detector, crop, equalize and resize it to 512 x 512;
(b) store: build the variant once, then read the uint8 memmap through the trial loader.
Both feed the same torch DataLoader (batch 4, as the paper) in the same run, timed alternately.
Then 10 trials ask the store for the variant, as sweep trials do, and the number of
images preprocessed over all of them is counted: it must equal the number of images.

The data is a phantom written here (default size 590 x 1006, as `fsweep synth`), and
the detector is a small YOLO trained here for a minute (or `--roi ROI_DIR`).
Last line: ``store_speedup_x=<ratio>`` (images/s of the store over the naive path).
Usage: ``python bench/store.py [--quick]`` (``--quick``: the smallest run, 12 patients at 64 px with a
2-epoch detector, to check that the bench works; its ratio means little).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/store.py` from a checkout

from fsmodels.config import Config  # noqa: E402
from preprocessing.ingest import ingest  # noqa: E402
from preprocessing.loader import train_set  # noqa: E402
from preprocessing.phantom import write_phantom  # noqa: E402
from preprocessing.recipe import VariantSpec, preprocess_image, read_dataset  # noqa: E402
from preprocessing.roi import RoiDetector, train_detector  # noqa: E402
from preprocessing.store import build_variant  # noqa: E402


class NaiveSet(Dataset):
    """The training images, preprocessed from the raw file on every access (what the store avoids)."""

    def __init__(self, rows, spec: VariantSpec, detector: RoiDetector):
        self.paths, self.labels = rows["image"].tolist(), rows["label"].tolist()
        self.spec, self.detector = spec, detector

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = preprocess_image(self.paths[i], self.spec, self.detector)
        return torch.from_numpy(image[None]), float(self.labels[i])


def images_per_second(dataset: Dataset, epochs: int, batch_size: int) -> float:
    """Iterate ``epochs`` shuffled epochs through a DataLoader; images per second of wall time."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    started, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for images, _labels in loader:
            seen += len(images)
    return seen / (time.perf_counter() - started)


QUICK = dict(patients=12, size=64, epochs=1, trials=2, naive_images=4, roi_epochs=2, roi_imgsz=64)  # --quick


def prepare(out: Path, patients: int, roi: str | None, roi_epochs: int = 30, roi_imgsz: int = 128) -> tuple[Path, str]:
    """Phantom -> DATASET -> ROI detector (trained here unless ``roi`` is given)."""
    write_phantom(out / "phantom", patients=patients, seed=0)
    ingest(out / "phantom" / "manifest.csv", out / "dataset", seed=0, salt="bench", echo=False)
    if roi:
        return out / "dataset", roi
    metrics = train_detector(out / "dataset", out / "roi", annotated=100, epochs=roi_epochs, imgsz=roi_imgsz, batch=4,
                             model="yolo11n.yaml")
    print(f"detector: mAP50={metrics['map50']:.3f} in {metrics['seconds']:.0f} s")
    return out / "dataset", str(out / "roi")


def run(out: Path, patients: int, roi: str | None, size: int, epochs: int, trials: int, batch_size: int,
        naive_images: int, roi_epochs: int = 30, roi_imgsz: int = 128) -> float:
    """The benchmark; returns the store's speed-up over the naive path.

    The two paths are timed alternately, trial after trial, so both see the same load on
    a shared machine: each trial reads its ``epochs`` from the store and preprocesses
    ``naive_images`` training images the naive way.
    """
    dataset, roi_dir = prepare(out, patients, roi, roi_epochs, roi_imgsz)
    # the paper's recipe: HE, then a plain resize of the crop (stretch), with the config's default margin
    spec = VariantSpec(he="global", size=size, aspect="stretch", roi_dir=roi_dir, margin=Config().roi.margin)
    rows = read_dataset(dataset)
    train_rows = rows[rows["split"] == "train"]
    naive = NaiveSet(train_rows.sample(min(naive_images, len(train_rows)), random_state=0), spec, RoiDetector(roi_dir))
    preprocessed, store_ips, naive_ips = 0, [], []
    for _ in range(trials):
        variant = build_variant(dataset, out / "store", spec)  # what each trial of a sweep relies on
        preprocessed += variant.preprocessed
        store_ips.append(images_per_second(train_set(variant, "both", flip=False), epochs, batch_size))
        naive_ips.append(images_per_second(naive, 1, batch_size))
    store, naive_rate = median(store_ips), median(naive_ips)
    print(f"images={len(rows)} (train {len(train_rows)}), size={size}, epochs={epochs}, batch={batch_size}")
    print(f"naive_images_per_s={naive_rate:.1f} (median of {trials} trials, {len(naive)} images each)")
    print(f"store_images_per_s={store:.1f} (median of {trials} trials, {epochs} epochs of {len(train_rows)} each)")
    print(f"preprocessing_calls_{trials}_trials={preprocessed} (images: {len(rows)})")
    if preprocessed != len(rows):
        raise SystemExit(f"preprocessing calls {preprocessed} != images {len(rows)}")
    return store / naive_rate


def main() -> None:
    """Parse arguments, run the benchmark, print the ratio last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=50, help="phantom patients (2 images each)")
    parser.add_argument("--size", type=int, default=512, help="output size of the variant (paper: 512)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial on each path")
    parser.add_argument("--trials", type=int, default=10, help="trials that use the variant")
    parser.add_argument("--batch-size", type=int, default=4, help="DataLoader batch (paper: 4)")
    parser.add_argument("--naive-images", type=int, default=12, help="images the naive path preprocesses per trial")
    parser.add_argument("--roi", default=None, help="an existing ROI_DIR (default: train a small detector here)")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help=f"the smallest run ({QUICK}); overrides those flags")
    args = parser.parse_args()
    sizes = dict(roi_epochs=30, roi_imgsz=128)
    if args.quick:
        sizes = {k: QUICK.pop(k) for k in ("roi_epochs", "roi_imgsz")}
        vars(args).update(QUICK)
    with tempfile.TemporaryDirectory(prefix="fsweep-bench-") as tmp:
        out = Path(args.out or tmp)
        ratio = run(out, args.patients, args.roi, args.size, args.epochs, args.trials, args.batch_size,
                    args.naive_images, **sizes)
    print(f"store_speedup_x={ratio:.1f}")


if __name__ == "__main__":
    main()
