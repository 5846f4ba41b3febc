"""The ROI detector: an ultralytics YOLO trained on the boxed rows, and the crop it drives.

As in the paper (YOLOv5 on 100 clinician-annotated images, one class: the cervical
spine with its foramina), the detector learns from the first ``annotated`` boxed
train-split rows and is validated on the boxed val-split rows. On a DATASET with folds each
fold trains its own from its training patients alone, as a store artifact (``preprocessing.fold_roi``).

Fallback: when the detector finds no box, the store keeps the FULL FRAME and flags the
row (``fallback`` in the store's index). A classical threshold box was not chosen: on a
radiograph the exposed field is bright almost everywhere (skull, mandible, clavicle
around the spine), so an Otsu box would be close to the full frame anyway while adding
a second, untrained crop rule; the full frame never cuts anatomy and is easy to audit.

Offline by construction (docs/design.md, 'Offline and CPU-first'): the model is built from its yaml or a local .pt,
the font check and the AMP check (both download) are kept from running, ultralytics'
settings live in a private directory (never the user's home) with telemetry ``sync``
off, and its Ray Tune integration is off (see ``_offline_ultralytics``).

Safe loading: a ``best.pt`` is a pickle. ultralytics 8.4 unpickles it with
``weights_only=False`` unless its safe-load switch is on; we turn it on for every load
(``ULTRALYTICS_SAFE_LOAD``, and ``ultralytics.nn.tasks.SAFE_LOAD`` should ultralytics have
been imported first): ``torch.load(weights_only=True)`` with an allow-list of torch and
ultralytics model classes, model yamls parsed without ``eval``. A file that needs any other
global is refused with one line, before anything in it runs (``fsweep predict`` too).
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from preprocessing.files import atomic_copy, atomic_write_text, file_sha256
from preprocessing.ingest import BOX, load_dataset

BOX_COLUMNS = list(BOX)  # the manifest's optional box, in raw-image pixels
CONF_THRESHOLD = 0.1  # below this score the ROI counts as not found (every image holds one spine: keep the best box)
MAX_DET = 1  # one box per image: the highest-confidence one after ultralytics' NMS (one spine per radiograph)
CLASS_NAME = "spine"  # the one class: the cervical spine with its foramina


def train_detector(
    dataset_dir: str | Path,
    out: str | Path,
    *,
    annotated: int,
    epochs: int,
    imgsz: int,
    model: str,
    batch: int,
    seed: int = 0,
) -> dict:
    """Train the YOLO ROI detector on boxed rows of DATASET; write ``out/best.pt`` and ``out/metrics.json``.

    The settings come from the config's ``roi`` section (``fsweep roi train``). The first
    ``annotated`` boxed train-split rows train it; every boxed val-split row validates it. Returns the metrics dict (``map50``, ``map50_95``,
    ``train_images``, ``val_images``, ``epochs``, ``imgsz``, ``seconds``, ``sha256``).
    """
    train_rows, val_rows = _boxed_rows(Path(dataset_dir), annotated)
    return fit_detector(out, train_rows, val_rows, epochs=epochs, imgsz=imgsz, model=model, batch=batch, seed=seed)


def fit_detector(out: str | Path, train_rows: pd.DataFrame, val_rows: pd.DataFrame, *, epochs: int, imgsz: int,
                 model: str, batch: int, seed: int = 0) -> dict:
    """Train YOLO on the boxes of ``train_rows``, keeping the epoch best on ``val_rows``; write ``out/best.pt``
    and ``out/metrics.json`` (ultralytics' own files under ``out/yolo_data`` and ``out/train``).

    The rows are dataset.parquet rows with a box. Returns the metrics dict of ``train_detector``.
    """
    out = Path(out).resolve()
    yolo = _load_yolo(model)
    data_yaml = _write_yolo_data(out / "yolo_data", train_rows, val_rows)
    device = _device()
    started = time.monotonic()
    results = yolo.train(
        data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, seed=seed, deterministic=True, device=device,
        workers=0 if device == "cpu" else 4,  # CPU runs: loader processes would only steal the training's cores
        amp=False,  # ultralytics' AMP check downloads yolo26n.pt; a detector this small trains fast without AMP
        warmup_epochs=1,  # the default 3 epochs are a third of a short run on 100 images
        nbs=batch,  # one optimizer step per batch: the default nominal batch of 64 means 1-2 steps an epoch here
        project=str(out), name="train", exist_ok=True, plots=False, verbose=False,
        pretrained=model.endswith(".pt"),
    )
    seconds = time.monotonic() - started
    best = out / "train" / "weights" / "best.pt"
    if not best.is_file():
        raise FsweepError(f"{out}: ultralytics finished without writing {best}")
    atomic_copy(best, out / "best.pt")
    metrics = {
        "map50": float(results.box.map50),
        "map50_95": float(results.box.map),
        "train_images": len(train_rows),
        "val_images": len(val_rows),
        "epochs": epochs,
        "imgsz": imgsz,
        "model": model,
        "seconds": round(seconds, 1),
        "sha256": file_sha256(out / "best.pt"),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


class RoiDetector:
    """A trained ROI detector (``ROI_DIR/best.pt``) that returns the highest-confidence box of an image."""

    def __init__(self, roi_dir: str | Path):
        self.roi_dir = Path(roi_dir)
        self.weights = self.roi_dir / "best.pt"
        if not self.weights.is_file():
            raise FsweepError(f"{self.roi_dir}: no best.pt (train one with `fsweep roi train`)")
        self.sha256 = file_sha256(self.weights)
        self.imgsz = _trained_imgsz(self.roi_dir)
        # detection on the CPU always: the box (so the crop, under an unchanged variant key) must not depend on
        # whether the building node has a GPU; CUDA and CPU kernels differ in the last bits, enough to move an edge
        self.device = "cpu"
        try:
            self._yolo = _load_yolo(str(self.weights))
        except (TypeError, pickle.UnpicklingError, RuntimeError) as exc:  # safe load refused it, or a damaged file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FsweepError(f"{self.weights}: not a loadable ultralytics detector under safe loading ({reason})") from None

    def detect(self, img: np.ndarray) -> tuple[tuple[float, float, float, float], float] | None:
        """Highest-confidence box ``((x0, y0, x1, y1), conf)`` in pixels of ``img`` (2-D uint8), or None."""
        result = self._yolo.predict(
            cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), imgsz=self.imgsz, conf=CONF_THRESHOLD, max_det=MAX_DET,
            device=self.device, verbose=False,
        )[0]
        if len(result.boxes) == 0:
            return None
        best = int(result.boxes.conf.argmax())
        x0, y0, x1, y1 = (float(v) for v in result.boxes.xyxy[best].tolist())
        return (x0, y0, x1, y1), float(result.boxes.conf[best])


def crop_box(img: np.ndarray, box, margin: float) -> np.ndarray:
    """Crop ``img`` to ``box`` (x0, y0, x1, y1) grown by ``margin`` x its size on every side, clipped to the image."""
    x0, y0, x1, y1 = margin_box(box, margin, img.shape)
    return img[y0:y1, x0:x1]


def margin_box(box, margin: float, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Integer crop window of ``box`` grown by ``margin`` x its width/height, clipped to an image of ``shape``."""
    height, width = shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(int(np.floor(x0 - dx)), 0), max(int(np.floor(y0 - dy)), 0)
    right, bottom = min(int(np.ceil(x1 + dx)), width), min(int(np.ceil(y1 + dy)), height)
    if right <= left or bottom <= top:
        raise FsweepError(f"box {tuple(box)}: empty after clipping to an image of {width}x{height}")
    return left, top, right, bottom


def full_frame_box(img: np.ndarray) -> tuple[float, float, float, float]:
    """The fallback box: the whole image."""
    return 0.0, 0.0, float(img.shape[1]), float(img.shape[0])


def detector_sha256(roi_dir: str | Path) -> str:
    """sha256 of ``ROI_DIR/best.pt`` without loading the model (the store's variant key uses it)."""
    weights = Path(roi_dir) / "best.pt"
    if not weights.is_file():
        raise FsweepError(f"{roi_dir}: no best.pt (train one with `fsweep roi train`)")
    return file_sha256(weights)


def _boxed_rows(dataset_dir: Path, annotated: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """First ``annotated`` boxed train rows (dataset order) and every boxed val row."""
    table = dataset_dir / "dataset.parquet"
    rows = load_dataset(dataset_dir)
    boxed = rows.dropna(subset=BOX_COLUMNS)
    train = boxed[boxed["split"] == "train"].head(annotated)
    val = boxed[boxed["split"] == "val"]
    if annotated < 1 or train.empty or val.empty:
        raise FsweepError(
            f"{table}: the detector needs boxed train and val rows; found {len(train)} train "
            f"(of annotated={annotated}) and {len(val)} val rows with x0,y0,x1,y1"
        )
    return train, val


def _write_yolo_data(root: Path, train: pd.DataFrame, val: pd.DataFrame) -> Path:
    """ultralytics' layout: images/<split>/*.bmp (decoded grey), labels/<split>/*.txt, data.yaml.

    BMP, not PNG: ultralytics decodes every training image again each epoch, and a 1006 x 590 PNG takes ~5 ms to
    inflate where the uncompressed BMP takes ~1 ms; the pixels are the same (both lossless), so is the training,
    and the demo's 15-epoch detector trains ~12 % faster.
    """
    from preprocessing.decode import decode_image

    if root.exists():
        shutil.rmtree(root)  # a previous run's images would otherwise mix with this run's
    for split, rows in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for row in rows.itertuples():
            img = decode_image(row.image)
            cv2.imwrite(str(root / "images" / split / f"{row.image_id}.bmp"), img)
            (root / "labels" / split / f"{row.image_id}.txt").write_text(_yolo_label(row, img.shape) + "\n")
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: {CLASS_NAME}\n"
    )
    return data_yaml


def _yolo_label(row, shape: tuple[int, int]) -> str:
    """``class cx cy w h`` normalised to the image, the box clipped to it."""
    height, width = shape
    x0, x1 = np.clip([row.x0, row.x1], 0, width)
    y0, y1 = np.clip([row.y0, row.y1], 0, height)
    centre = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height)
    return f"0 {centre[0]:.6f} {centre[1]:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"


def _trained_imgsz(roi_dir: Path) -> int:
    """Inference size = training size (from metrics.json; ultralytics' 640 when unknown)."""
    metrics = roi_dir / "metrics.json"
    if metrics.is_file():
        return int(json.loads(metrics.read_text()).get("imgsz", 640))
    return 640


def _device():
    """Detector training's device (``fsweep roi train``): the first CUDA device torch sees, else the CPU.

    Ray 2.60 no longer hides GPUs from tasks given zero GPUs unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1
    (``cluster.gpuenv`` sets it for fsweep's workers); detection never uses this (``RoiDetector``: CPU).
    """
    import torch

    return 0 if torch.cuda.is_available() else "cpu"


def _load_yolo(model: str):
    """A YOLO from a bundled model yaml (random init) or a local .pt; never a download."""
    _offline_ultralytics()
    from ultralytics import YOLO

    if model.endswith(".pt") and not Path(model).is_file():
        raise FsweepError(f"{model}: no such weights file (fsweep never downloads; give a local .pt or a model yaml)")
    try:
        return YOLO(model)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise FsweepError(f"{model}: cannot build a YOLO model ({exc})") from exc


@functools.cache
def _offline_ultralytics() -> None:
    """Configure ultralytics once per process before its first import; see the module docstring."""
    # Its settings file and font cache go to a private temp dir, not ~/.config, unless the user chose one.
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / f"fsweep-ultralytics-{os.getuid()}"))
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probe, no PyPI update check, no event upload
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # never pip-install a missing requirement
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"  # weights_only loads: no arbitrary unpickling (module docstring)
    import ultralytics.data.utils as data_utils
    import ultralytics.nn.tasks as tasks
    from ultralytics import settings

    tasks.SAFE_LOAD = True  # the flag is read when ultralytics is first imported: in case that was before us

    # Ray Tune: ultralytics adds a callback that calls tune.report() with YOLO's metrics when
    # it finds a Tune trial context. It is a no-op outside Tune, but a detector trained inside a
    # sweep's trial (or a Ray worker that later hosts one) would report YOLO metrics into the
    # sweep's results, so the integration is switched off with the other third-party loggers.
    settings.update(
        sync=False, raytune=False, clearml=False, comet=False, dvc=False, mlflow=False, wandb=False, tensorboard=False
    )
    # check_det_dataset() fetches Arial.ttf for plot labels; fsweep never plots boxes by default.
    data_utils.check_font = lambda *args, **kwargs: None
