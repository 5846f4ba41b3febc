"""Where experiments and stores live: a local or shared-FS path, or a URI.

A path (``runs``, ``/shared/fsweep/runs``) is made absolute, because trials and tasks
run in other processes and on other nodes: on a cluster it must be on a file system
that every node mounts at the same place. A URI (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``file:///abs/path``) is kept as given and opened with
``pyarrow.fs.FileSystem.from_uri``, exactly as Ray Tune opens ``RunConfig(storage_path)``.

Store variants are content-addressed (their key hashes the pixels and the recipe), so
a node may copy one to local disk once and read it from there for every later trial:
:func:`cached_copy` does that, safely when several trials on one node ask at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from cluster.errors import FsweepError

URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # schemes pyarrow.fs opens
CACHE_ENV = "FSWEEP_CACHE"  # overrides the per-node cache directory (default ~/.cache/fsweep)
COMPLETE = ".complete"  # marker written last into a finished cache copy


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations, False for plain paths."""
    return "://" in str(location)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def resolve_storage(location: str | os.PathLike | None, default: str = "runs") -> str:
    """The ``storage_path`` to hand to Ray Tune: a supported URI as given, a path made absolute.

    Raises FsweepError for a URI scheme pyarrow cannot open.
    """
    location = str(location or default)
    if not is_uri(location):
        return str(Path(location).expanduser().resolve())
    if _scheme(location) not in URI_SCHEMES:
        raise FsweepError(f"{location}: unsupported storage scheme (use a path or one of {', '.join(URI_SCHEMES)})")
    return location.rstrip("/")


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for paths and URIs alike (URIs keep their ``/`` separators)."""
    base = str(location).rstrip("/")
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([base, *(p.strip("/") for p in parts)])


def open_filesystem(location: str | os.PathLike):
    """``(pyarrow.fs.FileSystem, path inside it)`` for a path or URI (no I/O for local paths)."""
    import pyarrow.fs

    resolved = resolve_storage(location)
    try:
        return pyarrow.fs.FileSystem.from_uri(resolved)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses, one line is enough
        raise FsweepError(f"{location}: cannot open storage: {exc}") from exc


def exists(location: str | os.PathLike) -> bool:
    """True when a file or directory exists at ``location``."""
    import pyarrow.fs

    fs, path = open_filesystem(location)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def cache_root() -> Path:
    """This node's cache directory for remote store variants (``$FSWEEP_CACHE`` or ~/.cache/fsweep)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fsweep").expanduser()


def cached_copy(location: str | os.PathLike, root: Path | None = None, refresh: bool = False) -> Path:
    """A local directory with the files of ``location``.

    A local path is returned as it is (a shared FS needs no copy). A URI is downloaded
    once per node into ``root`` (default :func:`cache_root`): under a file lock, into a
    temporary directory renamed into place, so concurrent callers on one node download
    once and a crash never leaves a half copy. Meant for immutable content (store variants);
    ``refresh`` downloads again anyway, for a copy that failed its checksums.
    """
    if not is_uri(location):
        return Path(resolve_storage(location))
    import pyarrow.fs

    uri = resolve_storage(location)
    root = Path(root or cache_root())
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not refresh and (target / COMPLETE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if refresh:
            (target / COMPLETE).unlink(missing_ok=True)
        if not (target / COMPLETE).is_file():
            fs, path = open_filesystem(uri)
            if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
                raise FsweepError(f"{uri}: no such directory")
            tmp = root / f"{target.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                (tmp / COMPLETE).write_text(uri + "\n")
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)  # another pid's retry would never clean this one up
                if isinstance(exc, OSError):  # pyarrow's I/O errors (network, permissions, disk full)
                    raise FsweepError(f"{uri}: download to {root} failed: {exc}") from exc
                raise
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return target
