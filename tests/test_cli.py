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


def test_synth_nuisance_flags_reach_the_generator(tmp_path):
    def images(name, *flags):
        argv = ["synth", "--out", str(tmp_path / name), "--patients", "2", "--size", "74x126", *flags]
        assert main(argv) == 0
        return [p.read_bytes() for p in sorted((tmp_path / name / "images").glob("*.png"))]

    default = images("a")
    assert images("b") == default  # same flags, same bytes
    assert images("c", "--no-exposure") != default
    assert images("d", "--no-pose", "--no-view-gap", "--label-noise", "0") != default


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


# --- one config path: flags are --set shortcuts, the space is typed when the config loads ---------

def _config_of(argv: list[str]):
    from fsweep.cli import _config, build_parser

    args = build_parser().parse_args(argv)
    positional = {"data.dataset": args.dataset, "data.store": args.store} if hasattr(args, "dataset") and \
        getattr(args, "store_command", None) else {}
    return _config(args, **positional).to_dict()


@pytest.mark.parametrize("flags, sets", [
    (["store", "build", "DS", "--store", "ST", "--size", "48", "--he", "off,clahe", "--aspect", "pad,stretch", "--margin", "0.1"],
     ["store", "build", "DS", "--store", "ST", "--set", "data.size=48", "--set", "space.he=[off, clahe]",
      "--set", "space.aspect=[pad, stretch]", "--set", "roi.margin=0.1"]),
    (["roi", "train", "DS", "--out", "R", "--epochs", "3", "--imgsz", "96", "--annotated", "20"],
     ["roi", "train", "DS", "--out", "R", "--set", "roi.epochs=3", "--set", "roi.imgsz=96", "--set", "roi.annotated=20"]),
    (["stn", "train", "ST", "--epochs", "2", "--seed", "5"],
     ["stn", "train", "ST", "--set", "train.stn_epochs=2", "--set", "space.seed=5"]),
])
def test_command_flags_are_shortcuts_for_set(flags, sets):
    assert _config_of(flags) == _config_of(sets)


def test_commands_without_flags_take_the_config_defaults(tmp_path):
    from fsmodels.config import Config

    (tmp_path / "c.yaml").write_text("data: {size: 80}\nroi: {epochs: 4}\n")
    built = _config_of(["store", "build", "DS", "--store", "ST", "--config", str(tmp_path / "c.yaml")])
    assert built["data"]["size"] == 80 and built["space"]["aspect"] == Config().space.aspect == "stretch"
    assert _config_of(["roi", "train", "DS", "--out", "R"])["roi"] == Config().to_dict()["roi"]
    # a flag beats the file, --set beats the flag
    argv = ["store", "build", "DS", "--store", "ST", "--config", str(tmp_path / "c.yaml"), "--size", "96"]
    assert _config_of(argv)["data"]["size"] == 96
    assert _config_of([*argv, "--set", "data.size=112"])["data"]["size"] == 112


def test_space_values_are_typed_once_when_the_config_loads(tmp_path):
    from fsmodels.config import load_config

    (tmp_path / "c.yaml").write_text(
        "space: {lr: 1e-3, flip: 'on', he: off, stn: [off, Frozen], batch_size: '8', view: R,\n"
        "        seed: [0, 1], epochs: {choice: [2, 3]}}\n"
    )
    space = load_config(tmp_path / "c.yaml").space
    assert (space.lr, space.flip, space.he, space.batch_size) == (0.001, True, "off", 8)
    assert space.stn == ["off", "frozen"] and space.seed == [0, 1] and space.epochs == {"choice": [2, 3]}
    assert space.view == "right"


@pytest.mark.parametrize("override, needle", [
    ("space.batch_size=0", "space.batch_size"), ("space.lr=-1", "space.lr"), ("space.he=[off, sideways]", "space.he"),
    ("space.flip=maybe", "space.flip"), ("space.epochs={normal: [1, 2]}", "unknown distribution"),
    ("space.aspect=crop", "space.aspect"), ("data.aspect=crop", "space.aspect"),
])
def test_a_bad_space_value_is_refused_at_load_in_one_line(override, needle):
    from fsmodels.config import load_config
    from preprocessing.vocab import ConfigError

    with pytest.raises(ConfigError, match=needle) as error:
        load_config(None, [override])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("spelling", ["None", "none", "off", "null", "false", ""])
def test_off_is_one_word_for_every_command(spelling, tmp_path):
    """`roi.detector: None` once meant off for `fsweep train` and the path <cwd>/None for `fsweep sweep`."""
    from fsmodels.config import load_config
    from search.sweep import absolute_paths

    cfg = load_config(None, [f"roi.detector={spelling}", f"train.pretrained={spelling}"])
    assert cfg.roi.detector == "none" and cfg.train.pretrained == "none"
    assert absolute_paths(cfg).roi.detector == "none"


def test_test_scoring_of_every_trial_is_off_unless_asked_and_the_old_key_still_loads(tmp_path):
    import warnings

    from fsmodels.config import load_config

    assert load_config(None).train.test_every_trial is False  # a sweep scores only its winners on test
    (tmp_path / "old.yaml").write_text("train: {best_scores: true}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(tmp_path / "old.yaml")
    assert cfg.train.test_every_trial is True
    (warning,) = caught
    assert warning.category is FutureWarning and "\n" not in str(warning.message)
    assert "train.best_scores is now train.test_every_trial" in str(warning.message)
