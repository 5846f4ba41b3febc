"""fsweep's own files in an experiment directory that may be a path or a URI.

Ray Tune writes the experiment through pyarrow's file systems; the sweep config,
leaderboard, winners and report go the same way, so ``s3://``/``gs://`` (and
``file://``) experiments work like local ones. Work that needs local files (plots,
TensorBoard's writer, evaluating a checkpoint) happens in a local directory that
is uploaded, or on a downloaded copy.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs

from cluster.errors import FsweepError
from cluster.storage import exists, is_uri, join, open_filesystem
from fsmodels.config import Config, load_config

SWEEP_CONFIG = "fsweep_sweep.yaml"  # the resolved sweep config, in the experiment directory


def put_bytes(location: str, data: bytes) -> None:
    """Write ``data`` to the file at ``location`` (parent directories created)."""
    fs, path = open_filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def put_text(location: str, text: str) -> None:
    """Write ``text`` (UTF-8) to the file at ``location``."""
    put_bytes(location, text.encode())


def get_text(location: str) -> str:
    """The UTF-8 text of the file at ``location``."""
    fs, path = open_filesystem(location)
    with fs.open_input_stream(path) as src:
        return src.read().decode()


def upload_dir(local: Path, location: str) -> None:
    """Copy the files of the local directory ``local`` into ``location`` (a no-op when they are the same)."""
    fs, path = open_filesystem(location)
    if not is_uri(location) and Path(path).resolve() == local.resolve():
        return
    pyarrow.fs.copy_files(str(local), path, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def as_local_dir(location: str) -> Path:
    """A local directory with the files of ``location``: the path itself, or a fresh download of a URI."""
    if not is_uri(location):
        return Path(location)
    fs, path = open_filesystem(location)
    target = Path(tempfile.mkdtemp(prefix="fsweep-"))
    pyarrow.fs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return target


def checkpoint_location(experiment: str, checkpoint) -> str:
    """A path or URI for a Ray ``Checkpoint`` of ``experiment`` (its path carries no URI scheme)."""
    if not is_uri(experiment):
        return checkpoint.path
    return f"{experiment.split('://', 1)[0]}://{checkpoint.path}"


def load_sweep_config(experiment: str) -> Config:
    """The resolved sweep config saved in an experiment directory (path or URI); a one-line error if it has none."""
    if not exists(join(experiment, SWEEP_CONFIG)):
        raise FsweepError(f"{experiment}: not an fsweep experiment (no {SWEEP_CONFIG})")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SWEEP_CONFIG
        local.write_text(get_text(join(experiment, SWEEP_CONFIG)))
        return load_config(local)
