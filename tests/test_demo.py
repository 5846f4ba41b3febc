"""`fsweep demo` end to end: quiet, small on disk, and its winner generalizes to newly generated patients."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

# The demo's winner scored AUC 0.871 on 120 images of 60 new patients (0.755 with the crop stretched;
# README, "Command line walk-through"); one such AUC is worth about +-0.05 and chance is 0.5: 0.65 is three
# of those above chance and below both measured values.
NEW_PATIENTS_AUC_FLOOR = 0.65


@pytest.mark.slow  # the whole demo: about 2-3 minutes on 2 cores
def test_demo_is_quiet_fits_on_disk_and_its_winner_generalizes(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "fsweep.cli", "demo", "--out", str(out)], capture_output=True,
                          text=True, timeout=1200, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = (done.stdout + done.stderr).splitlines()
    assert len(printed) < 300, len(printed)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= 1 << 30, f"{written / 1e9:.2f} GB"
    check = json.loads((out / "generalization.json").read_text())
    assert check["new_patients_auc"] >= NEW_PATIENTS_AUC_FLOOR, check
    assert check["new_patients_images"] == 120 and check["new_patients_seed"] != 0
    board = pd.read_csv(out / "runs" / "demo" / "leaderboard.csv")
    assert len(board) == 4 and board["val_auc"].max() < 0.97  # calibrated: the demo's comparison does not saturate
    assert Path(out / "model" / "model_card.json").is_file()
