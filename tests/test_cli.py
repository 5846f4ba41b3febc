"""`fsweep synth` and `fsweep ingest` from the command line; one-line errors on bad input."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from fsweep.cli import main


def _one_error_line(text: str, prefix: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def test_synth_then_ingest(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "ph"), "--patients", "6", "--seed", "2", "--size", "74x126"]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 images of 6 patients" in out and "contact_sheet.png" in out
    assert main(["ingest", str(tmp_path / "ph" / "manifest.csv"), "--out", str(tmp_path / "ds"), "--salt", "x"]) == 0
    out = capsys.readouterr().out
    assert "both (flip)" in out and "abnormal" in out and "accepted 12 images of 6 patients" in out
    assert len(pd.read_parquet(tmp_path / "ds" / "dataset.parquet")) == 12


@pytest.mark.parametrize("argv, prefix, fragment", [
    (["ingest", "{tmp}/absent.csv", "--out", "{tmp}/ds"], "fsweep ingest: error:", "manifest not found"),
    (["ingest", "{tmp}/m.csv", "--out", "{tmp}/ds"], "fsweep ingest: error:", "missing column"),
    (["synth", "--out", "{tmp}/ph", "--patients", "0"], "fsweep synth: error:", "--patients"),
    (["synth", "--out", "{tmp}/m.csv"], "fsweep synth: error:", "not a directory"),
    (["ingest", "{tmp}/m.csv", "--out", "{tmp}/ds", "--seed", "-3"], "fsweep ingest: error:", "--seed"),
    (["ingest", "{tmp}/ok.csv", "--out", "{tmp}/m.csv"], "fsweep ingest: error:", "not a directory"),
    (["ingest", "{tmp}/ok.csv", "--out", "{tmp}/ds"], "fsweep ingest: error:", "no usable rows"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, prefix, fragment):
    (tmp_path / "m.csv").write_text("image,view\na.png,left\n")
    (tmp_path / "ok.csv").write_text("image,patient_id,view,label\na.png,p1,left,normal\n")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert fragment in _one_error_line(capsys.readouterr().err, prefix)


@pytest.mark.parametrize("argv, prefix", [
    ([], "fsweep: error:"),
    (["bogus"], "fsweep: error:"),
    (["synth"], "fsweep synth: error:"),
    (["synth", "--out", "x", "--patients", "many"], "fsweep synth: error:"),
    (["synth", "--out", "x", "--size", "big"], "fsweep synth: error:"),
    (["ingest", "m.csv"], "fsweep ingest: error:"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, prefix):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_error_line(capsys.readouterr().err, prefix)


def test_console_entry_point_reports_bad_input(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fsweep.cli", "ingest", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    _one_error_line(done.stderr, "fsweep ingest: error:")
