"""Opening a built variant: checksum verification and the memory-mapped arrays trials read.

Layout of a variant::

    STORE/<key>/{train,val,test}_{left,right}.npy   uint8 N x S x S, memory-mappable
    STORE/<key>/index.parquet   image_id, patient, view, label, split, pos, x0..y1, conf, fallback
    STORE/<key>/variant.json    spec, detector hash, counts, fallback count
    STORE/<key>/manifest.json   sha256 of every file above; written last = the variant is complete
    STORE/<key>/stn/            per-variant artefacts of later stages (the frozen STN)

A reader accepts a variant only when ``manifest.json`` exists and every checksum
matches, so an interrupted build or two racing builders never yield an array a reader
accepts. A ``s3://``/``gs://`` variant is downloaded once per node
(``cluster.storage.cached_copy``) and verified like a local one.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from cluster.storage import cached_copy, exists, is_uri, join, resolve_storage
from preprocessing.files import file_sha256
from preprocessing.recipe import VariantSpec
from preprocessing.roi import BOX_COLUMNS
from preprocessing.vocab import SPLITS, VIEWS

INDEX_COLUMNS = ["image_id", "patient", "view", "label", "split", "pos", *BOX_COLUMNS, "conf", "fallback"]


@dataclass
class Variant:
    """A complete, checksum-verified variant in the store."""

    key: str  # content hash naming the variant's directory
    path: Path  # STORE/<key>
    spec: VariantSpec  # the recipe
    index: pd.DataFrame  # one row per image: INDEX_COLUMNS
    preprocessed: int = 0  # images preprocessed by the call that returned this object (0: reused)

    def images(self, split: str, view: str) -> np.ndarray:
        """The (N, S, S) uint8 array of ``split`` x ``view``, memory-mapped read-only."""
        _check_group(split, view)
        return np.load(self.path / f"{split}_{view}.npy", mmap_mode="r")

    def labels(self, split: str, view: str) -> np.ndarray:
        """Labels (1 abnormal, 0 normal) in the order of ``images(split, view)``."""
        return self._rows(split, view)["label"].to_numpy(np.int64)

    def image_ids(self, split: str, view: str) -> list[str]:
        """Image ids in the order of ``images(split, view)``."""
        return self._rows(split, view)["image_id"].tolist()

    def _rows(self, split: str, view: str) -> pd.DataFrame:
        _check_group(split, view)
        rows = self.index[(self.index["split"] == split) & (self.index["view"] == view)]
        return rows.sort_values("pos")


def open_variant(store: str | Path, key: str) -> Variant:
    """Open a complete variant; FsweepError when it is missing, incomplete or fails its checksums."""
    store = resolve_storage(store)
    path = _variant_dir(store, key)
    try:
        _verify(path)
    except FsweepError:
        if not is_uri(store):
            raise
        # this node's copy is damaged, or is of a variant since rebuilt remotely: without a fresh
        # download it would be refused for good, and every `store build` would rebuild in vain
        path = _variant_dir(store, key, refresh=True)
        _verify(path)
    meta = json.loads((path / "variant.json").read_text())
    index = pd.read_parquet(path / "index.parquet")
    return Variant(key=key, path=path, spec=VariantSpec(**meta["spec"]), index=index)


_VERIFIED: dict[Path, tuple] = {}  # variant dir -> file stats at the last successful verification


def _verify(path: Path) -> None:
    """Check every file against manifest.json; repeated opens in a process re-hash only changed files."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        state = "not built" if not path.exists() else "incomplete (no manifest.json: interrupted or in progress)"
        raise FsweepError(f"{path}: variant {state}; run `fsweep store build`")
    try:
        checksums = dict(json.loads(manifest.read_text())["sha256"])
    except (ValueError, KeyError, TypeError):  # hand-edited or foreign: refuse it, so a build replaces it
        raise FsweepError(f"{manifest}: unreadable; run `fsweep store build` to rebuild") from None
    stats = _stats(path, [manifest.name, *checksums])
    if _VERIFIED.get(path) == stats:
        return
    for name, expected in checksums.items():
        if not (path / name).is_file():
            raise FsweepError(f"{path / name}: missing from a built variant; run `fsweep store build` to rebuild")
        if file_sha256(path / name) != expected:
            raise FsweepError(f"{path / name}: checksum mismatch (corrupted); run `fsweep store build` to rebuild")
    _VERIFIED[path] = stats


def _stats(path: Path, names: list[str]) -> tuple:
    stats = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            info = (path / name).stat()
            stats.append((name, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(stats)


def _variant_dir(store: str, key: str, refresh: bool = False) -> Path:
    """The variant's local directory: STORE/<key>, or this node's cached copy of a URI store's variant."""
    if not is_uri(store):
        return Path(store) / key
    remote = join(store, key)
    if not exists(join(remote, "manifest.json")):  # uploaded last: without it the variant is not (fully) there
        raise FsweepError(f"{remote}: variant not built; run `fsweep store build`")
    return cached_copy(remote, refresh=refresh)


def _check_group(split: str, view: str) -> None:
    if split not in SPLITS or view not in VIEWS:
        raise FsweepError(f"({split!r}, {view!r}): split must be one of {SPLITS} and view one of {VIEWS}")
