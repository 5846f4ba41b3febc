"""``make gpu-bundle``: one xz archive of the wheels a bare GPU node lacks, for ``bench/gpu_node.sh``.

The node has Python, a CUDA torch and timm, tensorboard, onnx, onnxruntime, opencv,
pandas and pyarrow, and no network. This fetches, for the node's Python (``--python 3.12``, manylinux
x86_64), Ray Tune and Optuna with their dependencies, matplotlib (the report's plots, the STN figure)
and ultralytics and pydicom without theirs (the node check runs with ``roi.detector: none`` on PNG
phantoms; their own imports are lazy), then drops the wheels the node already has. Ray's wheel
(79 MB) loses ``ray/jars`` (Java workers), ``ray/rllib``, ``ray/serve``, ``ray/llm`` and the dashboard's web
front end, which fsweep never imports; every wheel is re-zipped uncompressed so that xz packs the folder
as one stream.
Output: ``OUT/fsweep-gpu-bundle-py<ver>.tar.xz`` and ``OUT/bundle.txt`` (what is in it, with sizes).
Last line: ``gpu_bundle_mb=..``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WITH_DEPS = ["ray[tune]==2.60.0", "optuna>=5.0", "matplotlib>=3.11"]
NO_DEPS = ["ultralytics>=8.4.190", "pydicom>=3.0.2"]
# Already on the node (its torch stack and the packages it ships) or their large dependencies: left out.
NODE_HAS = re.compile(
    r"^(torch|torchvision|triton|nvidia[-_].*|cuda[-_].*|numpy|pandas|pyarrow|opencv[-_].*|onnx|onnxruntime|timm|"
    r"tensorboard|tensorboard[-_]data[-_]server|grpcio|pillow|sympy|mpmath|networkx|huggingface[-_]hub|"
    r"safetensors|hf[-_]xet|scipy|setuptools)$", re.I)
# Java workers, RLlib, Serve, Ray LLM and the dashboard's web front end (fsweep starts Ray without the dashboard
# and reaches a cluster's through port forwarding from a full install): never imported by fsweep or Tune
RAY_STRIP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/")


def wheel_name(path: Path) -> str:
    """The distribution name of a wheel file (``ray-2.60.0-cp312-...whl`` -> ``ray``)."""
    return path.name.split("-")[0]


def download(dest: Path, python: str) -> None:
    """``pip download`` of the node's missing packages as binary wheels for ``python`` on manylinux x86_64."""
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64", "--dest", str(dest), "-q"]
    pip = [sys.executable, "-m", "pip", "download", *target]
    subprocess.run([*pip, *WITH_DEPS], check=True)
    subprocess.run([*pip, "--no-deps", *NO_DEPS], check=True)


def rezip(wheel: Path, strip: tuple[str, ...] = ()) -> None:
    """Rewrite a wheel uncompressed (xz then packs the whole folder at once, far better than per-file
    deflate), without the paths under ``strip`` and their RECORD lines."""
    out = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if strip and info.filename.startswith(strip):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(l for l in lines if not (strip and l.startswith(strip))) + "\n").encode()
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    out.replace(wheel)


def build(out: Path, python: str) -> Path:
    """Download, prune, strip Ray, pack: the archive's path."""
    out.mkdir(parents=True, exist_ok=True)
    tag = python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / f"wheels-py{tag}"
        download(raw, python)
        kept = []
        for wheel in sorted(raw.glob("*.whl")):
            if NODE_HAS.match(wheel_name(wheel)):
                wheel.unlink()
                continue
            rezip(wheel, RAY_STRIP if wheel_name(wheel) == "ray" else ())
            kept.append(wheel)
        archive = out / f"fsweep-gpu-bundle-py{tag}.tar.xz"
        with tarfile.open(archive, "w:xz", preset=9) as tar:
            tar.add(raw, arcname=raw.name)
        listing = [f"{w.name} {w.stat().st_size / 2**20:.2f} MB" for w in kept]
    (out / "bundle.txt").write_text("\n".join([f"python {python}", *listing,
                                               f"archive {archive.name} {archive.stat().st_size / 2**20:.1f} MB", ""]))
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the node's Python version (default 3.12)")
    parser.add_argument("--out", default="bench/gpu-bundle", help="output folder (kept out of git)")
    args = parser.parse_args()
    archive = build(Path(args.out), args.python)
    print((Path(args.out) / "bundle.txt").read_text(), end="")
    print(f"gpu_bundle_mb={archive.stat().st_size / 2**20:.1f}")


if __name__ == "__main__":
    main()
