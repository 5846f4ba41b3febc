"""Every benchmark in bench/ runs at its smallest size and prints its headline last as ``name=value``.

Each bench runs as a user runs it (``python bench/<name>.py --quick``) in its own process, so a
refactor that breaks one fails here instead of in ``make bench``. The quick sizes say nothing
about speed; only that the bench still works end to end.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # all of them: 4.6 min on 2 shared cores (12 min at load average 20)

BENCHES = {  # bench -> arguments of its smallest run (``{out}``: a fresh work directory)
    "store.py": ["--quick", "--out", "{out}"],
    "asha.py": ["--quick", "--out", "{out}"],
    "scaling.py": ["--quick"],
    "train_throughput.py": ["--quick"],
    "calibrate_phantom.py": ["--quick", "--out", "{out}"],
}
NOT_RUN = {  # bench files this test does not run, and why
    "gpu.py": "run at --quick by tests/test_gpu_lane.py, which also checks its four figures (once is enough)",
    "gpu_bundle.py": "packs wheels for a GPU node (`make gpu-bundle`): needs the package index, measures nothing",
}
HEADLINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=(\S+)")  # one name=value figure; gpu.py prints several on the line


def test_every_bench_file_is_run_or_said_why_not():
    files = {p.name for p in (ROOT / "bench").glob("*.py")}
    assert files == set(BENCHES) | set(NOT_RUN), "a bench without a test (add it to BENCHES) or a stale entry"


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_bench_runs_at_its_smallest_size_and_ends_with_name_value(bench, tmp_path):
    args = [a.format(out=tmp_path / "work") for a in BENCHES[bench]]
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / bench), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)  # generous: a loaded machine runs them 3x slower
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"{bench} exited {done.returncode}:\n{done.stderr[-3000:]}"
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"{bench} printed nothing"
    last = lines[-1]
    figures = last.split()
    assert figures and all(HEADLINE.fullmatch(f) for f in figures), f"{bench}: last line is not name=value: {last!r}"
    for figure in figures:
        float(HEADLINE.fullmatch(figure).group(1))  # a number (nan where only a GPU can measure it); raises if not
    print(f"{bench}: {seconds:.0f} s, {last}")
