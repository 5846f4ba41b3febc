"""Atomic file writes and checksums shared by the ROI detector and the store.

A reader never sees a half-written file: everything is written to a temporary file in
the destination's directory and moved into place with ``os.replace`` (atomic on POSIX
and on one file system, including NFS for a single rename).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

TEMP_PATTERN = re.compile(r"\.(?P<pid>\d+)-[0-9a-f]{8}@(?P<host>.+)\.tmp$")  # the tail of temp_name()


def temp_name(path: Path) -> Path:
    """A unique temporary sibling of ``path``: host, pid and a random part keep racing builders apart."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}.tmp")


def temp_owner(tmp: Path) -> tuple[str, int] | None:
    """(host, pid) of the process that made a ``temp_name`` file, or None for other names."""
    match = TEMP_PATTERN.search(tmp.name)
    return (match["host"], int(match["pid"])) if match else None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = temp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    dst = Path(dst)
    tmp = temp_name(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
