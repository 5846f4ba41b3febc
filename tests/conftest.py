"""Shared fixtures: a tiny phantom and its ingested DATASET, built once per test session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from fsmodels.config import Config
from preprocessing.ingest import ingest
from preprocessing.phantom import write_phantom
from preprocessing.recipe import VariantSpec

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set when `make test` runs the suite on several workers
# Each worker's Ray keeps its session files (and what the address "auto" finds) in its own directory, and each
# worker's ultralytics its own settings file (preprocessing.roi's default is one per user, shared by both).
if _WORKER:
    os.environ.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / f"fsweep-ray-{_WORKER}"))
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / f"fsweep-ultralytics-{_WORKER}"))

TINY_PATIENTS = 40  # 80 images: enough for a 60/20/20 split with both classes in every split
TINY_SIZE = (148, 252)  # width x height: a quarter of the default phantom, fast to build and crop
ROI_SETTINGS = {k: v for k, v in vars(Config().roi).items() if k in ("annotated", "epochs", "imgsz", "model", "batch")}
TINY_SALT = "fsweep-tests"  # fixed so the hashed patient ids are the same in every session


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """Phantom directory (manifest.csv, images/, contact_sheet.png): 40 patients, seed 0."""
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, patients=TINY_PATIENTS, seed=0, size=TINY_SIZE)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_phantom, tmp_path_factory) -> Path:
    """DATASET directory (dataset.parquet, rejected.csv, summary.json) of the tiny phantom."""
    out = tmp_path_factory.mktemp("dataset")
    ingest(tiny_phantom / "manifest.csv", out, seed=0, salt=TINY_SALT, echo=False)
    return out


def write_dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                slope: float | None = None, intercept: float | None = None, window: tuple | None = None,
                laterality: str | None = None, headers: dict | None = None) -> Path:
    """A minimal uncompressed DICOM file, written with pydicom as a scanner would (``headers``: extra tags)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for keyword, value in (headers or {}).items():
        setattr(ds, keyword, value)
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if laterality is not None:
        ds.ImageLaterality = laterality
    ds.PixelData = stored.astype(np.uint8 if bits_stored == 8 else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny_sweep_config(dataset: Path, store: Path, **space_values) -> Config:
    """A CPU-sized sweep config (32 px, timm's test_resnet, no pretrained weights, 2 epochs, STN off)."""
    cfg = Config()
    cfg.data.dataset, cfg.data.store, cfg.data.size = str(dataset), str(store), 32
    cfg.space.backbone, cfg.space.view, cfg.space.batch_size, cfg.space.epochs = "test_resnet", "right", 8, 2
    cfg.space.lr, cfg.space.he, cfg.space.flip, cfg.space.stn, cfg.space.seed = 0.01, "global", True, "off", 0
    for key, value in space_values.items():
        setattr(cfg.space, key, value)
    cfg.train.pretrained, cfg.train.stn_epochs = "none", 1
    return cfg


def make_spec(**fields) -> VariantSpec:
    """A VariantSpec with the config's defaults (HE global, no detector) for every field a test leaves out."""
    cfg = Config()
    recipe = dict(he="global", size=cfg.data.size, aspect=cfg.space.aspect, roi_dir=None, margin=cfg.roi.margin)
    return VariantSpec(**{**recipe, **fields})


@pytest.fixture(scope="module")
def local_ray(_ray_left_running):
    """A private 2-CPU Ray (never another session's cluster), started once per test process and kept for the
    modules after this one: a start costs about 10 s of Ray's services and of its workers importing torch.
    A module that needs a Ray of its own (tests/test_cluster.py) shuts this one down first."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield


@pytest.fixture(scope="session")
def _ray_left_running():
    """Shuts down whatever Ray this test process left running when the session ends."""
    yield
    if ray.is_initialized():
        ray.shutdown()


# The modules that take longest, longest first, from a `--durations=0` run on 2 cores (docs/development.md,
# "Tests"); under `make test` (pytest-xdist, whole modules per worker) they start first so the workers finish together.
LONGEST_MODULES = ("test_demo.py", "test_docs.py", "test_export.py", "test_cluster.py", "test_search.py",
                   "test_phantom_family.py", "test_bench.py", "test_report.py", "test_folds.py", "test_roi.py",
                   "test_gpu_lane.py", "test_views.py", "test_progress.py", "test_train.py", "test_gpu_env.py",
                   "test_plan.py")


def pytest_collection_modifyitems(config, items):
    """Longest modules first (``LONGEST_MODULES``), the rest after them in their own order."""
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
