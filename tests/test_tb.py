"""search.tb: the HParams records read back with TensorBoard's own reader and served by its own server: searched
keys marked as differing (the dashboard's default columns), readable trial names, the best epoch as a metric."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
from conftest import tiny_sweep_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import backend_context, metadata

from fsmodels.config import SPACE_KEYS, validate
from search.names import dirname_trial_id, trial_dirname_text, trial_label
from search.tb import TensorBoardCallback, write_experiment_summary

HPARAMS_DEFAULT_COLUMNS = 5  # the HParams table shows the first five hparams (after sorting) until asked for more


def hparams_content(run_dir) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return {"acc": acc, "content": acc.PluginTagToContent(metadata.PLUGIN_NAME)}


def test_searched_keys_are_marked_differing_so_hparams_shows_them_first(tmp_path):
    # the demo's shape: HE x Flip; alphabetically backbone, batch_size, epochs, finetune, flip come first
    cfg = validate(tiny_sweep_config(tmp_path, tmp_path / "store", he=["off", "global"], flip=[False, True]))
    write_experiment_summary(tmp_path, cfg)
    exp = metadata.parse_experiment_plugin_data(hparams_content(tmp_path)["content"][metadata.EXPERIMENT_TAG])
    assert {h.name for h in exp.hparam_infos if h.differs} == {"he", "flip"}
    assert [h.name for h in exp.hparam_infos] == list(SPACE_KEYS)  # every key stays listed
    # what TensorBoard's backend serves the dashboard: differing keys first, then the default column cut
    backend_context._sort_and_reduce_to_hparams_limit(exp, HPARAMS_DEFAULT_COLUMNS)
    assert [h.name for h in exp.hparam_infos][:2] == ["flip", "he"]
    metrics = {m.name.tag: m.display_name for m in exp.metric_infos}
    assert metrics["best/val_auc"] == "val_auc (best epoch)" and "best_epoch" in metrics


def test_explicit_points_mark_the_keys_that_vary_over_the_points(tmp_path):
    cfg = tiny_sweep_config(tmp_path, tmp_path / "store")
    cfg.space.points = [{"backbone": "test_resnet", "finetune": False}, {"backbone": ["a", "b"], "finetune": True}]
    write_experiment_summary(tmp_path, validate(cfg))
    exp = metadata.parse_experiment_plugin_data(hparams_content(tmp_path)["content"][metadata.EXPERIMENT_TAG])
    assert {h.name for h in exp.hparam_infos if h.differs} == {"backbone", "finetune"}


def test_trial_label_and_dirname_are_short_readable_and_parse_back():
    config = {"he": "global", "flip": True, "lr": 0.00123, "backbone": "hf-hub:timm/resnet50", "seed": 0}
    assert trial_label(config, ["he", "flip"]) == "he=global,flip=on"
    assert trial_label(config, ["lr", "backbone"]) == "lr=0.00123,backbone=hf-hub-timm-resnet50"  # no / or :
    name = trial_dirname_text("3206b_00000", trial_label(config, ["he", "flip"], sep="_"))
    assert name == "trial_3206b_00000_he=global_flip=on"
    assert trial_dirname_text("3206b_00000") == "trial_3206b_00000"
    for trial_id in ("3206b_00000", "abcd1234"):  # grid/random ids and searchers' ids
        assert dirname_trial_id(trial_dirname_text(trial_id, "backbone=x_seed=1")) == trial_id
        assert dirname_trial_id(f"trial_{trial_id}") == trial_id
    assert dirname_trial_id("winner_right_test_scores.csv") is None


class FakeTrial(SimpleNamespace):
    """What the callback reads of a Ray trial: id, config and where its TensorBoard files go."""

    @property
    def storage(self):
        return SimpleNamespace(storage_filesystem=SimpleNamespace(type_name="local"))


def test_callback_names_sessions_by_config_and_logs_the_best_epoch(tmp_path):
    callback = TensorBoardCallback(["he", "flip"])
    trials = [FakeTrial(trial_id=f"t{i}_0000{i}", config={**{k: 0 for k in SPACE_KEYS}, "he": he, "flip": True},
                        path=str(tmp_path / f"trial_t{i}"), local_path="") for i, he in enumerate(["off", "global"])]
    for trial in trials:
        callback.on_trial_start(0, trials, trial)
        for epoch, (auc, best) in enumerate([(0.7, 1), (0.6, 1), (0.9, 3)], start=1):
            result = {"epoch": epoch, "val_auc": auc, "best_val_auc": max(0.7, auc) if best == epoch else 0.7,
                      "best_epoch": best}
            callback.on_trial_result(0, trials, trial, result)
        callback.on_trial_complete(0, trials, trial)
    groups = []
    for trial in trials:
        records = hparams_content(trial.path)
        start = metadata.parse_session_start_info_plugin_data(records["content"][metadata.SESSION_START_INFO_TAG])
        groups.append(start.group_name)
        assert [e.value for e in records["acc"].Scalars("best_epoch")] == [1, 1, 3]
        assert records["acc"].Scalars("best/val_auc")[-1].value == pytest.approx(0.9)  # the best epoch's
        assert [e.value for e in records["acc"].Scalars("epoch/val_auc")] == pytest.approx([0.7, 0.6, 0.9])
    assert groups == ["he=off,flip=on [t0_00000]", "he=global,flip=on [t1_00001]"]


def tensorboard_post(port: str, route: str, body: dict) -> dict:
    """One request of the HParams dashboard to TensorBoard's server (what the browser's table is drawn from)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/{route}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_tensorboard_serves_every_trial_searched_keys_first_with_best_epoch_metrics(tmp_path):
    cfg = validate(tiny_sweep_config(tmp_path, tmp_path / "store", he=["off", "global"], flip=[False, True]))
    write_experiment_summary(tmp_path, cfg, description="fsweep sweep probe")
    callback = TensorBoardCallback(["he", "flip"])
    trials = [FakeTrial(trial_id=f"t{i}", config={**{k: getattr(cfg.space, k) for k in SPACE_KEYS}, "he": he,
                                                  "flip": flip}, path=str(tmp_path / f"trial_t{i}"), local_path="")
              for i, (he, flip) in enumerate([("off", False), ("global", True)])]
    for best, trial in zip((0.6, 0.8), trials):
        callback.on_trial_start(0, trials, trial)
        callback.on_trial_result(0, trials, trial, {"epoch": 1, "val_auc": best, "best_val_auc": best, "best_epoch": 1})
    callback.on_trial_complete(0, trials, trials[0])  # the second trial is still running
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host",
                               "127.0.0.1", "--port", "0", "--load_fast", "false"], stderr=subprocess.PIPE, text=True)
    try:
        port = next(m.group(1) for line in server.stderr if (m := re.search(r"http://127\.0\.0\.1:(\d+)/", line)))
        deadline = time.time() + 60
        experiment = tensorboard_post(port, "experiment", {})
        while not experiment.get("hparamInfos") and time.time() < deadline:  # the first load of the log directory
            time.sleep(0.5)
            experiment = tensorboard_post(port, "experiment", {})
        groups = tensorboard_post(port, "session_groups", {
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "startIndex": 0, "sliceSize": 100, "aggregationType": "AGGREGATION_AVG"})["sessionGroups"]
    finally:
        server.kill()
        server.wait()
    assert [(h["name"], h["differs"]) for h in experiment["hparamInfos"][:2]] == [("flip", True), ("he", True)]
    assert not any(h["differs"] for h in experiment["hparamInfos"][2:])
    assert {h["name"] for h in experiment["hparamInfos"]} == set(SPACE_KEYS)
    assert experiment["description"] == "fsweep sweep probe"
    metrics = {m["name"]["tag"]: m["displayName"] for m in experiment["metricInfos"]}
    assert metrics["best/val_auc"] == "val_auc (best epoch)" and metrics["best_epoch"] == "best_epoch"
    rows = {g["name"]: g for g in groups}
    assert set(rows) == {"he=off,flip=off [t0]", "he=global,flip=on [t1]"}  # the running trial is listed too
    for name, best in (("he=off,flip=off [t0]", 0.6), ("he=global,flip=on [t1]", 0.8)):
        values = {v["name"]["tag"]: v["value"] for v in rows[name]["metricValues"]}
        assert values["best/val_auc"] == pytest.approx(best) and values["best_epoch"] == 1
    assert rows["he=off,flip=off [t0]"]["sessions"][0]["status"] == "STATUS_SUCCESS"
    assert rows["he=global,flip=on [t1]"]["hparams"]["he"] == "global"
