"""Artifacts (variants, frozen STNs) of a ``s3://``/``gs://`` store: built in a node-local staging directory, then uploaded."""
from __future__ import annotations

import hashlib
from pathlib import Path

from cluster.storage import cache_root, open_filesystem
from preprocessing.artifact import MANIFEST


def staging_dir(store: str) -> Path:
    """Where this node builds variants of a URI store before uploading them."""
    return cache_root() / "staging" / hashlib.sha256(store.encode()).hexdigest()[:16]


def publish(local: Path, remote: str) -> None:
    """Upload a built artifact: every file, then manifest.json last (readers wait for it).

    Dot files (``.verified``, locks, temps) are this node's state: a downloader checks its copy itself.
    """
    import pyarrow.fs

    fs, path = open_filesystem(remote)
    fs.create_dir(path, recursive=True)
    names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    for name in [*names, MANIFEST]:
        pyarrow.fs.copy_files(str(local / name), f"{path}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=fs)
