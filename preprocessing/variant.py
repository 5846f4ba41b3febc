"""Opening a built variant: checksum verification and the memory-mapped arrays trials read.

Layout of a variant::

    STORE/<key>/{train,val,test}_<view>.npy   uint8 N x S x S, memory-mappable, per view of the data set
    STORE/<key>/index.parquet   image_id, patient, view, label, split, pos, x0..y1, conf, fallback
    STORE/<key>/variant.json    spec, detector hash, data fingerprint, counts (deterministic: no node ids);
                                a fold's variant (``fold<k>-`` key) also its fold and detector key
    STORE/<key>/manifest.json   sha256 and size of every file above; written last = the variant is complete
    STORE/<key>/build.json      provenance (which Ray nodes built how many images); not checked
    STORE/<key>/.verified       the manifest's sha256 after the last full check

A reader accepts a variant only when ``manifest.json`` exists and passes the checks of
``preprocessing.artifact`` (fully hashed once per build or download, sizes and the
manifest's hash on every open), so an interrupted build never yields an array a reader
accepts. A ``s3://``/``gs://`` variant is downloaded once per node
(``cluster.storage.cached_copy``) and checked like a local one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from cluster.storage import exists, join, open_filesystem, resolve_storage
from preprocessing.artifact import MANIFEST, open_artifact
from preprocessing.recipe import VariantSpec
from preprocessing.roi import BOX_COLUMNS
from preprocessing.vocab import LABEL_NAMES, SPLITS, store_views

INDEX_COLUMNS = ["image_id", "patient", "view", "label", "split", "pos", *BOX_COLUMNS, "conf", "fallback"]


@dataclass
class Variant:
    """A complete, checksum-verified variant in the store."""

    key: str  # content hash naming the variant's directory
    path: Path  # STORE/<key>
    spec: VariantSpec  # the recipe
    index: pd.DataFrame  # one row per image: INDEX_COLUMNS
    manifest: str = ""  # sha256 of its manifest.json: with the key, the handle an experiment records
    preprocessed: int = 0  # images preprocessed by the call that returned this object (0: reused)
    meta: dict = field(default_factory=dict)  # its variant.json: detector hash, data set fingerprint, counts

    @property
    def views(self) -> tuple[str, ...]:
        """The data set's views this variant holds arrays for (left, right for the paper's shape)."""
        return store_views(self.index["view"])

    @property
    def classes(self) -> tuple[str, str]:
        """(negative, positive) class names of the data set (normal / abnormal unless it named its own)."""
        named = (self.meta.get("dataset") or {}).get("classes")
        return (named["negative"], named["positive"]) if named else LABEL_NAMES

    def images(self, split: str, view: str) -> np.ndarray:
        """The (N, S, S) uint8 array of ``split`` x ``view``, memory-mapped read-only."""
        _check_group(split, view, self.views)
        return np.load(self.path / f"{split}_{view}.npy", mmap_mode="r")

    def labels(self, split: str, view: str) -> np.ndarray:
        """Labels (1 abnormal, 0 normal) in the order of ``images(split, view)``."""
        return self._rows(split, view)["label"].to_numpy(np.int64)

    def image_ids(self, split: str, view: str) -> list[str]:
        """Image ids in the order of ``images(split, view)``."""
        return self._rows(split, view)["image_id"].tolist()

    def _rows(self, split: str, view: str) -> pd.DataFrame:
        _check_group(split, view, self.views)
        rows = self.index[(self.index["split"] == split) & (self.index["view"] == view)]
        return rows.sort_values("pos")


def open_variant(store: str | Path, key: str, expected: str | None = None, full: bool = False) -> Variant:
    """Open a complete variant by its key; FsweepError when it is missing, incomplete, corrupted or differs.

    Each open does the cheap check of ``preprocessing.artifact`` (sizes, the manifest's hash, and
    ``expected``: the manifest sha256 an experiment recorded); ``full`` re-hashes every file.
    """
    path, manifest = open_artifact(resolve_storage(store), key, "variant", expected, full)
    meta = json.loads((path / "variant.json").read_text())
    index = pd.read_parquet(path / "index.parquet")
    return Variant(key=key, path=path, spec=VariantSpec(**meta["spec"]), index=index,
                   manifest=manifest, meta=meta)


def list_variants(store: str) -> list[str]:
    """Keys of the complete variants (a manifest.json under ``STORE/<key>/``) of a path or URI store."""
    import pyarrow.fs

    fs, root = open_filesystem(store)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        raise FsweepError(f"{store}: store directory not found")
    dirs = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(root))
            if info.type == pyarrow.fs.FileType.Directory and not info.base_name.startswith(".")]
    return sorted(key for key in dirs if key != "stn" and exists(join(store, key, MANIFEST)))


def _check_group(split: str, view: str, views: tuple[str, ...]) -> None:
    if split not in SPLITS or view not in views:
        raise FsweepError(f"({split!r}, {view!r}): split must be one of {SPLITS} and view one of {views}")
