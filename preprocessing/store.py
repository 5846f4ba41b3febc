"""The preprocessing store: every image decoded, ROI-cropped, equalized and resized once per variant.

A variant is one recipe (``VariantSpec``: HE mode, size, aspect handling, detector,
margin) applied to one data set. Its key hashes the data set's decoded-pixel hashes,
splits and labels, the detector's weights, every recipe parameter and ``CODE_VERSION``,
so any change gives a new variant and nothing else does. Layout::

    STORE/<key>/{train,val,test}_{left,right}.npy   uint8 N x S x S, memory-mappable
    STORE/<key>/index.parquet   image_id, patient, view, label, split, pos, x0..y1, conf, fallback
    STORE/<key>/variant.json    spec, detector hash, counts, fallback count
    STORE/<key>/manifest.json   sha256 of every file above; written last = the variant is complete
    STORE/<key>/stn/            per-variant artefacts of later stages (the frozen STN)

Files are written to temporary names and moved into place with ``os.replace``; a
reader accepts a variant only when ``manifest.json`` exists and every checksum
matches, so an interrupted build or two racing builders never yield an array a reader
accepts. Work is spread over Ray tasks (``cluster.connect``: a small local Ray, or a
cluster by address); every node points at the same STORE path on a shared file system.
A ``s3://``/``gs://`` STORE (any pyarrow URI) is built in a node-local staging directory
and uploaded, manifest last; readers download a variant once per node
(``cluster.storage.cached_copy``) and verify it like a local one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cluster.storage import cache_root, cached_copy, exists, is_uri, join, open_filesystem, resolve_storage
from preprocessing.contrast import HE_MODES, equalize
from preprocessing.decode import decode_image
from preprocessing.errors import FsweepError
from preprocessing.files import atomic_write_parquet, atomic_write_text, file_sha256, temp_name, temp_owner
from preprocessing.ingest import load_dataset
from preprocessing.roi import BOX_COLUMNS, RoiDetector, crop_box, detector_sha256, full_frame_box
from preprocessing.splits import SPLITS

CODE_VERSION = "store-1"  # bump whenever the same inputs would give different arrays
VIEWS = ("left", "right")
ASPECTS = ("pad", "stretch")
CHUNK = 16  # images per Ray task: small enough for a smooth progress bar, large enough to amortise a task
KEY_COLUMNS = ["image_id", "pixel_sha256", "patient", "view", "label", "split"]
INDEX_COLUMNS = ["image_id", "patient", "view", "label", "split", "pos", *BOX_COLUMNS, "conf", "fallback"]


@dataclass(frozen=True)
class VariantSpec:
    """One preprocessing recipe."""

    he: str = "global"  # histogram equalization: off / global (paper eq. 1-4) / clahe
    size: int = 512  # square output size in pixels (paper: 512)
    aspect: str = "pad"  # pad (keep the crop's aspect, black borders) or stretch
    roi_dir: str | None = None  # ROI_DIR of the YOLO detector; None = full frame, no detection
    margin: float = 0.05  # crop margin, fraction of the box size per side (used only with a detector)

    def check(self) -> VariantSpec:
        """Return self, or raise FsweepError naming the bad field."""
        if self.he not in HE_MODES:
            raise FsweepError(f"he={self.he!r}: unknown histogram equalization (valid: {', '.join(HE_MODES)})")
        if self.aspect not in ASPECTS:
            raise FsweepError(f"aspect={self.aspect!r}: unknown (valid: {', '.join(ASPECTS)})")
        if not isinstance(self.size, int) or self.size < 8:
            raise FsweepError(f"size={self.size!r}: must be an integer of at least 8")
        if not 0 <= self.margin <= 1:
            raise FsweepError(f"margin={self.margin!r}: must be within [0, 1]")
        return self


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


def variant_key(dataset_dir: str | Path, spec: VariantSpec) -> str:
    """Content key of ``spec`` applied to DATASET (no decoding: uses dataset.parquet's pixel hashes)."""
    spec.check()
    rows = read_dataset(dataset_dir)
    images = hashlib.sha256(rows[KEY_COLUMNS].to_csv(index=False).encode()).hexdigest()
    payload = {
        "code": CODE_VERSION,
        "images": images,
        "detector": detector_sha256(spec.roi_dir) if spec.roi_dir else None,
        "margin": spec.margin if spec.roi_dir else None,  # no detector: no crop, so the margin changes nothing
        "he": spec.he,
        "size": spec.size,
        "aspect": spec.aspect,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_variant(dataset_dir: str | Path, store: str | Path, spec: VariantSpec, address: str | None = None) -> Variant:
    """Build one variant (idempotent: a complete, verified variant is returned without work)."""
    return _build(Path(dataset_dir), resolve_storage(store), [spec.check()], address)[0]


def build_store(
    dataset_dir: str | Path,
    store: str | Path,
    roi: str | None = "none",
    size: int = 512,
    he_modes=("off", "global", "clahe"),
    margin: float = 0.05,
    aspect: str = "pad",
    address: str | None = None,
) -> list[Variant]:
    """Build one variant per HE mode; each image is decoded and its ROI detected once for all modes.

    ``address``: the Ray to use (``cluster.connect``): None/local starts a small local one, ``auto`` or
    ``ray://...`` joins a cluster whose nodes all see DATASET's images and the STORE path.
    """
    roi_dir = None if roi in (None, "", "none", "off", False) else str(Path(roi).resolve())
    specs = [VariantSpec(he=he.strip(), size=size, aspect=aspect, roi_dir=roi_dir, margin=margin).check()
             for he in he_modes]
    return _build(Path(dataset_dir), resolve_storage(store), specs, address)


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


def read_dataset(dataset_dir: str | Path) -> pd.DataFrame:
    """DATASET/dataset.parquet (checked by ``ingest.load_dataset``) in a canonical order (split, view, image_id)."""
    rows = load_dataset(dataset_dir)
    return rows.sort_values(["split", "view", "image_id"], kind="stable").reset_index(drop=True)


def locate_roi(img: np.ndarray, detector: RoiDetector | None):
    """``(box, conf, fallback)``: the detector's best box, or the full frame (fallback when it found none)."""
    if detector is None:
        return full_frame_box(img), math.nan, False
    found = detector.detect(img)
    if found is None:
        return full_frame_box(img), math.nan, True
    return found[0], found[1], False


def to_square(img: np.ndarray, size: int, aspect: str) -> np.ndarray:
    """Resize to ``size`` x ``size``: ``stretch``, or ``pad`` (centre on black, keep the aspect ratio)."""
    if aspect == "pad":
        height, width = img.shape
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        img = cv2.copyMakeBorder(img, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0)
    interpolation = cv2.INTER_AREA if max(img.shape) > size else cv2.INTER_LINEAR  # AREA avoids aliasing when shrinking
    return cv2.resize(img, (size, size), interpolation=interpolation)


def finish_crop(crop: np.ndarray, spec: VariantSpec) -> np.ndarray:
    """The steps after the crop, in the paper's order: equalize the crop, then make it S x S."""
    return to_square(equalize(np.ascontiguousarray(crop), spec.he), spec.size, spec.aspect)


def preprocess_decoded(img: np.ndarray, spec: VariantSpec, detector: RoiDetector | None = None):
    """The recipe on a decoded image: ``(S x S uint8, box used, fallback)`` (detect, crop, equalize, resize)."""
    box, _, fallback = locate_roi(img, detector)
    return finish_crop(crop_box(img, box, spec.margin), spec), box, fallback


def preprocess_image(path: str, spec: VariantSpec, detector: RoiDetector | None = None) -> np.ndarray:
    """The whole recipe for one raw file: decode, then ``preprocess_decoded`` (the store's unit of work)."""
    return preprocess_decoded(decode_image(path), spec, detector)[0]


# --- building --------------------------------------------------------------------------

def _build(dataset_dir: Path, store: str, specs: list[VariantSpec], address: str | None) -> list[Variant]:
    """Build every missing variant of ``specs`` (same detector and margin) in one pass over the images."""
    rows = read_dataset(dataset_dir)
    keys = [variant_key(dataset_dir, spec) for spec in specs]
    done, todo = {}, []
    for key, spec in dict(zip(keys, specs)).items():  # a mode given twice (--he off,off) is built once
        try:
            done[key] = open_variant(store, key)
            print(f"variant {key} ({_describe(spec)}) up to date: no work")
        except FsweepError as reason:
            if "not built" not in str(reason):
                print(f"variant {key}: {reason}; rebuilding")
            todo.append((key, spec))
    if todo:
        workdir = _staging_dir(store) if is_uri(store) else Path(store)
        built = _build_missing(dataset_dir, rows, workdir, todo, address)
        for key in built if is_uri(store) else ():
            _publish(workdir / key, join(store, key))
        done.update(built)
    return [done[key] for key in keys]


def _build_missing(dataset_dir: Path, rows: pd.DataFrame, store: Path, todo, address) -> dict[str, Variant]:
    rows = rows.assign(pos=rows.groupby(["split", "view"]).cumcount())
    specs = [spec for _, spec in todo]
    outputs = {key: _open_outputs(store / key, rows, spec.size) for key, spec in todo}
    try:
        meta = _run_tasks(rows, specs, [outputs[key] for key, _ in todo], f"store {dataset_dir.name}", address)
    except BaseException:
        for tmp, _ in (entry for out in outputs.values() for entry in out.values()):
            tmp.unlink(missing_ok=True)  # a failed build leaves nothing behind (a killed one: see _remove_dead_temps)
        raise
    located = meta.drop(columns=["image_id", "node"])
    built_on = meta["node"].value_counts().to_dict()
    index = rows.drop(columns=BOX_COLUMNS).merge(located, on=["split", "view", "pos"])[INDEX_COLUMNS]
    built = {}
    for key, spec in todo:
        _commit(store / key, outputs[key], index, _variant_meta(index, spec, key, built_on))
        variant = open_variant(store, key)
        variant.preprocessed = len(index)
        fallbacks = f", {int(index['fallback'].sum())} fallback (no box found: full frame kept)" if spec.roi_dir else ""
        print(f"variant {key} ({_describe(spec)}): built {len(index)} images{fallbacks}")
        built[key] = variant
    return built


def _open_outputs(path: Path, rows: pd.DataFrame, size: int) -> dict[str, tuple[Path, np.memmap]]:
    """Temporary (N, S, S) arrays per split x view, in the variant's directory; stale temps removed first."""
    path.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    outputs = {}
    for split in SPLITS:
        for view in VIEWS:
            count = int(((rows["split"] == split) & (rows["view"] == view)).sum())
            final = path / f"{split}_{view}.npy"
            tmp = temp_name(final)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, size, size))
            outputs[f"{split}_{view}"] = (tmp, array)
    return outputs


def _run_tasks(rows: pd.DataFrame, specs: list[VariantSpec], outputs: list[dict], title: str, address) -> pd.DataFrame:
    """Ray tasks over chunks of images; results written into the temp arrays as they arrive."""
    import ray
    from tqdm import tqdm

    items = list(rows[["image", "split", "view", "pos", "image_id"]].itertuples(index=False, name=None))
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
    roi_dir = specs[0].roi_dir
    roi_sha256 = detector_sha256(roi_dir) if roi_dir else None  # hashed once here, not once per chunk
    records = []
    with _ray_session(address):
        # tasks are pure functions of their chunk: a chunk whose worker or node died simply runs again
        task = ray.remote(num_cpus=1, max_retries=3)(_process_chunk)
        pending = [task.remote(chunk, specs, roi_sha256) for chunk in chunks]
        try:
            with tqdm(total=len(items), desc=title, unit="img") as progress:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    chunk_meta, arrays = ray.get(ready[0])
                    for record, *images in zip(chunk_meta, *arrays):
                        for out, image in zip(outputs, images):
                            out[f"{record['split']}_{record['view']}"][1][record["pos"]] = image
                        records.append(record)
                    progress.update(len(chunk_meta))
        except BaseException as exc:
            for ref in pending:  # on a joined cluster they would otherwise run on for a build that failed
                ray.cancel(ref)
            if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, FsweepError):
                raise FsweepError(str(exc.cause)) from None  # e.g. an image gone since ingest: its one line
            raise
    return pd.DataFrame(records)


def _process_chunk(chunk, specs: list[VariantSpec], roi_sha256: str | None):
    """Ray task: decode each image once, locate its ROI once, then finish it for every spec."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    roi_dir = specs[0].roi_dir
    detector = _cached_detector(roi_dir, roi_sha256) if roi_dir else None
    meta, arrays = [], [[] for _ in specs]
    for image, split, view, pos, image_id in chunk:
        img = decode_image(image)
        box, conf, fallback = locate_roi(img, detector)
        crop = np.ascontiguousarray(crop_box(img, box, specs[0].margin))  # one copy shared by every spec
        for out, spec in zip(arrays, specs):
            out.append(finish_crop(crop, spec))
        meta.append(dict(zip(["image_id", "split", "view", "pos", *BOX_COLUMNS, "conf", "fallback", "node"],
                             [image_id, split, view, pos, *box, conf, fallback, node])))
    return meta, [np.stack(out) if out else out for out in arrays]


@lru_cache(maxsize=2)
def _cached_detector(roi_dir: str, sha256: str) -> RoiDetector:
    """One detector per Ray worker process and weights file (workers are reused across tasks and builds)."""
    return RoiDetector(roi_dir)


@contextlib.contextmanager
def _ray_session(address: str | None):
    """Ray through ``cluster.connect`` (the process's own if running); shut down only a Ray started here."""
    import ray

    from cluster.connect import connect

    started = not ray.is_initialized()
    connect(address, num_cpus=min(os.cpu_count() or 1, 8))  # local: a small private Ray, never someone else's
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _commit(path: Path, outputs: dict, index: pd.DataFrame, meta: dict) -> None:
    """Move arrays into place, then index and variant.json, then the manifest (last: the variant is complete)."""
    checksums = {}
    for group, (tmp, array) in outputs.items():
        array.flush()
        checksums[f"{group}.npy"] = file_sha256(tmp)
        os.replace(tmp, path / f"{group}.npy")
    atomic_write_parquet(index, path / "index.parquet")
    checksums["index.parquet"] = file_sha256(path / "index.parquet")
    atomic_write_text(path / "variant.json", json.dumps(meta, indent=2))
    checksums["variant.json"] = file_sha256(path / "variant.json")
    atomic_write_text(path / "manifest.json", json.dumps({"key": meta["key"], "sha256": checksums}, indent=2))


def _variant_meta(index: pd.DataFrame, spec: VariantSpec, key: str, built_on: dict) -> dict:
    counts = index.groupby(["split", "view"]).size()
    return {
        "key": key,
        "code_version": CODE_VERSION,
        "spec": dataclasses.asdict(spec),
        "detector_sha256": detector_sha256(spec.roi_dir) if spec.roi_dir else None,
        "counts": {f"{s}_{v}": int(counts.get((s, v), 0)) for s in SPLITS for v in VIEWS},
        "fallback": int(index["fallback"].sum()),
        "built_on": {str(node): int(count) for node, count in built_on.items()},  # Ray node id -> images
    }


def _remove_dead_temps(path: Path) -> None:
    """Delete temp files left by killed builders on this host (live builders' temps are kept)."""
    host = socket.gethostname()
    for tmp in path.glob(".*.tmp"):
        owner = temp_owner(tmp)
        if owner and owner[0] == host and not _pid_alive(owner[1]):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# --- verification ----------------------------------------------------------------------

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


# --- small helpers ---------------------------------------------------------------------

def _variant_dir(store: str, key: str, refresh: bool = False) -> Path:
    """The variant's local directory: STORE/<key>, or this node's cached copy of a URI store's variant."""
    if not is_uri(store):
        return Path(store) / key
    remote = join(store, key)
    if not exists(join(remote, "manifest.json")):  # uploaded last: without it the variant is not (fully) there
        raise FsweepError(f"{remote}: variant not built; run `fsweep store build`")
    return cached_copy(remote, refresh=refresh)


def _staging_dir(store: str) -> Path:
    """Where this node builds variants of a URI store before uploading them."""
    return cache_root() / "staging" / hashlib.sha256(store.encode()).hexdigest()[:16]


def _publish(local: Path, remote: str) -> None:
    """Upload a built variant: every file, then manifest.json last (readers wait for it)."""
    import pyarrow.fs

    fs, path = open_filesystem(remote)
    fs.create_dir(path, recursive=True)
    names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != "manifest.json")
    for name in [*names, "manifest.json"]:
        pyarrow.fs.copy_files(str(local / name), f"{path}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)


def _check_group(split: str, view: str) -> None:
    if split not in SPLITS or view not in VIEWS:
        raise FsweepError(f"({split!r}, {view!r}): split must be one of {SPLITS} and view one of {VIEWS}")


def _describe(spec: VariantSpec) -> str:
    roi = f"roi={spec.roi_dir}, margin={spec.margin}" if spec.roi_dir else "roi=none"
    return f"he={spec.he}, size={spec.size}, aspect={spec.aspect}, {roi}"
