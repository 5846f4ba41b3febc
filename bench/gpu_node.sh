#!/usr/bin/env bash
# One call to check a GPU node: bash bench/gpu_node.sh [--cpu] [--bundle FILE] [--out DIR]
#
# The node has Python and a CUDA torch (plus timm, tensorboard, onnx, onnxruntime, opencv, pandas, pyarrow)
# and no network. This script installs fsweep's other dependencies from the bundle `make gpu-bundle` made
# (pip --no-index, that folder only: no index, no config file, no other find-links), prints the torch/CUDA/GPU
# facts, runs `bench/gpu.py --quick`, then a real Ray Tune sweep on the node (a phantom made here, ROI none,
# 512 px, ResNet50, four trials at gpu: 0.25) and its report. Every figure goes into one folder (--out,
# default bench/results/node-<gpu>/). fsweep runs from this tree (PYTHONPATH) on the node's own torch.
# --cpu: the dry mode for a machine without a GPU (tiny sizes, gpu: 0, bench/gpu.py --cpu); `make gpu-node-dry`
# runs it in a fresh virtual environment made like the node.
# Time: the node check is meant to finish in 8 minutes (gpu.py --quick <= 3, the sweep and report the rest).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
CPU=0
BUNDLE=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --bundle) BUNDLE=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "gpu_node.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

STARTED=$(date +%s)
TAG=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
BUNDLE=${BUNDLE:-$ROOT/bench/gpu-bundle/fsweep-gpu-bundle-py$TAG.tar.xz}
[ -f "$BUNDLE" ] || { echo "gpu_node.sh: no bundle $BUNDLE (make gpu-bundle BUNDLE_PY=${TAG:0:1}.${TAG:1})" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fsweep-node.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

step() { echo "== $(( $(date +%s) - STARTED )) s: $*"; }

# 1. install from the bundle only. Into the running virtual environment when there is one, else into a new one
# that sees the node's own packages (--system-site-packages: its torch stays the torch that runs).
step "installing from $BUNDLE"
tar -xJf "$BUNDLE" -C "$WORK"
WHEELS=$WORK/wheels-py$TAG
if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  "$PY" -m venv --system-site-packages "$WORK/venv"
  PY=$WORK/venv/bin/python
fi
offline_pip() {
  env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$@"
}
offline_pip "ray[tune]==2.60.0" optuna matplotlib
offline_pip --no-deps ultralytics pydicom  # the node check needs neither's dependencies (ROI none, PNG phantoms)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
FSWEEP=("$PY" -m fsweep.cli)

# 2. the facts
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "cpu")')
OUT=${OUT:-$ROOT/bench/results/node-$GPU}
mkdir -p "$OUT"
step "facts -> $OUT/facts.txt"
"$PY" - "$CPU" <<'EOF' | tee "$OUT/facts.txt"
import os, platform, sys
import ray, torch
from cluster.gpuenv import driver_version, no_cuda_line
from fsmodels.engine import amp_dtype
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()} torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}) ray {ray.__version__} driver {driver_version()} "
      f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
if cuda:
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"gpu {i}: {props.name} capability {props.major}.{props.minor} {props.total_memory / 2**30:.1f} GiB, "
              f"{props.multi_processor_count} SMs; AMP dtype {amp_dtype(True, (props.major, props.minor))}")
elif sys.argv[1] != "1":
    sys.exit(no_cuda_line("bench/gpu_node.sh (no --cpu)"))
else:
    print("no GPU: dry mode (--cpu), every GPU figure below is a CPU stand-in")
EOF

# 3. the GPU lane benchmark
# (the dry mode's limits are looser: 2 shared CPU cores, not a GPU)
if [ "$CPU" = 1 ]; then BENCH=(--quick --cpu); PATIENTS=24; SIZE=64; BACKBONE=resnet10t; EPOCHS=1; GPUS=0; LIMIT=600
else BENCH=(--quick); PATIENTS=120; SIZE=512; BACKBONE=resnet50; EPOCHS=3; GPUS=0.25; LIMIT=200; fi
step "bench/gpu.py ${BENCH[*]} -> $OUT/gpu_quick.txt"
(cd "$ROOT" && timeout "$LIMIT" "$PY" bench/gpu.py "${BENCH[@]}") 2>&1 | tee "$OUT/gpu_quick.txt"

# 4. a real sweep on this node: phantom, ingest, store (ROI none), four trials, report
step "phantom ($PATIENTS patients), ingest, store at $SIZE px"
"${FSWEEP[@]}" synth --out "$WORK/phantom" --patients "$PATIENTS" --seed 0 > "$OUT/data.txt"
"${FSWEEP[@]}" ingest "$WORK/phantom/manifest.csv" --out "$WORK/dataset" --salt node-check >> "$OUT/data.txt"
cat > "$OUT/node_sweep.yaml" <<EOF
# bench/gpu_node.sh's sweep: four $BACKBONE trials at gpu: $GPUS on this node (seeds 0-3), ROI none, $SIZE px
data: {dataset: $WORK/dataset, store: $WORK/store, size: $SIZE}
roi: {detector: none}
space: {backbone: $BACKBONE, view: both, batch_size: 4, epochs: $EPOCHS, lr: 0.001, he: global, flip: true,
        stn: off, finetune: true, seed: [0, 1, 2, 3]}
search: {algorithm: grid, metric: val_auc, mode: max, scheduler: fifo, max_concurrent: 4}
train: {pretrained: none}
resources: {cpu: 1, gpu: $GPUS}
EOF
"${FSWEEP[@]}" store build "$WORK/dataset" --store "$WORK/store" --config "$OUT/node_sweep.yaml" >> "$OUT/data.txt" 2>&1
step "sweep -> $OUT/sweep.txt"
(cd "$WORK" && timeout 420 "${FSWEEP[@]}" sweep "$OUT/node_sweep.yaml" --name node --storage "$WORK/runs") \
  2>&1 | tail -40 > "$OUT/sweep.txt"
"${FSWEEP[@]}" report "$WORK/runs/node" > "$OUT/report.txt" 2>&1
cp "$WORK/runs/node/leaderboard.csv" "$WORK/runs/node/report.md" "$OUT/"
"$PY" - "$OUT/leaderboard.csv" <<'EOF' | tee "$OUT/summary.txt"
import sys
import pandas as pd
board = pd.read_csv(sys.argv[1])
rate = board["img_per_s"].mean()
print(f"sweep: {len(board)} trials {dict(board['status'].value_counts())}, device {board['device'].iloc[0]}, "
      f"{board['device_seconds'].sum() / 3600:.4f} device-hours, mean trial rate {rate:.1f} img/s (packed)")
EOF
step "done: every figure in $OUT"
echo "node_check_seconds=$(( $(date +%s) - STARTED ))" | tee -a "$OUT/summary.txt"
