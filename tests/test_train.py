"""The one-trial loop on the real tiny phantom store: AUC, metrics.json, resume, --test, the frozen STN."""
from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import torch

import fsmodels.stn as stn_module
from fsmodels.checkpoint import load_best_weights, load_state
from fsmodels.config import load_config
from fsmodels.metrics import FIT_METRICS, SELECTABLE_METRICS, auc_score, json_safe
from fsmodels.stn import STN_FIGURE, STN_STATS, ensure_frozen_stn, load_frozen_stn, pretrain_stn_cli
from fsmodels.train import evaluate_checkpoint, load_trial_model, run_trial
from cluster.errors import FsweepError
from preprocessing.loader import eval_set
from conftest import make_spec
from preprocessing.store import build_variant
from fsweep.cli import main as fsweep

SIZE = 64  # tiny images: the whole file runs in about a minute on 2 cores
CUDA = torch.cuda.is_available()  # the suite also runs on a CUDA machine: compare like with like there
EPOCH_KEYS = {
    "epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_f1", "val_sensitivity",
    "val_specificity", "val_youden_threshold", "best_epoch", "diverged", "device", "device_seconds", "img_per_s",
    *(f"best_{name}" for name in SELECTABLE_METRICS), *FIT_METRICS, *(f"best_{name}" for name in FIT_METRICS),
}


@pytest.fixture(scope="session")
def tiny_variant(tiny_dataset, tmp_path_factory):
    """The real store variant (he=global, 64 px, full frame) of the tiny phantom."""
    store = tmp_path_factory.mktemp("store")
    return build_variant(tiny_dataset, store, make_spec(he="global", size=SIZE))


@pytest.fixture(scope="session")
def trial_yaml(tiny_dataset, tiny_variant, tmp_path_factory):
    """A demo-sized trial config on the tiny store."""
    path = tmp_path_factory.mktemp("cfg") / "trial.yaml"
    path.write_text(
        f"data: {{dataset: {tiny_dataset}, store: {tiny_variant.path.parent}, size: {SIZE}}}\n"
        "space: {backbone: resnet10t, view: both, batch_size: 16, epochs: 5, lr: 0.01, he: global,\n"
        "        flip: true, stn: off, finetune: true, seed: 0}\n"
        # on CUDA the bit-exact resume tests need cuDNN autotuning off (it picks kernels by timing)
        f"train: {{pretrained: none, deterministic: {str(CUDA).lower()}}}\n"
    )
    return path


@pytest.fixture(scope="session")
def full_run(trial_yaml, tmp_path_factory):
    """``fsweep train CONFIG --out DIR --test``: the uninterrupted reference run and its wall time."""
    out = tmp_path_factory.mktemp("full")
    start = time.perf_counter()
    assert fsweep(["train", str(trial_yaml), "--out", str(out), "--test"]) == 0
    return out, time.perf_counter() - start


def test_short_cpu_run_on_the_phantom_store_trains(full_run):
    """The tiny phantom (148 x 252 px at 64 px: foramina of about a pixel) tests the machinery, not the
    method: the loss falls and every number is defined. Calibration on the demo-sized phantom is
    bench/calibrate_phantom.py's (docs/phantom.md, "Calibration")."""
    out, seconds = full_run
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert 0.0 <= metrics["val"]["auc"] <= 1.0 and metrics["status"] == "finished"
    assert seconds < 120
    assert set(metrics["val"]) >= {"auc", "accuracy", "f1", "sensitivity", "specificity", "loss"}
    assert history[metrics["best_epoch"] - 1]["val_auc"] == metrics["val"]["auc"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert (out / "config.yaml").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_005"]  # only the newest is kept


def test_test_split_scored_with_bootstrap_intervals(full_run, tiny_variant):
    out, _ = full_run
    test = json.loads((out / "metrics.json").read_text())["test"]
    for name in ("auc", "accuracy", "f1", "sensitivity", "specificity"):
        lo, hi = test[f"{name}_ci"]
        assert lo <= test[name] <= hi
    assert test["n"] == len(eval_set(tiny_variant, "both", "test")) and "loss" in test and "scores" not in test


def test_checkpoint_loads_weights_only_and_evaluates(full_run):
    ckpt = full_run[0] / "checkpoints" / "epoch_005"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["epoch"] == 5 and set(state) >= {"model", "optimizer", "scheduler", "history", "best_epoch"}
    model, cfg = load_trial_model(ckpt)
    assert cfg.space.backbone == "resnet10t" and not model.training
    result = evaluate_checkpoint(ckpt, split="val", n_boot=50)
    metrics = json.loads((full_run[0] / "metrics.json").read_text())
    assert result["auc"] == pytest.approx(metrics["val"]["auc"])
    # one operating point: the threshold-dependent figures a trial is selected on are the ones the card's
    # validation scoring (at the exported threshold) gives
    for name in ("accuracy", "f1", "sensitivity", "specificity"):
        assert result[name] == pytest.approx(metrics["val"][name]), name
    assert len(result["scores"]) == result["n"] and {"image_id", "label", "score"} <= set(result["scores"][0])


def test_a_damaged_checkpoint_is_one_clear_error(full_run, tmp_path):
    ckpt = sorted((full_run[0] / "checkpoints").glob("epoch_*"))[-1]
    damaged = tmp_path / ckpt.name
    damaged.mkdir()
    data = (ckpt / "best.pt").read_bytes()
    (damaged / "state.pt").write_bytes((ckpt / "state.pt").read_bytes())
    (damaged / "best.pt").write_bytes(data[: len(data) // 2])  # truncated by a full disk or a killed copy
    with pytest.raises(FsweepError, match="best.pt: unreadable"):
        load_trial_model(damaged)
    (damaged / "best.pt").unlink()
    with pytest.raises(FsweepError, match="best.pt missing"):
        load_best_weights(damaged)


def test_resume_continues_at_the_next_epoch_with_identical_metrics(trial_yaml, full_run, tmp_path):
    cfg = load_config(trial_yaml, ["train.checkpoint_every=1"])
    seen = []

    def crash_after_epoch_1(metrics, checkpoint_dir):
        seen.append((metrics, checkpoint_dir))
        raise KeyboardInterrupt  # the process dies right after reporting epoch 1

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, tmp_path, on_epoch=crash_after_epoch_1)
    (first, ckpt), = seen
    assert set(first) == EPOCH_KEYS and first["epoch"] == 1
    resumed = []
    result = run_trial(cfg, tmp_path, on_epoch=lambda m, d: resumed.append(m), resume_from=ckpt)
    assert [m["epoch"] for m in resumed] == [2, 3, 4, 5]
    reference = json.loads((full_run[0] / "metrics.json").read_text())
    assert json_safe(result["history"]) == reference["history"]  # bit-identical floats
    assert result["best_epoch"] == reference["best_epoch"]


def test_amp_channels_last_joint_stn_frozen_backbone_paths_run_on_cpu(trial_yaml, tmp_path):
    # CI has no GPU: force the CUDA-default options on (bf16 autocast on the CPU) so their code runs somewhere
    cfg = load_config(trial_yaml, [
        "space.epochs=1", "train.amp=on", "train.channels_last=on", "space.view=right", "space.stn=joint",
        "space.finetune=false", "train.optimizer=adamw", "train.schedule=cosine",
    ])
    cfg.space.lr, cfg.space.seed = np.float64(0.01), np.int64(3)  # what Ray Tune's samplers hand over
    bests = []
    result = run_trial(cfg, tmp_path, on_best=lambda epoch, y, s: bests.append((epoch, y, s)))
    assert 0 < result["history"][0]["train_loss"] < 10 and 0 <= result["val"]["auc"] <= 1
    (epoch, labels, scores), = bests  # the new best's validation scores, handed over without scoring again
    assert epoch == 1 and auc_score(labels, scores) == pytest.approx(result["val"]["auc"])
    ckpt = tmp_path / "checkpoints" / "epoch_001"
    assert load_state(ckpt)["config"]["space"]["lr"] == 0.01  # plain floats: loads with weights_only
    model, _ = load_trial_model(ckpt)
    assert model.stn is not None
    assert evaluate_checkpoint(ckpt, split="val", n_boot=10)["auc"] == pytest.approx(result["val"]["auc"], abs=0.02)


def test_sweep_values_and_unknown_choices_fail_clearly(trial_yaml, tmp_path):
    for override, needle in (
        ("space.lr=[0.1, 0.01]", "space.lr: a single trial needs one value"),
        ("train.optimizer=adam", "train.optimizer"),
        ("train.schedule=linear", "train.schedule"),
        ("space.view=top", "space.view"),
    ):
        with pytest.raises(FsweepError, match=needle):
            run_trial(load_config(trial_yaml, [override]), tmp_path)
    with pytest.raises(FsweepError, match="fsweep store build"):
        run_trial(load_config(trial_yaml, ["data.size=96"]), tmp_path)


def test_frozen_stn_trains_once_under_concurrency_and_stays_frozen(tiny_variant, trial_yaml, tmp_path, monkeypatch,
                                                                   capsys):
    calls = []
    real = stn_module.pretrain_stn

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stn_module, "pretrain_stn", counted)
    paths = []
    workers = [threading.Thread(target=lambda: paths.append(ensure_frozen_stn(tiny_variant, epochs=10, seed=0).weights)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(calls) == 1 and len(set(paths)) == 1
    stn_dir = paths[0].parent
    stats = json.loads((stn_dir / STN_STATS).read_text())
    assert stats["train_accuracy"] >= 0.9  # the phantom's left view is the mirrored right one: learnable
    assert (stn_dir / STN_FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pretrain_stn_cli(tiny_variant.path.parent, variant=tiny_variant.key, epochs=10, seed=0)
    assert "STN view-task loss=" in capsys.readouterr().out and len(calls) == 1  # reused, not retrained

    cfg = load_config(trial_yaml, ["space.stn=frozen", "space.epochs=1"])
    run_trial(cfg, tmp_path)
    frozen = load_frozen_stn(paths[0]).state_dict()
    trained = load_best_weights(tmp_path / "checkpoints" / "epoch_001")
    assert all(torch.equal(trained[f"stn.{k}"], v) for k, v in frozen.items())
    assert load_state(tmp_path / "checkpoints" / "epoch_001")["history"][0]["epoch"] == 1


def test_validation_rates_are_at_the_epochs_youden_threshold_the_model_is_exported_at():
    from fsmodels.metrics import binary_metrics
    from fsmodels.train import split_metrics

    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.55, 0.6, 0.65, 0.75, 0.8, 0.9])  # separable at 0.75; at 0.5 every normal is abnormal
    val = split_metrics(labels, scores, loss=0.3)
    assert val["youden_threshold"] == pytest.approx(0.75)
    assert (val["accuracy"], val["f1"], val["sensitivity"], val["specificity"]) == (1.0, 1.0, 1.0, 1.0)
    assert binary_metrics(labels, scores)["specificity"] == 0.0  # what a 0.5 cut would have selected on
    one_class = split_metrics(np.array([1, 1]), np.array([0.2, 0.7]), loss=0.1)  # no Youden threshold: 0.5
    assert one_class["sensitivity"] == 0.5


def test_a_trial_restored_from_its_checkpoint_elsewhere_ends_with_the_report_rows_of_an_undisturbed_run(
        trial_yaml, tmp_path):
    """Everything the report reads travels in the checkpoint: a trial that loses its node (and working directory)
    after its best epoch and resumes from the persisted checkpoint in another directory reports the same rows."""
    import shutil

    import pandas as pd

    from fsmodels.config import validate
    from search.tables import comparison_sections, read_best_scores

    cfg = load_config(trial_yaml, ["space.epochs=4", "train.checkpoint_every=1", "train.test_every_trial=true"])
    undisturbed = run_trial(cfg, tmp_path / "a")
    crash_at = min(undisturbed["best_epoch"], 3)  # after the best epoch, with an epoch left to train
    persisted = tmp_path / "ray_storage" / "checkpoint"

    def lose_the_node(metrics, checkpoint_dir):
        if metrics["epoch"] == crash_at:
            shutil.copytree(checkpoint_dir, persisted)  # what tune.report persists
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, tmp_path / "b", on_epoch=lose_the_node)
    shutil.rmtree(tmp_path / "b")  # the node's working directory is gone
    restored = run_trial(cfg, tmp_path / "c", resume_from=persisted)
    assert restored["best_epoch"] == undisturbed["best_epoch"]
    rows = []
    for result in (undisturbed, restored):
        board = pd.DataFrame([{"trial_id": "t0", "status": "TERMINATED", "view": "both", "seed": 0, "fold": 0,
                               "he": "global", "checkpoint": result["checkpoint"]}])
        scores = read_best_scores(str(tmp_path), board)
        assert list(scores) == ["t0"] and set(scores["t0"]["split"]) == {"val", "test"}
        (section,) = comparison_sections(validate(load_config(trial_yaml)), board, scores, n_boot=20)
        rows.append(section.rows)
        state = load_state(result["checkpoint"])  # thresholds and fit diagnostics: the best epoch's history entry
        rows.append(pd.DataFrame([h for h in state["history"] if h["epoch"] == state["best_epoch"]]))
    pd.testing.assert_frame_equal(rows[0], rows[2])
    pd.testing.assert_frame_equal(rows[1], rows[3])


def test_best_epoch_tie_goes_to_the_lower_validation_loss():
    from fsmodels.train import TrainingState, _is_new_best

    run = TrainingState(history=[{"epoch": 1, "val_loss": 0.5}], best_epoch=1, best_value=1.0)
    assert _is_new_best({"auc": 1.0, "loss": 0.2}, "val_auc", "max", run)
    assert not _is_new_best({"auc": 1.0, "loss": 0.7}, "val_auc", "max", run)
    assert not _is_new_best({"auc": 0.9, "loss": 0.1}, "val_auc", "max", run)
    assert not _is_new_best({"auc": float("nan"), "loss": 0.1}, "val_auc", "max", run)
    assert _is_new_best({"loss": 0.4}, "val_loss", "min", TrainingState(history=[], best_epoch=1, best_value=0.5))


def test_a_trial_opens_its_variant_from_a_uri_store_and_names_the_build_when_missing(tiny_dataset, tmp_path):
    from fsmodels.params import resolve_variant

    store = f"file://{tmp_path / 'uri_store'}"
    built = build_variant(tiny_dataset, store, make_spec(he="off", size=32, roi_dir=None))
    cfg = load_config(None, [f"data.dataset={tiny_dataset}", f"data.store={store}", "data.size=32"])
    assert resolve_variant(cfg, "off", "stretch").key == built.key
    with pytest.raises(FsweepError, match="fsweep store build"):
        resolve_variant(cfg, "clahe", "stretch")  # never built: the error says how to build it


def test_a_trial_whose_scores_turn_nan_is_diverged_and_never_takes_that_epoch(trial_yaml, tmp_path, monkeypatch):
    import fsmodels.train as train_module

    real_score = train_module.score_loader
    calls = []

    def predict_nan_from_epoch_2(model, loader, criterion, rt):
        labels, scores, loss = real_score(model, loader, criterion, rt)
        calls.append(1)
        return (labels, np.full_like(scores, np.nan), loss) if len(calls) >= 2 else (labels, scores, loss)

    monkeypatch.setattr(train_module, "score_loader", predict_nan_from_epoch_2)
    reports = []
    cfg = load_config(trial_yaml, ["space.epochs=4"])
    result = run_trial(cfg, tmp_path, on_epoch=lambda report, _: reports.append(report))
    assert [r["diverged"] for r in reports] == [False, True]  # it stops at the diverged epoch
    assert result["status"] == "diverged" and result["best_epoch"] == 1
    assert reports[1]["best_epoch"] == 1 and reports[1]["best_val_auc"] == reports[0]["val_auc"]
    assert all(math.isnan(reports[1][f"val_{k}"]) for k in ("auc", "accuracy", "f1", "sensitivity", "specificity"))


# --- GPU lane: resident data, cheap checkpoints, numerics, accounting -----------------

def test_resident_batches_equal_the_dataloader_batches_image_by_image(tiny_variant):
    from fsmodels.engine import make_loader, runtime
    from fsmodels.resident import ResidentSet
    from preprocessing.loader import train_set

    cfg = load_config(None, ["train.amp=off", "train.channels_last=off"])
    rt = runtime(cfg)
    data = train_set(tiny_variant, "right", flip=True)  # the right view plus the mirrored left view
    resident = ResidentSet(data, rt.device)
    assert resident.images.dtype == torch.uint8 and len(resident) == len(data)
    flipped_seen = 0
    for seed, batch_size in ((7, 4), (123, 5)):
        ours = list(resident.batches(batch_size, seed))
        theirs = list(make_loader(data, batch_size, rt, cfg, seed))  # host batches: compared on the CPU
        assert len(ours) == len(theirs) > 1
        for (x, y), (ref_x, ref_y) in zip(ours, theirs):
            assert x.device.type == rt.device.type
            assert torch.equal(x.cpu(), ref_x) and torch.equal(y.cpu(), ref_y.float())
        order = [int(i) for i in resident.batches(batch_size, seed).order]
        flipped_seen += sum(bool(data.mirrored[i]) for i in order)
    assert flipped_seen > 0  # mirrored samples were compared too
    in_order = list(resident.batches(32, None))
    assert sum(len(y) for _, y in in_order) == len(data)  # evaluation: every sample, no drop_last


def test_resume_is_exact_with_checkpoint_every_2(trial_yaml, full_run, tmp_path):
    cfg = load_config(trial_yaml, ["train.checkpoint_every=2"])
    seen = []

    def crash_after_epoch_3(metrics, checkpoint_dir):
        seen.append(checkpoint_dir)
        if metrics["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, tmp_path, on_epoch=crash_after_epoch_3)
    assert [d.name if d else None for d in seen] == [None, "epoch_002", None]  # only epochs that wrote one
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_002"]
    resumed = []
    result = run_trial(cfg, tmp_path, on_epoch=lambda m, d: resumed.append((m["epoch"], d and d.name)),
                       resume_from=seen[1])
    assert resumed == [(3, None), (4, "epoch_004"), (5, "epoch_005")]  # the last epoch always checkpoints
    reference = json.loads((full_run[0] / "metrics.json").read_text())
    assert json_safe(result["history"]) == reference["history"]  # bit-identical to the uninterrupted run
    assert result["device_seconds"] > 0 and result["checkpoint_seconds"] >= 0


def test_checkpoint_epochs_cover_every_nth_the_last_and_asha_rungs():
    from fsmodels.checkpoint import checkpoint_epochs

    assert checkpoint_epochs(5, 25) == {5, 10, 15, 20, 25}
    assert checkpoint_epochs(1, 3) == {1, 2, 3}
    assert checkpoint_epochs(5, 25, (1, 3, 25)) == {1, 3, 5, 9, 10, 15, 20, 25}  # Ray's ASHA rungs: 1, 3, 9


def test_a_failed_checkpoint_write_surfaces_on_the_training_thread(tmp_path):
    from fsmodels.checkpoint import save_checkpoint

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        save_checkpoint(blocker / "ckpt", {"epoch": 1, "w": torch.ones(2)}, {}, load_config(None))


def test_evaluation_scores_are_fp32_under_forced_amp(tiny_variant):
    from fsmodels.engine import runtime, score_loader
    from fsmodels.model import build_model
    from fsmodels.resident import ResidentSet

    from fsmodels.engine import amp_dtype

    torch.manual_seed(0)
    amp = runtime(load_config(None, ["train.amp=on", "train.channels_last=off"]))
    fp32 = runtime(load_config(None, ["train.amp=off", "train.channels_last=off"]))
    model = build_model("resnet10t", "none", True).to(amp.device)  # model, data and runtime on one device
    data = ResidentSet(eval_set(tiny_variant, "both", "val"), amp.device)
    criterion = torch.nn.BCEWithLogitsLoss()
    assert amp.amp_dtype == amp_dtype(CUDA)  # bf16 on the CPU and on GPUs with native bf16, else fp16
    _, scores_amp, loss_amp = score_loader(model, data.batches(32, None), criterion, amp)
    _, scores_fp32, loss_fp32 = score_loader(model, data.batches(32, None), criterion, fp32)
    assert np.array_equal(scores_amp, scores_fp32) and loss_amp == loss_fp32
    with torch.no_grad(), torch.autocast(amp.device.type, dtype=amp.amp_dtype):  # what autocast evaluation gives
        x, _ = next(iter(data.batches(32, None)))
        bf16 = torch.sigmoid(model.eval()(x.float() / 255).float()).cpu().numpy()
    assert not np.array_equal(bf16, scores_fp32[: len(bf16)])


def test_deterministic_reruns_are_bit_identical_and_set_the_flags(trial_yaml, tmp_path):
    from fsmodels.engine import set_determinism

    cfg = load_config(trial_yaml, ["space.epochs=2", "space.view=right", "train.deterministic=on"])
    try:
        first = run_trial(cfg, tmp_path / "a")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        second = run_trial(cfg, tmp_path / "b")
    finally:
        set_determinism(False)
    assert first["history"] == second["history"]
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_every_epoch_report_and_metrics_json_account_device_seconds(trial_yaml, tmp_path):
    reports = []
    cfg = load_config(trial_yaml, ["space.epochs=2", "space.view=right", "train.resident_max_mb=0"])  # memmap path
    from fsmodels.engine import device_label, runtime

    result = run_trial(cfg, tmp_path, on_epoch=lambda m, d: reports.append(m))
    device = device_label(runtime(cfg))  # "cpu" here, "cuda:<GPU name>" on a GPU machine
    assert [r["device"] for r in reports] == [device, device]
    assert 0 < reports[0]["device_seconds"] < reports[1]["device_seconds"] <= result["device_seconds"]
    assert result["img_per_s"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["device"] == device and saved["device_seconds"] == result["device_seconds"]


def test_a_torch_compile_failure_is_one_line(trial_yaml, tmp_path, monkeypatch):
    import fsmodels.train as train_module
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(*args, **kwargs):
        raise BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler\nlong trace"), None)

    monkeypatch.setattr(train_module, "train_epoch", broken)
    with pytest.raises(FsweepError, match=r"train.compile: torch.compile failed on this machine .*compile=off$"):
        run_trial(load_config(trial_yaml, ["space.epochs=1", "train.compile=on"]), tmp_path)


def test_resident_batches_equal_the_dataloader_for_another_folds_row_subsets():
    from fsmodels.engine import make_loader, runtime
    from fsmodels.resident import ResidentSet
    from preprocessing.loader import ArraySet, Part

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (9, 8, 8), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, 2, 9) for _ in range(2)]
    rows = [np.array([0, 2, 3, 7]), np.array([1, 4, 5, 6, 8])]  # another fold takes some rows of each array
    parts = [Part(images=a, labels=y[r], image_ids=tuple(f"{k}-{i}" for i in r), mirrored=m, rows=r)
             for k, (a, y, r) in enumerate(zip(arrays, labels, rows)) for m in (False, True)]
    data = ArraySet(parts)
    cfg = load_config(None, ["train.amp=off", "train.channels_last=off"])
    ours = list(ResidentSet(data, torch.device("cpu")).batches(3, seed=5))
    theirs = list(make_loader(data, 3, runtime(cfg), cfg, 5))
    assert len(ours) == len(theirs) == len(data) // 3
    for (x, y), (ref_x, ref_y) in zip(ours, theirs):
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y.float())
