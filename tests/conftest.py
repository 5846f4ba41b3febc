"""Shared fixtures: a tiny phantom and its ingested DATASET, built once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.ingest import ingest
from preprocessing.phantom import write_phantom

TINY_PATIENTS = 40  # 80 images: enough for a 60/20/20 split with both classes in every split
TINY_SIZE = (148, 252)  # width x height: a quarter of the default phantom, fast to build and crop
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
