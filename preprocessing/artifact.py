"""Checksummed, content-addressed store artifacts (variants, frozen STNs): manifest, checks, lock, local copy.

An artifact is a directory whose ``manifest.json`` (written last) lists the sha256 and
size of every file in it. Two checks:

- full: every file re-hashed. Once per build (before the manifest is written the
  builder hashes what it wrote) and once per download of a URI artifact; its success
  is remembered in ``.verified`` (the manifest's sha256) beside the files.
- cheap, on every open: the manifest parses, every file has its recorded size, the
  manifest's own sha256 equals ``.verified`` (and the caller's recorded one, when the
  experiment recorded it). A truncated file, a missing file, a rewritten manifest or
  a variant rebuilt with other bytes fail it; a same-size bit flip after the full
  check is only caught by a full check (``fsweep store build`` does one).

Builds hold a cross-process lock per artifact key (``filelock``, in the store's
``.locks/`` or, for a URI store, this node's staging directory), so a second builder
waits and then reuses what the first one built.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from cluster.errors import FsweepError
from cluster.storage import cached_copy, exists, is_uri, join
from preprocessing.files import atomic_write_text, file_sha256

MANIFEST = "manifest.json"  # {"key", "sha256": {name: hex}, "bytes": {name: size}}; written last
VERIFIED = ".verified"  # the manifest's sha256 after a successful full check (not itself checked)
LOCKS = ".locks"  # per-key build locks of a path store


class NotBuilt(FsweepError):
    """The artifact does not exist yet (nothing to report when building it: any other failure is worth a line)."""


def write_manifest(path: Path, key: str, names: list[str], checksums: dict[str, str] | None = None) -> str:
    """Hash ``names`` in ``path`` (unless given), write manifest.json and .verified; the manifest's sha256."""
    checksums = checksums or {name: file_sha256(path / name) for name in names}
    sizes = {name: (path / name).stat().st_size for name in names}
    atomic_write_text(path / MANIFEST, json.dumps({"key": key, "sha256": checksums, "bytes": sizes}, indent=2))
    digest = file_sha256(path / MANIFEST)
    atomic_write_text(path / VERIFIED, digest)
    return digest


def check(path: Path, what: str, expected: str | None = None, full: bool = False) -> str:
    """Cheap (or ``full``) check of the artifact in ``path``; its manifest's sha256, or a one-line FsweepError."""
    manifest = path / MANIFEST
    if not path.exists():
        raise NotBuilt(f"{path}: {what} not built; run `fsweep store build`")
    if not manifest.is_file():
        raise FsweepError(f"{path}: {what} incomplete (no manifest.json: interrupted or in progress); "
                          "run `fsweep store build`")
    digest = file_sha256(manifest)
    try:
        recorded = json.loads(manifest.read_text())
        checksums, sizes = dict(recorded["sha256"]), dict(recorded["bytes"])
    except (ValueError, KeyError, TypeError):  # hand-edited, truncated or an older format: refuse, so a build replaces it
        raise FsweepError(f"{manifest}: unreadable; run `fsweep store build` to rebuild") from None
    if expected is not None and digest != expected:
        raise FsweepError(f"{path}: {what} differs from the one the experiment recorded "
                          f"(manifest sha256 {digest[:12]} != {expected[:12]}); it was rebuilt or replaced")
    for name, size in sizes.items():
        if not (path / name).is_file():
            raise FsweepError(f"{path / name}: missing from a built {what}; run `fsweep store build` to rebuild")
        if (path / name).stat().st_size != size:
            raise FsweepError(f"{path / name}: size differs from the manifest (corrupted); run `fsweep store build`")
    verified = path / VERIFIED
    fresh = verified.is_file() and verified.read_text().strip() == digest
    if full or not fresh:
        for name, expected_sha in checksums.items():
            if file_sha256(path / name) != expected_sha:
                raise FsweepError(f"{path / name}: checksum mismatch (corrupted); run `fsweep store build` to rebuild")
    if not fresh:  # written only when it changes: readers leave a built store's files as they were
        atomic_write_text(verified, digest)
    return digest


def open_artifact(store: str, relpath: str, what: str, expected: str | None = None,
              full: bool = False) -> tuple[Path, str]:
    """The checked local directory of ``store/relpath`` (in place, or this node's copy of a URI artifact)
    and its manifest's sha256.

    A URI artifact is downloaded once per node and fully checked then; a copy that fails its
    check (damaged, or of an artifact since rebuilt remotely) is downloaded again once.
    """
    if not is_uri(store):
        path = Path(store) / relpath
        return path, check(path, what, expected, full)
    remote = join(store, relpath)
    if not exists(join(remote, MANIFEST)):  # uploaded last: without it the artifact is not (fully) there
        raise NotBuilt(f"{remote}: {what} not built; run `fsweep store build`")
    path = cached_copy(remote)
    try:
        return path, check(path, what, expected, full)
    except FsweepError:
        path = cached_copy(remote, refresh=True)
        return path, check(path, what, expected, full=True)


def build_lock(lock_dir: Path, key: str) -> FileLock:
    """The cross-process build lock of artifact ``key`` (a file in ``lock_dir``)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_dir / f"{key}.lock"))


def content_key(payload: dict) -> str:
    """16 hex of the sha256 of ``payload`` as canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
