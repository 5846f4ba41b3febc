"""export + predict: a real tiny sweep exported to MODEL_DIR, then run on stored and never-seen raw files.

One module fixture runs the smallest real pipeline: a 15-epoch YOLO detector at 64 px (it finds the
spine in about half the images, so both the crop and the full-frame fallback are exercised),
a 2-trial Ray Tune sweep (left and right view, resnet10t, 64 px, 1 epoch; a frozen STN on the
left, a joint one on the right, so the STN must be inside every graph) and ``fsweep export``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from fsmodels.backbones import create_backbone
from fsweep.cam import grad_cam, heat_to_crop, model_from_weights
from fsmodels.config import Config
from fsmodels.metrics import CI_METRICS, binary_metrics, bootstrap_ci
from fsmodels.model import FsNet
from fsmodels.stn import STN
from preprocessing.decode import decode_image
from cluster.errors import FsweepError
from preprocessing.files import atomic_write, current_umask, file_sha256
from preprocessing.ingest import pixel_sha256
from preprocessing.phantom import write_phantom
from preprocessing.recipe import VariantSpec, preprocess_decoded
from preprocessing.roi import CONF_THRESHOLD, RoiDetector, margin_box, train_detector
from preprocessing.variant import open_variant
from fsweep import export
from fsweep.export import export_experiment as real_export_experiment
from fsweep.cli import main as fsweep
from fsweep.modelcard import CARD_FORMAT, RECIPE_STEPS, recipe_card, recipe_sha256, recipe_spec
from fsweep.predict import load_card, load_detector, model_key, predict, provider_chains, session_providers
from preprocessing.detector_onnx import OnnxRoiDetector

from conftest import ROI_SETTINGS, write_dicom

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # every test needs the module's real sweep (about 100 s on 2 busy cores)
ASPECT_OF = {"left": "pad", "right": "stretch"}  # each view's winner trains on, and predicts through, its own aspect
STN_OF = {"left": "frozen", "right": "joint"}  # a pretrained STN and one trained with the classifier: both in the graphs
SIZE = 64  # network input: the STN's 64 px localisation pooling exports to ONNX at multiples of 64


@pytest.fixture(scope="module")
def sweep(local_ray, tiny_dataset, tmp_path_factory) -> dict:
    """A finished 2-trial sweep (one winner per view) with a YOLO ROI detector."""
    from search.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("export")
    train_detector(tiny_dataset, tmp / "roi", **{**ROI_SETTINGS, "annotated": 40, "epochs": 15, "imgsz": 64})
    cfg = Config()
    cfg.data.dataset, cfg.data.store, cfg.data.size = str(tiny_dataset), str(tmp / "store"), SIZE
    cfg.roi.detector = str(tmp / "roi")
    cfg.space.backbone, cfg.space.view, cfg.space.batch_size, cfg.space.epochs = "resnet10t", ["left", "right"], 8, 1
    cfg.space.lr, cfg.space.he, cfg.space.flip, cfg.space.stn, cfg.space.seed = 0.01, "global", True, "joint", 0
    cfg.space.points = [{"view": view, "aspect": aspect, "stn": STN_OF[view]}  # space.aspect and space.stn searched
                        for view, aspect in ASPECT_OF.items()]
    cfg.train.pretrained, cfg.train.stn_epochs = "none", 2
    cfg.search.max_failures, cfg.search.max_concurrent = 0, 2
    experiment = run_sweep(cfg, name="exp", storage=str(tmp / "runs"))
    return dict(tmp=tmp, cfg=cfg, experiment=experiment, dataset=tiny_dataset)


EXPORT_WARNINGS: list = []  # every warning `fsweep export` raised in the module fixture (none is filtered out)


@pytest.fixture(scope="module")
def model_dir(sweep) -> Path:
    """MODEL_DIR written by `fsweep export` (default options: no TorchScript), its warnings recorded."""
    out = sweep["tmp"] / "model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # record every warning, even those Python shows only once
        assert fsweep(["export", str(sweep["experiment"]), "--out", str(out)]) == 0
    EXPORT_WARNINGS.extend(caught)
    return out


@pytest.fixture(scope="module")
def unseen(sweep, model_dir) -> dict:
    """Raw files of a second phantom (another seed): 8-bit PNG, TIFF, JPEG, 16-bit PNG, DICOM MONOCHROME1."""
    phantom = sweep["tmp"] / "phantom2"
    write_phantom(phantom, patients=2, seed=11, size=(148, 252))
    raw = sweep["tmp"] / "raw"
    raw.mkdir()
    left = cv2.imread(str(phantom / "images" / "P0001_left.png"), cv2.IMREAD_UNCHANGED)
    right = cv2.imread(str(phantom / "images" / "P0002_right.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(raw / "plain.png"), right)
    cv2.imwrite(str(raw / "plain.tif"), right)
    cv2.imwrite(str(raw / "photo.jpg"), right)
    cv2.imwrite(str(raw / "deep.png"), right.astype(np.uint16) * 200 + 1000)
    write_dicom(raw / "scan.dcm", 4095 - left.astype(np.uint16) * 16, "MONOCHROME1", laterality="L")
    return dict(phantom=phantom, raw=raw, left=left, right=right)


def test_export_writes_weights_pt2_onnx_detector_onnx_and_a_complete_card(sweep, model_dir):
    def not_json(constant):
        raise AssertionError(f"model_card.json has a bare {constant}: not strict JSON (undefined must be null)")

    card = json.loads((model_dir / "model_card.json").read_text(), parse_constant=not_json)
    winners = json.loads((sweep["experiment"] / "winners.json").read_text())
    assert sorted(card["models"]) == sorted(winners) == ["left", "right"] and card["views"] == ["left", "right"]
    files = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()} - {"model_card.json"}
    assert set(card["sha256"]) == files
    assert all(file_sha256(model_dir / name) == digest for name, digest in card["sha256"].items())
    assert card["format"] == CARD_FORMAT == "fsweep-model-3"
    assert {"roi/best.pt", "roi/metrics.json", "roi/detector.onnx"} <= files
    assert not {name for name in files if name.endswith(".torchscript.pt")}  # TorchScript only when asked for
    detector_sha = file_sha256(Path(sweep["cfg"].roi.detector) / "best.pt")
    for view, model in card["models"].items():
        assert sorted(model["files"]) == ["onnx", "pt2", "weights"] and set(model["files"].values()) <= files
        recipe = model["preprocessing"]
        assert list(recipe) == [*RECIPE_STEPS, "recipe_sha256"]  # every step, in the order they run
        detect = recipe["detect"]
        assert detect["weights"] == "roi/detector.onnx" and detect["sha256"] == file_sha256(model_dir / detect["weights"])
        assert detect["trained_weights"] == "roi/best.pt" and detect["trained_sha256"] == detector_sha
        assert detect["input_size"] == 64 and detect["stride"] == 32 and "mod 32" in detect["letterbox"]
        assert "anchors" in detect["output"]
        assert (detect["confidence_threshold"], detect["max_detections"]) == (CONF_THRESHOLD, 1)
        assert (recipe["he"]["mode"], recipe["resize"]["size"], recipe["aspect"]["mode"], recipe["crop"]["margin"],
                model["network"]["stn"]) == ("global", SIZE, ASPECT_OF[view], sweep["cfg"].roi.margin,
                                             STN_OF[view])
        assert "INTER_AREA" in recipe["resize"]["interpolation"] and "floor" in recipe["crop"]["rule"]
        assert "MONOCHROME1" in recipe["decode"]["monochrome1"] and "Window" in recipe["decode"]["dicom"]
        text = json.dumps(recipe)
        assert "preprocessing." not in text and "preprocess_decoded" not in text  # no internal names as the recipe
        assert model["backbone"] == "resnet10t" and model["trial_id"] == winners[view]["trial_id"]
        threshold = model["operating_threshold"]
        assert threshold["chosen_on"] == "validation" and "validation" in threshold["rule"]
        assert threshold["value"] == winners[view]["test"]["threshold"]  # chosen on validation, applied on test
        for split in ("val", "test"):
            scored = model["metrics"][split]
            assert all(f"{m}_ci" in scored for m in CI_METRICS) and scored["threshold"] == threshold["value"]
            assert "youden_threshold" not in scored and f"youden_threshold_of_{split}_scores" in scored
        assert model["metrics"]["test"]["accuracy"] == winners[view]["test"]["accuracy"]
        # one number everywhere: the card's validation AUC interval is the leaderboard's, the same patient draws
        assert model["metrics"]["val"]["auc_ci"] == pytest.approx(
            [winners[view]["val"]["val_auc_lo"], winners[view]["val"]["val_auc_hi"]], abs=1e-12)
        assert model["fit"] == {"train_auc": winners[view]["train"]["auc"], "warnings": winners[view]["warnings"]}
        parity = model["parity"]
        assert parity["onnx_max_abs_diff"] <= 1e-5 and parity["pt2_max_abs_diff"] <= 1e-5
        assert parity["torchscript_max_abs_diff"] is None
        assert (parity["onnx_exporter"], parity["onnx_fallback_reason"]) == ("dynamo", None)  # no fallback needed
        assert set(parity["onnx_providers"]) == {"CPUExecutionProvider"}  # what predict runs on here
        graph = onnx.load(str(model_dir / model["files"]["onnx"]))
        meta = {prop.key: prop.value for prop in graph.metadata_props}
        assert float(meta["threshold"]) == threshold["value"] and meta["threshold_chosen_on"] == "validation"
        assert int(meta["input_size"]) == SIZE and meta["recipe_sha256"] == recipe["recipe_sha256"]
        assert recipe["recipe_sha256"] == recipe_sha256(recipe)
    umask = current_umask()
    modes = {name: stat.S_IMODE((model_dir / name).stat().st_mode) for name in [*files, "model_card.json"]}
    assert modes == {name: 0o666 & ~umask for name in modes}  # safetensors alone writes 0600
    summary = json.loads((sweep["dataset"] / "summary.json").read_text())
    assert card["data"]["fingerprint"] == summary["fingerprint"]
    assert card["packages"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert card["packages"]["onnxruntime"] == ort.__version__ and card["packages"]["onnxscript"]
    found = card["detector"]["parity"]
    print("export parity:", {view: {k: m["parity"][k] for k in ("onnx_max_abs_diff", "pt2_max_abs_diff")}
                             for view, m in card["models"].items()}, "detector:", found,
          "detector export:", card["detector"]["export"])
    assert found["same_crops"] == found["images"] == 16 and found["with_box"] > 0  # 16 validation images
    assert card["detector"]["export"]["exporter"] == "torch.onnx.export(dynamo=True)"
    assert card["detector"]["export"]["fallback_reason"] is None


def test_export_raises_no_deprecation_warning_and_silences_none(model_dir):
    assert (model_dir / "model_card.json").is_file()  # the fixture's export ran, its warnings recorded
    deprecated = [f"{w.category.__name__}: {str(w.message)[:120]}" for w in EXPORT_WARNINGS
                  if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
                  or "deprecat" in str(w.message).lower()]
    assert deprecated == []
    for name in ("fsweep/export.py", "preprocessing/detector_onnx.py", "fsweep/predict.py"):
        source = (ROOT / name).read_text()
        assert "simplefilter(\"ignore\")" not in source and "filterwarnings(\"ignore" not in source, name


def test_onnx_runtime_matches_pytorch_with_the_stn_in_the_graph(sweep, model_dir):
    card = load_card(model_dir)
    entry = card["models"]["right"]
    graph = onnx.load(str(model_dir / entry["files"]["onnx"])).graph
    assert "GridSample" in {node.op_type for node in graph.node}  # the exporter writes the affine grid as plain ops
    torch_model = model_from_weights(model_dir / entry["files"]["weights"], "resnet10t", "joint")
    assert torch_model.stn is not None
    variant = open_variant(sweep["cfg"].data.store, entry["store_variant"])
    images = np.asarray(variant.images("test", "right"))
    session = ort.InferenceSession(str(model_dir / entry["files"]["onnx"]), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images[:5]):  # the batch axis is dynamic
        x = batch[:, None].astype(np.float32) / 255.0
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)).numpy()
        assert np.abs(session.run(None, {"image": x})[0] - expected).max() <= 1e-5


def test_export_fails_when_onnx_runtime_disagrees_with_pytorch(sweep, tmp_path, monkeypatch):
    import preprocessing.detector_onnx

    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no engine can agree within a negative tolerance
    detector_exports = []  # the networks are checked first: a refused one costs no detector export
    monkeypatch.setattr(preprocessing.detector_onnx, "export_detector", lambda *a: detector_exports.append(a))
    uri = f"file://{sweep['experiment']}"  # experiments on object storage are read through pyarrow the same way
    with pytest.raises(FsweepError, match="differ by .* export refused"):
        export.export_experiment(uri, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".*export-tmp"))
    assert detector_exports == []


def test_export_refuses_a_detector_changed_since_the_store_was_built(sweep, tmp_path, monkeypatch):
    real_sha256 = export.file_sha256
    monkeypatch.setattr(export, "file_sha256", lambda path: "0" * 64 if Path(path).name == "best.pt" else
                        real_sha256(path))  # as if best.pt had been retrained after the store was cropped with it
    with pytest.raises(FsweepError, match=r"roi/best\.pt: changed since the store variant was built \(sha256 "
                                          r"000000000000 != [0-9a-f]{12}\); rebuild and re-run the sweep"):
        export.export_experiment(sweep["experiment"], tmp_path / "stale")
    assert not (tmp_path / "stale").exists() and not list(tmp_path.glob(".*export-tmp"))


class _Offset(torch.nn.Module):
    """A network whose logits are another's plus ``delta``: an engine that differs by exactly that much."""

    def __init__(self, net: torch.nn.Module, delta: float):
        super().__init__()
        self.net, self.delta = net, delta

    def forward(self, x):
        return self.net(x) + self.delta


@pytest.mark.parametrize("delta, passes", [(3e-5, True), (2e-4, False)])
def test_parity_passes_the_engines_stn_noise_and_refuses_more(tmp_path, delta, passes):
    """3e-5 is the largest logit difference measured between ONNX Runtime and PyTorch through a trained frozen STN
    (docs/export.md); it must export. A difference ten times the float noise must not."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(1), torch.nn.Linear(4 * 14 * 14, 1),
                              torch.nn.Flatten(0)).eval()  # (B, 1, 16, 16) -> logits (B,)
    samples = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    export.save_pt2(net, samples, tmp_path / export.PT2_FILE)
    export.save_onnx(net, samples, tmp_path / export.ONNX_FILE)
    if passes:
        parity = export.check_parity(_Offset(net, delta), samples, tmp_path, "right")
        assert parity["onnx_max_abs_diff"] == pytest.approx(delta, abs=2e-6) and parity["tolerance"] > delta
    else:
        with pytest.raises(FsweepError, match=r"right: ONNX Runtime \(CPUExecutionProvider\) and PyTorch logits "
                                              r"differ by 2\.0\de-04 > 0\.0001 .* export refused"):
            export.check_parity(_Offset(net, delta), samples, tmp_path, "right")


def test_torchscript_is_written_only_when_asked_and_its_deprecation_shows(tmp_path, monkeypatch):
    asked = {}
    monkeypatch.setattr(export, "export_experiment", lambda experiment, out, torchscript: asked.update(
        torchscript=torchscript) or Path(out))
    assert fsweep(["export", str(tmp_path), "--out", str(tmp_path / "m"), "--torchscript"]) == 0
    assert asked == {"torchscript": True}
    assert fsweep(["export", str(tmp_path), "--out", str(tmp_path / "m")]) == 0 and asked == {"torchscript": False}
    net = FsNet(create_backbone("resnet10t"), STN()).eval()
    samples = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with pytest.warns(FutureWarning, match="torch.jit.trace. is deprecated"):  # PyTorch's own, not hidden
        export.save_torchscript(net, samples, tmp_path / export.TORCHSCRIPT_FILE)
    export.save_pt2(net, samples, tmp_path / export.PT2_FILE)
    export.save_onnx(net, samples, tmp_path / export.ONNX_FILE)
    with pytest.warns(FutureWarning, match="torch.jit.load. is deprecated"):
        parity = export.check_parity(net, samples, tmp_path, "right")
    assert parity["torchscript_max_abs_diff"] <= 1e-5 and parity["pt2_max_abs_diff"] <= 1e-5
    with pytest.warns(FutureWarning, match="TorchScript is deprecated by PyTorch"):  # export's own, before any work
        with pytest.raises(FsweepError, match="no winners.json"):
            real_export_experiment(tmp_path, tmp_path / "m2", torchscript=True)


def test_each_aspect_is_one_store_variant_and_each_winner_predicts_through_its_own(sweep, model_dir):
    import yaml

    from search.plan import write_plan
    from search.expdir import load_sweep_config
    from search.sweep import STORE_VARIANTS

    assert "store variants: 2 (he/aspect: global/pad, global/stretch;" in write_plan(load_sweep_config(str(sweep["experiment"])))
    record = yaml.safe_load((sweep["experiment"] / STORE_VARIANTS).read_text())
    assert set(record["variants"]) == {"global/pad", "global/stretch"}  # built once each, by the driver
    board = pd.read_csv(sweep["experiment"] / "leaderboard.csv")
    assert dict(zip(board["view"], board["aspect"])) == ASPECT_OF  # every trial records its aspect
    card = load_card(model_dir)
    for view, aspect in ASPECT_OF.items():
        entry = card["models"][view]
        assert entry["store_variant"] == record["variants"][f"global/{aspect}"]["key"]
        assert open_variant(sweep["cfg"].data.store, entry["store_variant"]).spec.aspect == aspect
        assert entry["preprocessing"]["aspect"]["mode"] == aspect  # the recipe predict (and a card reader) follows


def test_predicting_the_stored_test_images_reproduces_the_recorded_test_metrics(sweep, model_dir, tmp_path):
    rows = pd.read_parquet(sweep["dataset"] / "dataset.parquet")
    # the store's order (view, image_id): the bootstrap resamples positions, so the order must match too
    test = rows[rows["split"] == "test"].sort_values(["view", "image_id"]).reset_index(drop=True)
    test[["image", "view"]].to_csv(tmp_path / "test.csv", index=False)  # absolute image paths
    predicted = predict(model_dir, [tmp_path / "test.csv"], out=tmp_path / "preds.csv")
    assert pd.read_csv(tmp_path / "preds.csv")["probability"].tolist() == pytest.approx(predicted["probability"])
    card = load_card(model_dir)
    for view in ("left", "right"):
        mine = (test["view"] == view).to_numpy()
        labels, scores = test.loc[mine, "label"].to_numpy(), predicted.loc[mine, "probability"].to_numpy()
        recorded = card["models"][view]["metrics"]["test"]
        threshold = card["models"][view]["operating_threshold"]["value"]
        patients = test.loc[mine, "patient"].to_numpy()
        got = {**binary_metrics(labels, scores, threshold),
               **bootstrap_ci(labels, scores, n=1000, seed=0, threshold=threshold, patients=patients)}
        for key in (*CI_METRICS, "tp", "fp", "tn", "fn", *(f"{m}_ci" for m in CI_METRICS)):
            assert got[key] == pytest.approx(recorded[key], abs=0, nan_ok=True), (view, key)
        stored = pd.read_csv(sweep["experiment"] / f"winner_{view}_test_scores.csv").set_index("image_id")
        ids = test.loc[mine, "image_id"]
        assert np.abs(stored.loc[ids, "score"].to_numpy() - scores).max() <= 1e-5
        assert (predicted.loc[mine, "label"] == (scores >= threshold)).all()


def test_predict_on_never_seen_raw_files_decodes_16_bit_png_and_dicom_monochrome1(sweep, model_dir, unseen, tmp_path):
    known = set(pd.read_parquet(sweep["dataset"] / "dataset.parquet")["pixel_sha256"])
    raw = unseen["raw"]
    assert not {pixel_sha256(decode_image(p)) for p in raw.iterdir()} & known  # in no split
    for name in ("deep.png", "scan.dcm"):  # references: the decoder's own 8-bit output, as plain PNGs
        cv2.imwrite(str(tmp_path / f"{name}.ref.png"), decode_image(raw / name))
    assert np.corrcoef(decode_image(raw / "scan.dcm").ravel(), unseen["left"].ravel())[0, 1] > 0.99  # bone bright
    out = tmp_path / "preds.csv"
    assert fsweep(["predict", str(model_dir), str(raw), "--view", "right", "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("image")
    assert len(table) == 5
    scan = table.loc[str(raw / "scan.dcm")]
    assert scan["view"] == "left" and scan["model"] == "left"  # from the DICOM ImageLaterality tag
    assert (table.drop(index=str(raw / "scan.dcm"))["view"] == "right").all()
    assert table.loc[str(raw / "plain.tif"), "probability"] == table.loc[str(raw / "plain.png"), "probability"]
    assert table["probability"].between(0, 1).all() and set(table["prediction"]) <= {"abnormal", "normal"}
    assert (table["label"] == (table["probability"] >= table["threshold"])).all()
    assert ((table["x0"] >= 0) & (table["x0"] < table["x1"]) & (table["x1"] <= 148)).all()
    assert ((table["y0"] >= 0) & (table["y0"] < table["y1"]) & (table["y1"] <= 252)).all()
    refs = predict(model_dir, [tmp_path / "deep.png.ref.png", tmp_path / "scan.dcm.ref.png"], view="right")
    assert table.loc[str(raw / "deep.png"), "probability"] == pytest.approx(refs["probability"][0], abs=1e-7)
    left_ref = predict(model_dir, [tmp_path / "scan.dcm.ref.png"], view="left")
    assert scan["probability"] == pytest.approx(left_ref["probability"][0], abs=1e-7)


def test_view_comes_from_the_manifest_or_dicom_or_flag_and_is_never_guessed(model_dir, unseen, tmp_path, capsys):
    raw = unseen["raw"]
    pd.DataFrame({"image": [str(raw / "plain.png"), str(raw / "scan.dcm")], "view": ["L", ""]}).to_csv(
        tmp_path / "m.csv", index=False)
    table = predict(model_dir, [tmp_path / "m.csv"], view="right")
    assert table["view"].tolist() == ["left", "left"]  # manifest row, then the DICOM tag beats --view
    assert fsweep(["predict", str(model_dir), str(raw / "plain.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no view" in err and "--view" in err
    pd.DataFrame({"image": [str(raw / "plain.png")], "view": ["oblique"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(FsweepError, match="row 1: unknown view 'oblique'"):
        predict(model_dir, [tmp_path / "bad.csv"])
    right_only = {"models": {"right": {}}, "views": ["right"]}
    with pytest.raises(FsweepError, match="view left, but .* only has a model for right"):
        model_key(right_only, "left", raw / "scan.dcm", model_dir)
    two_view = {"models": {"both": {}}, "views": ["left", "right"]}
    assert model_key(two_view, "left", raw / "scan.dcm", model_dir) == "both"


@pytest.mark.parametrize("damage,needle", [
    ("tamper", "sha256 differs"), ("truncate", "sha256 differs"), ("remove", "missing"),
])
def test_a_tampered_truncated_or_missing_file_is_refused_with_one_line(model_dir, unseen, tmp_path, capsys,
                                                                       damage, needle):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    target = {"tamper": copy / "right" / "model.onnx", "truncate": copy / "right" / "weights.safetensors",
              "remove": copy / "roi" / "best.pt"}[damage]
    data = target.read_bytes()
    if damage == "tamper":
        target.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.unlink()
    assert fsweep(["predict", str(copy), str(unseen["raw"] / "plain.png"), "--view", "right"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and str(target) in err


@pytest.mark.parametrize("old", ["fsweep-model-1", "fsweep-model-2"])
def test_a_model_exported_before_asks_for_a_re_export_in_one_line(model_dir, unseen, tmp_path, capsys, old):
    """A MODEL_DIR as the previous fsweep wrote it (TorchScript and best.pt, no detector.onnx, no model.pt2)."""
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    card = json.loads((copy / "model_card.json").read_text())
    for name in ["roi/detector.onnx", *(f"{view}/model.pt2" for view in card["models"])]:
        (copy / name).unlink()
        del card["sha256"][name]
    for view, entry in card["models"].items():
        (copy / view / "model.torchscript.pt").write_bytes(b"stands in for the old TorchScript file")
        entry["files"] = {"onnx": f"{view}/model.onnx", "torchscript": f"{view}/model.torchscript.pt",
                          "weights": f"{view}/weights.safetensors"}
    (copy / "model_card.json").write_text(json.dumps({**card, "format": old}))
    assert fsweep(["predict", str(copy), str(unseen["raw"] / "plain.png"), "--view", "right"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{old} model card; this fsweep reads {CARD_FORMAT}: re-export the model with `fsweep export`" in err
    # a current card whose detector.onnx is gone (copied by hand, say) also says to re-export, in one line
    (copy / "model_card.json").write_text(json.dumps({**card, "format": CARD_FORMAT}))
    with pytest.raises(FsweepError, match="detector.onnx: missing.*re-export"):
        load_detector(copy, card)


def test_grad_cam_png_has_the_crops_size_and_is_not_constant(model_dir, unseen, tmp_path):
    raw = unseen["raw"]
    table = predict(model_dir, [raw / "plain.png", raw / "scan.dcm"], cam_dir=tmp_path / "cam", view="right")
    card = load_card(model_dir)
    for row in table.itertuples():
        img = decode_image(row.image)
        margin = card["models"][row.model]["preprocessing"]["crop"]["margin"]
        x0, y0, x1, y1 = margin_box((row.x0, row.y0, row.x1, row.y1), margin, img.shape)
        png = cv2.imread(row.cam)
        assert png.shape == (y1 - y0, x1 - x0, 3)
        grey = cv2.cvtColor(np.ascontiguousarray(img[y0:y1, x0:x1]), cv2.COLOR_GRAY2BGR).astype(int)
        assert np.abs(png.astype(int) - grey).std() > 1  # a heat map is drawn over the crop, not a flat tint
    entry = card["models"]["right"]
    model = model_from_weights(model_dir / entry["files"]["weights"], "resnet10t", "joint")
    heat = grad_cam(model, np.asarray(unseen["right"][:SIZE, :SIZE]))
    assert heat.shape == (SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0
    assert heat_to_crop(heat, (252, 148), "pad").shape == (252, 148)


def test_predict_imports_no_torch_ultralytics_timm_or_ray(model_dir, unseen):
    """Both models (frozen STN, joint STN), the detector, a PNG, a 16-bit PNG and a DICOM, through the CLI."""
    raw = unseen["raw"]
    code = (
        "import sys\nfrom fsweep.cli import main\n"
        f"rc = main(['predict', {str(model_dir)!r}, {str(raw / 'scan.dcm')!r}, {str(raw / 'plain.png')!r}, "
        f"{str(raw / 'deep.png')!r}, '--view', 'right'])\n"
        "assert rc == 0, rc\n"
        "heavy = sorted(m for m in ('torch', 'ultralytics', 'timm', 'ray', 'fsmodels', 'search', 'torchvision') "
        "if m in sys.modules)\n"
        "print('heavy modules:', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("heavy modules: []"), done.stdout[-500:]
    table = pd.read_csv(io.StringIO(done.stdout.rsplit("heavy modules:", 1)[0]))
    assert sorted(table["model"]) == ["left", "right", "right"] and table["probability"].between(0, 1).all()


PT2_LOAD = """import json
import numpy as np
import torch
model = torch.export.load(sys.argv[1]).module()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(model(x).numpy().tolist()))
"""


@pytest.mark.parametrize("view", ["left", "right"])  # frozen STN, joint STN
def test_model_pt2_loads_without_fsweep_and_gives_predicts_logits(model_dir, unseen, tmp_path, view):
    raw = unseen["raw"]
    images = sorted(p for p in raw.iterdir())  # PNG, TIFF, JPEG, 16-bit PNG, DICOM: a batch of 5
    table = predict(model_dir, images, view=view)
    card = load_card(model_dir)
    mine = [i for i, m in enumerate(table["model"]) if m == view]
    assert len(mine) == (5 if view == "left" else 4)  # the DICOM's ImageLaterality says left
    fields = recipe_spec(card["models"][view]["preprocessing"])
    spec = VariantSpec(**{**fields, "roi_dir": str(model_dir / fields["roi_dir"])})
    detector = load_detector(model_dir, card)  # predict's own detector and recipe: its network inputs
    x = np.stack([preprocess_decoded(decode_image(images[i]), spec, detector)[0] for i in mine])
    np.save(tmp_path / "x.npy", x[:, None].astype(np.float32) / np.float32(255))
    done = clean_python(PT2_LOAD, model_dir / view / "model.pt2", tmp_path / "x.npy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    logits = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    expected = table["logit"].to_numpy()[mine]
    print(f"model.pt2 ({view}) vs predict's ONNX logits: max |diff| {np.abs(logits - expected).max():.2e} "
          f"over {len(mine)} images")
    assert len(logits) == len(mine) >= 4 and np.abs(logits - expected).max() <= 1e-5
    assert np.allclose(1 / (1 + np.exp(-logits)), table["probability"].to_numpy()[mine], atol=1e-6)


def test_the_detector_falls_back_to_the_legacy_exporter_in_one_line_and_still_crops_alike(model_dir, unseen,
                                                                                           tmp_path, monkeypatch,
                                                                                           capsys):
    from preprocessing.detector_onnx import export_detector

    roi = tmp_path / "roi"
    roi.mkdir()
    for name in ("best.pt", "metrics.json"):
        shutil.copy2(model_dir / "roi" / name, roi / name)
    fail_the_current_exporter(monkeypatch)
    written = export_detector(roi, 64)
    assert written["exporter"] == "legacy" and "aten::example_op" in written["fallback_reason"]
    said = [line for line in capsys.readouterr().err.splitlines() if "detector.onnx" in line]
    assert len(said) == 1 and "cannot express the detector" in said[0] and "legacy" in said[0]
    ultralytics_detector, onnx_detector = RoiDetector(roi), OnnxRoiDetector(roi)
    assert onnx_detector.size == written["input_size"] == 64
    for path in sorted(unseen["raw"].iterdir()):
        img = decode_image(path)
        want, got = ultralytics_detector.detect(img), onnx_detector.detect(img)
        assert (want is None) == (got is None), path
        if want is not None:
            assert max(abs(a - b) for a, b in zip(want[0], got[0])) <= 1e-3, path


@pytest.mark.parametrize("shape", [(252, 148), (70, 148), (148, 60), (1006, 590), (30, 500), (64, 64), (7, 9)])
def test_the_detectors_letterbox_is_ultralytics_minimum_rectangle_pixel_for_pixel(shape):
    from ultralytics.data.augment import LetterBox

    from preprocessing.detector_onnx import letterbox

    img = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
    for size in (64, 320):
        mine, (new_h, new_w) = letterbox(img, size, 32)
        theirs = LetterBox(size, auto=True, stride=32)(image=cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        theirs = theirs[..., ::-1].transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255)
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), (shape, size)
        assert max(mine.shape[2:]) == size and mine.shape[2] % 32 == 0 and mine.shape[3] % 32 == 0


def test_the_onnx_detector_crops_like_ultralytics_on_every_kind_of_file(sweep, model_dir, unseen):
    """The export's parity check, again on raw files of every kind (none of them seen at export)."""
    from preprocessing.roi import full_frame_box

    ultralytics_detector, onnx_detector = RoiDetector(model_dir / "roi"), OnnxRoiDetector(model_dir / "roi")
    rows = pd.read_parquet(sweep["dataset"] / "dataset.parquet")
    paths = sorted(unseen["raw"].iterdir()) + [Path(p) for p in rows[rows["split"] == "test"]["image"]]
    decoded = [decode_image(path) for path in paths]
    first = decoded[0]  # and shapes whose letterbox is not square: strips (aspect above 2) and a larger image
    decoded += [first[:70], np.ascontiguousarray(first[:, :60]), cv2.resize(first, (590, 1006))]
    boxes, largest = 0, 0.0
    for path, img in zip([*paths, "strip", "tall strip", "590x1006"], decoded):
        want, got = ultralytics_detector.detect(img), onnx_detector.detect(img)
        assert (want is None) == (got is None), path
        if want is None:
            continue
        boxes += 1
        largest = max(largest, *(abs(a - b) for a, b in zip(want[0], got[0])))
        assert abs(want[1] - got[1]) <= 1e-4, path  # the confidence
        margin = sweep["cfg"].roi.margin
        assert margin_box(want[0], margin, img.shape) == margin_box(got[0], margin, img.shape), path
    print(f"ONNX vs ultralytics detector: {len(decoded)} images, {boxes} with a box, same crops, "
          f"max |box diff| {largest:.1e} px")
    assert boxes >= 3 and largest <= 1e-3
    assert onnx_detector.detect(np.zeros((40, 30), np.uint8)) is None  # nothing to find: full frame
    assert full_frame_box(np.zeros((40, 30), np.uint8)) == (0.0, 0.0, 30.0, 40.0)


def test_export_refuses_an_unfinished_experiment_and_a_used_out_dir(model_dir, sweep, tmp_path, capsys):
    assert fsweep(["export", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no winners.json" in err
    assert fsweep(["export", str(sweep["experiment"]), "--out", str(model_dir)]) == 2
    assert "not empty" in capsys.readouterr().err


def fail_the_current_exporter(monkeypatch):
    """Make ``torch.onnx.export(..., dynamo=True)`` raise as it does on an operator it cannot express."""
    real = torch.onnx.export

    def export_(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("aten::example_op: no ONNX decomposition\nmore detail")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_)


def test_the_current_onnx_exporter_pools_the_stn_at_any_size(tmp_path):
    """32 px: the STN's adaptive pooling to 64 px, which the legacy exporter could not write."""
    net = FsNet(create_backbone("resnet10t"), STN()).eval()
    samples = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert export.save_onnx(net, samples, tmp_path / "model.onnx") == {"exporter": "dynamo", "fallback_reason": None}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = net(samples).numpy()
    assert np.abs(session.run(None, {"image": samples.numpy()})[0] - expected).max() <= 1e-5
    assert not list(tmp_path.glob("*.data"))  # one self-contained file


def test_the_onnx_file_is_converted_from_the_pt2_program_without_a_second_trace(tmp_path, monkeypatch):
    net = FsNet(create_backbone("resnet10t"), STN()).eval()
    samples = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    program = export.save_pt2(net, samples, tmp_path / export.PT2_FILE)
    assert isinstance(program, torch.export.ExportedProgram)

    def no_trace(*args, **kwargs):
        raise AssertionError("the network was traced again")

    monkeypatch.setattr(torch.export, "export", no_trace)
    written = export.save_onnx(net, samples, tmp_path / export.ONNX_FILE, program)
    assert written == {"exporter": "dynamo", "fallback_reason": None}  # no legacy fallback: the program converted
    session = ort.InferenceSession(str(tmp_path / export.ONNX_FILE), providers=["CPUExecutionProvider"])
    five = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(4))  # the program's dynamic batch kept
    with torch.no_grad():
        expected = net(five).numpy()
    assert np.abs(session.run(None, {"image": five.numpy()})[0] - expected).max() <= 1e-5


def test_the_legacy_onnx_exporter_is_the_fallback_and_says_why_in_one_line(tmp_path, monkeypatch, capsys):
    fail_the_current_exporter(monkeypatch)
    net = FsNet(create_backbone("resnet10t"), STN()).eval()
    samples = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    folder = tmp_path / "right"
    folder.mkdir()
    written = export.save_onnx(net, samples, folder / export.ONNX_FILE)
    assert written["exporter"] == "legacy" and "aten::example_op" in written["fallback_reason"]
    err = capsys.readouterr().err.strip().splitlines()
    said = [line for line in err if "model.onnx" in line]
    assert len(said) == 1 and "cannot express" in said[0] and "legacy" in said[0] and "more detail" not in said[0]
    export.save_pt2(net, samples, folder / export.PT2_FILE)
    parity = export.check_parity(net, samples, folder, "right")
    assert parity["onnx_max_abs_diff"] <= 1e-5 and parity["pt2_max_abs_diff"] <= 1e-5
    # where the legacy exporter cannot pool the STN either, the export is refused with the reason
    with pytest.raises(FsweepError, match="legacy ONNX exporter cannot express; train with data.size a multiple of 64"):
        export.save_onnx(net, torch.rand(2, 1, 32, 32), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def clean_python(code: str, *args, cwd, env=None) -> subprocess.CompletedProcess:
    """Run ``code`` with site-packages only: ``-I -S`` drops the checkout, PYTHONPATH and the .pth files (the
    editable fsweep finder among them); ``CLEAN_PATH`` adds site-packages back and checks fsweep is not importable."""
    return subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN_PATH + code, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FSWEEP_SITE": sysconfig.get_paths()["purelib"], **(env or {})})


RUN_SCRIPT = "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


CLEAN_PATH = """import os, sys
sys.path.append(os.environ["FSWEEP_SITE"])
for name in ("search", "fsweep", "fsmodels", "preprocessing", "cluster"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable: not a clean process")
"""


def test_the_card_alone_reproduces_predict_within_1e_5(sweep, model_dir, unseen, tmp_path):
    """tests/card_only_predict.py: the recipe re-implemented from model_card.json (numpy, OpenCV, pydicom,
    onnxruntime for the detector and the network; no fsweep, no ultralytics, no torch) on raw files of every
    kind, strips and stored test images."""
    raw = unseen["raw"]
    write_dicom(tmp_path / "window.dcm", unseen["right"].astype(np.uint16) * 12 + 300, window=(1500, 2200),
                slope=0.5, intercept=-100.0)  # rescale, then a window that clips both ends
    rows = pd.read_parquet(sweep["dataset"] / "dataset.parquet")
    test = rows[rows["split"] == "test"].groupby("view").head(6)
    images = [(p, "right") for p in sorted(raw.iterdir()) if p.name != "scan.dcm"]
    images += [(raw / "scan.dcm", "left"), (tmp_path / "window.dcm", "right")]
    images += [(Path(r.image), r.view) for r in test.itertuples()]
    for name, strip in (("wide.png", unseen["right"][:70]), ("tall.png", unseen["right"][:, :60])):
        cv2.imwrite(str(tmp_path / name), strip)  # aspect above 2: the detector's letterbox is not square
        images.append((tmp_path / name, "right"))
    requests = [f"{view}={path}" for path, view in images]
    done = clean_python(RUN_SCRIPT, ROOT / "tests" / "card_only_predict.py", model_dir, *requests, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    card_only = json.loads(done.stdout.strip().splitlines()[-1])
    assert card_only["heavy_modules"] == []  # neither torch nor ultralytics nor timm
    frames = [predict(model_dir, [p], view=v) for p, v in images]
    expected = np.array([f["probability"][0] for f in frames])
    got = np.array(card_only["probabilities"])
    fallback = [bool(f["fallback"][0]) for f in frames]
    print(f"card-only vs predict: max |dp| {np.abs(got - expected).max():.2e} over {len(images)} images "
          f"({fallback.count(False)} with a detected box)")
    assert np.abs(got - expected).max() <= 1e-5
    assert [list(b) for b in card_only["boxes"]] == [[f[k][0] for k in ("x0", "y0", "x1", "y1")] for f in frames]
    assert True in fallback and False in fallback  # both the crop and the full-frame fallback were compared
    # the network inputs themselves, pixel for pixel: an untrained network could hide a wrong step
    card = load_card(model_dir)
    detector = load_detector(model_dir, card)  # predict's: the ONNX detector
    for (path, view), digest in zip(images, card_only["inputs_sha256"]):
        fields = recipe_spec(card["models"][view]["preprocessing"])
        spec = VariantSpec(**{**fields, "roi_dir": str(model_dir / fields["roi_dir"])})
        array = preprocess_decoded(decode_image(path), spec, detector)[0]
        assert hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest() == digest, path


def test_the_recipe_keeps_the_networks_size_apart_from_the_detectors():
    detector = {"dir": "roi", "sha256": "a" * 64, "onnx_sha256": "b" * 64, "input_size": 320, "stride": 32,
                "map50": 0.9}
    recipe = recipe_card("global", 128, "pad", 0.05, detector)
    assert recipe["resize"]["size"] == 128 and recipe["detect"]["input_size"] == 320
    assert "(320 - new_w) mod 32" in recipe["detect"]["letterbox"] and recipe["crop"]["margin"] == 0.05
    assert recipe_spec(recipe) == {"he": "global", "size": 128, "aspect": "pad", "roi_dir": "roi", "margin": 0.05}


def test_parity_runs_once_per_provider_chain_predict_may_open():
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert provider_chains([cpu]) == [[cpu]]
    assert provider_chains([trt, cuda, cpu, "AzureExecutionProvider"]) == [[cuda, cpu], [cpu]]  # predict's order
    assert provider_chains(ort.get_available_providers())[0] == [p for p in (cuda, cpu)
                                                                 if p in ort.get_available_providers()]
    assert session_providers([cuda, cpu]) == [(cuda, {"use_tf32": "0"}), (cpu, {})]  # true fp32 on the GPU too


def test_parity_refuses_a_provider_that_does_not_come_up(tmp_path, monkeypatch):
    net = FsNet(create_backbone("resnet10t"), None).eval()
    samples = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    export.save_pt2(net, samples, tmp_path / export.PT2_FILE)
    export.save_onnx(net, samples, tmp_path / export.ONNX_FILE)
    parity = export.check_parity(net, samples, tmp_path, "right")
    assert parity["onnx_providers"].keys() == {"CPUExecutionProvider"} and parity["onnx_max_abs_diff"] <= 1e-5
    # a CUDA build whose libraries are missing lists CUDA, then runs the session on the CPU without a word
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(FsweepError, match="lists CUDAExecutionProvider but could not start it"):
        export.check_parity(net, samples, tmp_path, "right")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_follow_the_umask_even_when_the_writer_makes_0600(tmp_path, umask):
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write(tmp_path / "stn.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "stn.safetensors").stat().st_mode) == 0o666 & ~umask


PLAIN_RAY = """import json
from ray.tune import ExperimentAnalysis
analysis = ExperimentAnalysis(sys.argv[1])
print(json.dumps({t.trial_id: t.last_result["best_val_auc"] for t in analysis.trials}))
"""


def test_plain_ray_opens_the_experiment_without_fsweep(sweep, tmp_path):
    """Ray's own ExperimentAnalysis, in a process that cannot import fsweep, reads back the leaderboard's val_auc."""
    done = clean_python(PLAIN_RAY, sweep["experiment"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    board = pd.read_csv(sweep["experiment"] / "leaderboard.csv", dtype={"trial_id": str})
    assert len(read) == len(board) == 2
    assert read == dict(zip(board["trial_id"], board["val_auc"]))  # the leaderboard's best-epoch value, exactly


PACKAGES_OF_FSWEEP = ("fsweep", "search", "fsmodels", "preprocessing", "cluster")


def slim_env(**extra) -> dict:
    """The environment without this checkout on the path (PYTHONPATH) or the test's virtual environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def du(path: Path) -> str:
    """``du -sh`` of ``path`` (links followed), e.g. ``518M``."""
    return subprocess.run(["du", "-shL", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


def test_predict_installs_and_runs_without_torch_in_a_fresh_environment(model_dir, unseen, tmp_path):
    """requirements-predict.txt, then fsweep with --no-deps, in a new virtual environment: no torch, no
    ultralytics; the detector and both STN models (frozen: the DICOM's left model) give the full install's
    probabilities, and --cam stops in one line that says what to install."""
    python = shutil.which("python3.11") or sys._base_executable
    venv, source = tmp_path / "venv", tmp_path / "src"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    done = subprocess.run([*pip, "-r", str(ROOT / "requirements-predict.txt")], capture_output=True, text=True,
                          timeout=600, env=slim_env())
    assert done.returncode == 0, done.stderr[-2000:]
    source.mkdir()  # a copy: building fsweep writes build/ and *.egg-info next to its sources
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in PACKAGES_OF_FSWEEP:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([*pip, "--no-deps", str(source)], capture_output=True, text=True, timeout=600,
                          env=slim_env())
    assert done.returncode == 0, done.stderr[-2000:]
    absent = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True,
                            env=slim_env(), cwd=tmp_path)
    assert absent.returncode != 0 and "No module named 'torch'" in absent.stderr
    raw = unseen["raw"]
    images = [raw / "plain.png", raw / "deep.png", raw / "scan.dcm"]  # 8-bit PNG, 16-bit PNG, DICOM (left)
    command = [str(venv / "bin" / "fsweep"), "predict", str(model_dir), *map(str, images), "--view", "right"]
    done = subprocess.run([*command, "--out", str(tmp_path / "slim.csv")], capture_output=True, text=True,
                          timeout=300, env=slim_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    slim = pd.read_csv(tmp_path / "slim.csv")
    full = predict(model_dir, images, view="right")
    assert slim["image"].tolist() == full["image"].tolist() and slim["model"].tolist() == ["right", "right", "left"]
    difference = np.abs(slim["probability"].to_numpy() - full["probability"].to_numpy()).max()
    assert difference <= 1e-7 and (slim["label"] == full["label"]).all()
    for column in ("x0", "y0", "x1", "y1", "fallback"):
        assert slim[column].tolist() == full[column].tolist(), column  # the same detector boxes
    done = subprocess.run([*command, "--cam", str(tmp_path / "cams")], capture_output=True, text=True,
                          timeout=300, env=slim_env(), cwd=tmp_path)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert "--cam needs torch" in err and "pip install" in err and not (tmp_path / "cams").exists()
    print(f"predict-only environment {du(venv)} (full install {du(Path(sys.prefix))}); "
          f"max |probability difference| {difference:.1e}")
