"""Atomic file writes and checksums shared by ingestion, the ROI detector and the store.

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


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc; elsewhere the set-and-restore round trip)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # os.umask can only be read by setting it; a file another thread creates in between gets mode 0666 & ~022
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp)`` on a ``temp_name`` of ``path``, then move it into place; no temp survives a failure.

    The file gets the mode a plain ``open()`` would give it (0666 less the umask): writers that go through
    a temporary file of their own (safetensors, ``tempfile``) leave 0600, which colleagues on a shared
    disk cannot read.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_parquet(table, path: str | Path) -> None:
    """Write the DataFrame ``table`` (without its index) to ``path`` as Parquet, atomically."""
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
