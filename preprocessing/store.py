"""Building the preprocessing store: every image decoded, ROI-cropped, equalized and resized once per variant.

The recipe and its key are ``preprocessing.recipe``; opening and verifying a built
variant is ``preprocessing.variant``; uploading to a URI store is ``preprocessing.remote``.
Files are written to temporary names and moved into place with ``os.replace``, the
manifest last, under a cross-process lock per variant (``preprocessing.artifact``). Work
is spread over Ray tasks (``cluster.connect``: a small local Ray, or a cluster by
address); every node points at the same STORE path on a shared file
system. A ``s3://``/``gs://`` STORE (any pyarrow URI) is built in a node-local staging
directory and uploaded, manifest last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from cluster.storage import is_uri, join, resolve_storage
from preprocessing.decode import decode_image
from preprocessing.files import (
    atomic_write_parquet,
    atomic_write_text,
    file_sha256,
    temp_name,
    temp_owner,
)
from preprocessing.artifact import LOCKS, MANIFEST, VERIFIED, NotBuilt, build_lock, write_manifest
from preprocessing.recipe import (
    CODE_VERSION,
    VariantSpec,
    describe_spec,
    finish_crop,
    locate_roi,
    read_dataset,
    spec_key,
)
from preprocessing.remote import publish, staging_dir
from preprocessing.roi import BOX_COLUMNS, RoiDetector, crop_box, detector_sha256
from preprocessing.splits import dataset_folds, fold_column
from preprocessing.variant import INDEX_COLUMNS, Variant, open_variant
from preprocessing.vocab import SPLITS, is_off, store_views

BUILD_FILE = "build.json"  # provenance: Ray node id -> images built there (outside the checked bytes)
CHUNK = 16  # images per Ray task: small enough for a smooth progress bar, large enough to amortise a task


def build_variant(dataset_dir: str | Path, store: str | Path, spec: VariantSpec, address: str | None = None) -> Variant:
    """Build one variant (idempotent: a complete, verified variant is returned without work)."""
    return _build(Path(dataset_dir), resolve_storage(store), [spec.check()], address, None)[0]


def build_store(
    dataset_dir: str | Path,
    store: str | Path,
    *,
    roi: str | None,
    size: int,
    recipes,
    margin: float,
    address: str | None = None,
    fold_detector: tuple[int, str] | None = None,
) -> list[Variant]:
    """Build one variant per ``(he, aspect)`` pair of ``recipes``; each image is decoded and its ROI detected
    once for all of them.

    ``address``: the Ray to use (``cluster.connect``): None/local starts a small local one, ``auto`` or
    ``ray://...`` joins a cluster whose nodes all see DATASET's images and the STORE path.
    ``fold_detector``: ``(fold, detector key)`` when ``roi`` is that fold's own detector
    (``preprocessing.fold_roi``): the variants are that fold's, keyed ``fold<k>-...``.
    """
    roi_dir = None if is_off(roi) else str(Path(roi).resolve())
    specs = [VariantSpec(he=he.strip(), size=size, aspect=aspect, roi_dir=roi_dir, margin=margin).check()
             for he, aspect in recipes]
    return _build(Path(dataset_dir), resolve_storage(store), specs, address, fold_detector)


def _build(dataset_dir: Path, store: str, specs: list[VariantSpec], address: str | None,
           fold_detector: tuple[int, str] | None) -> list[Variant]:
    """Build every missing variant of ``specs`` (same detector and margin) in one pass over the images.

    Each key's build lock is held throughout (taken in key order, so two builders never deadlock):
    a second builder waits, then finds the variant complete and reuses it.
    """
    rows = read_dataset(dataset_dir)
    roi_dir = specs[0].roi_dir
    detector = detector_sha256(roi_dir) if roi_dir else None  # hashed once: keys, tasks and variant.json
    fold = fold_detector[0] if fold_detector else None
    keys = [spec_key(rows, spec, detector, fold) for spec in specs]
    workdir = staging_dir(store) if is_uri(store) else Path(store)
    unique = dict(zip(keys, specs))  # a mode given twice (--he off,off) is built once
    with contextlib.ExitStack() as locks:
        for key in sorted(unique):
            locks.enter_context(build_lock(workdir / LOCKS, key))
        done, todo = {}, []
        for key, spec in unique.items():
            try:
                done[key] = open_variant(store, key, full=True)  # a build re-hashes what it reuses
                print(f"variant {key} ({describe_spec(spec)}) up to date: no work")
            except FsweepError as reason:
                if not isinstance(reason, NotBuilt):  # damaged, incomplete or replaced: say why it is rebuilt
                    print(f"variant {key}: {reason}; rebuilding")
                todo.append((key, spec))
        if todo:
            built = _build_missing(dataset_dir, rows, detector, workdir, todo, address, fold_detector)
            for key in built if is_uri(store) else ():
                publish(workdir / key, join(store, key))
            done.update(built)
    return [done[key] for key in keys]


def _build_missing(dataset_dir: Path, rows: pd.DataFrame, detector: str | None, store: Path, todo,
                   address, fold_detector: tuple[int, str] | None) -> dict[str, Variant]:
    rows = rows.assign(pos=rows.groupby(["split", "view"]).cumcount())
    specs = [spec for _, spec in todo]
    outputs = {key: _open_outputs(store / key, rows, spec.size) for key, spec in todo}
    try:
        meta = _run_tasks(rows, specs, detector, [outputs[key] for key, _ in todo], f"store {dataset_dir.name}",
                          address)
    except BaseException:
        for tmp, _ in (entry for out in outputs.values() for entry in out.values()):
            tmp.unlink(missing_ok=True)  # a failed build leaves nothing behind (a killed one: see _remove_dead_temps)
        raise
    located = meta.drop(columns=["image_id", "node"])
    built_on = {str(node): int(count) for node, count in meta["node"].value_counts().items()}
    folds = [fold_column(k) for k in range(dataset_folds(rows.columns))]  # each fold's split, for the loader
    index = rows.drop(columns=BOX_COLUMNS).merge(located, on=["split", "view", "pos"])[INDEX_COLUMNS + folds]
    summary = dataset_dir / "summary.json"
    dataset = json.loads(summary.read_text()) if summary.is_file() else {}
    built = {}
    for key, spec in todo:
        _commit(store / key, outputs[key], index, _variant_meta(index, spec, key, detector, dataset, fold_detector))
        atomic_write_text(store / key / BUILD_FILE, json.dumps({"built_on": built_on}, indent=2))
        variant = open_variant(store, key)
        variant.preprocessed = len(index)
        fallbacks = f", {int(index['fallback'].sum())} fallback (no box found: full frame kept)" if spec.roi_dir else ""
        print(f"variant {key} ({describe_spec(spec)}): built {len(index)} images{fallbacks}")
        built[key] = variant
    return built


def _open_outputs(path: Path, rows: pd.DataFrame, size: int) -> dict[str, tuple[Path, np.memmap]]:
    """Temporary (N, S, S) arrays per split x view, in the variant's directory; stale temps removed first.

    A variant being rebuilt (it failed its check) loses its manifest first: from here until the new
    manifest lands, nothing in the directory verifies as complete, also if this builder is killed.
    """
    path.mkdir(parents=True, exist_ok=True)
    for marker in (MANIFEST, VERIFIED):
        (path / marker).unlink(missing_ok=True)
    _remove_dead_temps(path)
    outputs = {}
    for split in SPLITS:
        for view in store_views(rows["view"]):
            count = int(((rows["split"] == split) & (rows["view"] == view)).sum())
            final = path / f"{split}_{view}.npy"
            tmp = temp_name(final)
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, size, size))
            outputs[f"{split}_{view}"] = (tmp, array)
    return outputs


def _run_tasks(rows: pd.DataFrame, specs: list[VariantSpec], roi_sha256: str | None, outputs: list[dict], title: str,
               address) -> pd.DataFrame:
    """Ray tasks over chunks of images; results written into the temp arrays as they arrive."""
    import ray
    from tqdm import tqdm

    items = list(rows[["image", "split", "view", "pos", "image_id"]].itertuples(index=False, name=None))
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
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
        checksums[f"{group}.npy"] = file_sha256(tmp)  # the full check of a build: hashed as written
        os.replace(tmp, path / f"{group}.npy")
    atomic_write_parquet(index, path / "index.parquet")
    atomic_write_text(path / "variant.json", json.dumps(meta, indent=2))
    for name in ("index.parquet", "variant.json"):
        checksums[name] = file_sha256(path / name)
    write_manifest(path, meta["key"], list(checksums), checksums)


def _variant_meta(index: pd.DataFrame, spec: VariantSpec, key: str, detector: str | None, data: dict,
                  fold_detector: tuple[int, str] | None = None) -> dict:
    """variant.json: a function of the inputs only (no node ids, no times), so every builder writes the same bytes.

    ``data``: the dataset's summary.json (empty when it has none). A fold's variant also names its fold and
    its detector's store key (``fold``, ``detector_key``); a variant of one split has neither.
    """
    counts = index.groupby(["split", "view"]).size()
    folds = {"fold": fold_detector[0], "detector_key": fold_detector[1]} if fold_detector else {}
    return {
        "key": key,
        "code_version": CODE_VERSION,
        "spec": dataclasses.asdict(spec),
        "detector_sha256": detector,
        # the data set this variant was built from: export records it without reading DATASET again
        "dataset": {"fingerprint": data.get("fingerprint"), "split_seed": data.get("seed"),
                    "counts": data.get("counts"), **({"classes": data["classes"]} if "classes" in data else {})},
        "counts": {f"{s}_{v}": int(counts.get((s, v), 0)) for s in SPLITS for v in store_views(index["view"])},
        "fallback": int(index["fallback"].sum()),
        **folds,
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
