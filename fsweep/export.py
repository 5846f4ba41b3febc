"""Export a sweep's winners as a self-contained MODEL_DIR.

One model per winning view (``winners.json``: left and right when the sweep spans
both, ``both`` for a two-view model). Layout::

    MODEL_DIR/model_card.json             recipe, metrics, versions, sha256 of every file below
    MODEL_DIR/roi/detector.onnx           the ROI detector in ONNX (ultralytics' export of best.pt), run by predict
    MODEL_DIR/roi/best.pt, metrics.json   the detector as trained (the store variant's key names best.pt's sha256)
    MODEL_DIR/<view>/weights.safetensors  the best epoch's state dict
    MODEL_DIR/<view>/model.pt2            torch.export of the eval-mode network, dynamic batch (torch.export.load)
    MODEL_DIR/<view>/model.onnx           opset 20, the STN in the graph, input ``image`` float32 (B, 1, S, S)
                                          = uint8 / 255, output ``logit`` (B,); metadata_props (``ONNX_METADATA``)
    MODEL_DIR/<view>/model.torchscript.pt only with ``torchscript=True`` (deprecated by PyTorch; its warning shows)

Both graphs come from torch's current exporters: ``torch.export`` for ``model.pt2`` and
``torch.onnx.export(..., dynamo=True)`` for ONNX. Where the ONNX one cannot express a network, the
legacy TorchScript-based exporter writes that view's ONNX instead, a line on stderr says why, and
the card records it (``parity.onnx_exporter``, ``parity.onnx_fallback_reason``).

The card's ``preprocessing`` entry is the whole recipe in words and numbers
(``fsweep.modelcard.recipe_card``); its hash is in the ONNX file too, so a graph and a
card can be matched. At export, ONNX Runtime (under every execution provider that
``fsweep predict`` may pick on this machine), ``model.pt2`` (and TorchScript when written) are
compared with PyTorch in true fp32 (TF32 off) on the store's validation images of the view plus
random inputs; a difference above ``PARITY_TOLERANCE`` refuses the export. The ONNX detector is
compared with the ultralytics one on the data set's validation images: any crop that differs
refuses the export. The directory is assembled under a temporary name and renamed, so a failed
export leaves nothing behind.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cluster.errors import FsweepError
from fsmodels.checkpoint import python_values
from fsmodels.metrics import json_safe
from fsweep.modelcard import (
    CARD,
    CARD_FORMAT,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    PT2_FILE,
    ROI_DIR,
    ROI_FILES,
    THRESHOLD_RULE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
    recipe_card,
)
from preprocessing.files import atomic_write, file_sha256
from preprocessing.vocab import flip_as, is_off, model_views, pair_views

ONNX_OPSET = 20  # first opset with AffineGrid (GridSample: 16); onnxruntime 1.32 runs it
# max |logit difference| between PyTorch and ONNX Runtime / model.pt2 / TorchScript: the STN's grid_sample
# resamples ~1e-5 apart between engines and the backbone carries that to the logit (docs/export.md, `fsweep export`);
# 1e-4 of a logit moves a probability by at most 2.5e-5
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 8  # real validation images per view in the parity batch (plus PARITY_RANDOM random ones)
PARITY_RANDOM = 2
DETECTOR_PARITY_IMAGES = 32  # validation images the ONNX and ultralytics detectors must crop alike
ONNX_METADATA = ("threshold", "threshold_chosen_on", "input_size", "recipe_sha256", "card_format", "view",
                 "backbone")  # metadata_props of model.onnx, every value a string (ONNX's rule)
PACKAGES = ("torch", "timm", "onnx", "onnxscript", "onnxruntime", "opencv-python", "pydicom", "ultralytics", "numpy",
            "safetensors", "ray", "fsweep")  # versions recorded in the card
TORCHSCRIPT_DEPRECATED = ("TorchScript is deprecated by PyTorch (torch.jit.trace warns so); model.torchscript.pt is "
                          "written because it was asked for: prefer model.pt2 (torch.export.load)")


def export_experiment(experiment: str | Path, out: str | Path, torchscript: bool = False) -> Path:
    """Export each view's winner of ``experiment`` (path or storage URI) into MODEL_DIR ``out``; returns ``out``.

    ``torchscript``: also write ``model.torchscript.pt`` (deprecated by PyTorch; a FutureWarning says so).
    """
    from cluster.storage import is_uri

    if torchscript:
        warnings.warn(TORCHSCRIPT_DEPRECATED, FutureWarning, stacklevel=2)
    experiment = str(experiment) if is_uri(experiment) else str(Path(experiment).resolve())
    out = Path(out).resolve()
    winners = read_winners(experiment)
    if out.exists() and any(out.iterdir()):
        raise FsweepError(f"{out}: exists and is not empty; choose another --out or remove it")
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    try:
        card = build_card(experiment, winners, tmp, torchscript)
        # json.dumps writes float nan as a bare NaN (not JSON) and never asks `default` about it: json_safe first
        (tmp / CARD).write_text(json.dumps(json_safe(python_values(card)), indent=2))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for view, model in card["models"].items():
        parity = model["parity"]
        print(f"exported {view}: {model['backbone']} trial {model['trial_id']} (parity max |diff|: ONNX "
              f"{parity['onnx_max_abs_diff']:.1e} via {parity['onnx_exporter']}, model.pt2 "
              f"{parity['pt2_max_abs_diff']:.1e}) -> {out / view}")
    if card.get("detector"):
        found = card["detector"]["parity"]
        print(f"exported roi/detector.onnx: {found['same_crops']}/{found['images']} crops identical to ultralytics' "
              f"(max |box diff| {found['max_abs_box_diff']:.1e} px)")
    print(f"export took {time.monotonic() - started:.0f} s")
    return out


def read_winners(experiment: str) -> dict:
    """``winners.json`` of a finished sweep, or a one-line FsweepError."""
    from cluster.storage import exists, join
    from search.expdir import get_text
    from search.select import WINNERS

    location = join(experiment, WINNERS)
    if not exists(location):
        raise FsweepError(f"{experiment}: no winners.json (not a finished fsweep sweep; run `fsweep resume` first)")
    winners = json.loads(get_text(location))
    if not winners:
        raise FsweepError(f"{location}: no winning trial (every trial failed or reported no metric)")
    return winners


def build_card(experiment: str, winners: dict, model_dir: Path, torchscript: bool = False) -> dict:
    """Export each winner into ``model_dir`` and return the model card (sha256 of every file last).

    The networks are written and checked first, the detector after them: a refused network costs no detector
    export, the slowest step (about 25 s on 2 CPU cores).
    """
    from fsmodels.train import load_trial_model

    networks, sources = {}, []
    for view, winner in sorted(winners.items()):
        checkpoint = locate_checkpoint(experiment, winner["checkpoint"])
        model, cfg = load_trial_model(checkpoint)
        roi = winner_detector(cfg, checkpoint)
        if sources and roi != sources[0]:  # one detector per MODEL_DIR (predict crops every input with it)
            raise FsweepError(f"{checkpoint}: this winner's crops came from the detector {roi}, another view's from "
                              f"{sources[0]} (winners of different folds); a MODEL_DIR holds one detector")
        sources.append(roi)
        networks[view] = export_network(model, cfg, view, checkpoint, model_dir, roi, torchscript)
    detector = package_detector(next(iter(networks.values()))["cfg"], sources[0], model_dir)
    models = {view: view_entry(networks[view], view, winners[view], model_dir, detector) for view in networks}
    card = {
        "format": CARD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "experiment": experiment,
        "views": sorted({v for m in models.values() for v in m["views"]}),
        "models": models,
        "detector": {k: v for k, v in detector.items() if k != "dir"} if detector else None,
        "data": data_fingerprint(models),
        "packages": package_versions(),
    }
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    card["sha256"] = {str(p.relative_to(model_dir)): file_sha256(p) for p in files}
    return card


def locate_checkpoint(experiment: str, recorded: str) -> Path:
    """The winner's checkpoint as a local directory (a URI is downloaded); found under a moved ``experiment``."""
    from cluster.storage import exists, is_uri, join
    from search.expdir import as_local_dir

    if is_uri(recorded) and exists(recorded):
        return as_local_dir(recorded)
    path = Path(recorded)
    if path.is_dir():
        return path
    moved = join(experiment, path.parent.name, path.name)  # <experiment>/<trial dir>/<checkpoint dir>
    if exists(moved):
        return as_local_dir(moved)
    raise FsweepError(f"{recorded}: the winner's checkpoint is missing (experiment incomplete or moved)")


def winner_detector(cfg, checkpoint: Path) -> str:
    """The ROI_DIR whose crops a winner trained on: its fold's detector in the store when the trial recorded
    one (a DATASET with folds: ``preprocessing.fold_roi``), else the config's ``roi.detector``."""
    from fsmodels.checkpoint import load_state
    from preprocessing.fold_roi import open_fold_detector

    recorded = load_state(checkpoint).get("artifacts", {}).get("detector")
    if not recorded:
        return cfg.roi.detector
    return str(open_fold_detector(cfg.data.store, recorded["key"], cfg.space.fold, expected=recorded["manifest"]).path)


def package_detector(cfg, roi: str, model_dir: Path) -> dict | None:
    """Copy the ROI detector ``roi`` (a ROI_DIR) into ``model_dir/roi``, write its ONNX and check that it crops
    like ultralytics.

    Returns the recipe's detector entry (None without a detector): sha256 of ``best.pt`` and of
    ``detector.onnx``, input size, mAP50, how the ONNX was exported, and the crop parity.
    """
    from preprocessing.detector_onnx import DETECTOR_ONNX, export_detector as write_detector_onnx

    if is_off(roi):
        return None
    source, target = Path(roi), model_dir / ROI_DIR
    target.mkdir()
    for name in ROI_FILES:
        if not (source / name).is_file():
            raise FsweepError(f"{source / name}: the ROI detector the winner was trained with is missing")
        shutil.copy2(source / name, target / name)
    trained = json.loads((source / "metrics.json").read_text())
    imgsz = int(trained.get("imgsz") or 640)  # ultralytics' default, as RoiDetector reads it
    exported = write_detector_onnx(target, imgsz)  # prints why when it falls back to the legacy exporter
    return {"dir": ROI_DIR, "sha256": file_sha256(target / "best.pt"),
            "onnx_sha256": file_sha256(target / DETECTOR_ONNX), "imgsz": imgsz,
            "input_size": exported["input_size"], "stride": exported["stride"], "map50": trained.get("map50"),
            "export": {k: exported[k] for k in ("exporter", "fallback_reason", "seconds")},
            "parity": detector_parity(target, cfg)}


def detector_images(cfg) -> tuple[list[np.ndarray], str]:
    """Decoded validation radiographs of the data set (up to ``DETECTOR_PARITY_IMAGES``) and where they came from."""
    from preprocessing.decode import decode_image
    from preprocessing.ingest import load_dataset

    rows = load_dataset(cfg.data.dataset)
    val = rows[rows["split"] == "val"].head(DETECTOR_PARITY_IMAGES)
    if val.empty:
        raise FsweepError(f"{cfg.data.dataset}: no validation rows to compare the ONNX detector with ultralytics on")
    images = [decode_image(path) for path in val["image"]]
    return images, f"{len(images)} validation images of {cfg.data.dataset}"


def detector_parity(roi_dir: Path, cfg) -> dict:
    """The ONNX detector (numpy letterbox and decoding) against ultralytics' on the same images: crops must match.

    Compares the crop window (``margin_box`` at the config's margin: outward rounding) of every image, and
    the fallback (no box) decision; FsweepError when any differs.
    """
    from preprocessing.detector_onnx import OnnxRoiDetector
    from preprocessing.roi import RoiDetector, full_frame_box, margin_box

    images, source = detector_images(cfg)
    reference, onnx = RoiDetector(roi_dir), OnnxRoiDetector(roi_dir)
    same, boxes, largest = 0, 0, 0.0
    for img in images:
        want, got = reference.detect(img), onnx.detect(img)
        if (want is None) != (got is None):
            raise FsweepError(f"{roi_dir}/detector.onnx: finds {'no box' if got is None else 'a box'} where "
                              f"ultralytics finds {'none' if want is None else 'one'}; export refused")
        box_a, box_b = (full_frame_box(img), full_frame_box(img)) if want is None else (want[0], got[0])
        boxes += want is not None
        largest = max(largest, *(abs(a - b) for a, b in zip(box_a, box_b)))
        if margin_box(box_a, cfg.roi.margin, img.shape) != margin_box(box_b, cfg.roi.margin, img.shape):
            raise FsweepError(f"{roi_dir}/detector.onnx: its crop differs from ultralytics' (boxes {box_b} vs "
                              f"{box_a}); export refused")
        same += 1
    return {"images": len(images), "with_box": boxes, "same_crops": same, "max_abs_box_diff": largest,
            "compared": "crop window after margin and outward rounding; box coordinates in pixels",
            "source": source, "reference": "ultralytics YOLO(best.pt).predict on the CPU"}


def export_network(model, cfg, view: str, checkpoint: Path, model_dir: Path, roi: str, torchscript: bool = False
                   ) -> dict:
    """Write one view's weights, model.pt2 and ONNX (and TorchScript if asked) and check their parity with PyTorch.

    Returns what ``view_entry`` needs. FsweepError when the detector's ``best.pt`` is not the one the store
    variant was cropped with, or when an engine disagrees with PyTorch.
    """
    from fsmodels.checkpoint import load_state, recorded_variant
    from fsmodels.train import trial_params, validation_threshold
    from preprocessing.variant import open_variant

    state = load_state(checkpoint)
    recorded = recorded_variant(state)
    variant = open_variant(cfg.data.store, recorded["key"], expected=recorded["manifest"])  # never a recomputed key
    if not is_off(roi):
        weights = Path(roi) / "best.pt"
        if not weights.is_file():
            raise FsweepError(f"{weights}: the ROI detector the winner was trained with is missing")
        trained_on, current = variant.meta.get("detector_sha256"), file_sha256(weights)
        if trained_on != current:
            raise FsweepError(f"{weights}: changed since the store variant was built (sha256 {current[:12]} != "
                              f"{str(trained_on)[:12]}); rebuild and re-run the sweep")
    folder = model_dir / view
    folder.mkdir()
    samples = parity_inputs(variant, view, variant.spec.size)
    save_weights(model, folder / WEIGHTS_FILE)
    program = save_pt2(model, samples, folder / PT2_FILE)
    if torchscript:
        save_torchscript(model, samples, folder / TORCHSCRIPT_FILE)
    exporter = save_onnx(model, samples, folder / ONNX_FILE, program)
    parity = {**check_parity(model, samples, folder, view), "onnx_exporter": exporter["exporter"],
              "onnx_fallback_reason": exporter["fallback_reason"]}
    return {"cfg": cfg, "params": trial_params(cfg), "checkpoint": checkpoint, "variant": variant,
            "threshold": validation_threshold(state), "parity": parity, "torchscript": torchscript}


def view_entry(network: dict, view: str, winner: dict, model_dir: Path, detector: dict | None) -> dict:
    """One view's card entry, with the recipe (the detector's included) also written into its ONNX metadata."""
    from preprocessing.recipe import CODE_VERSION

    cfg, params, variant, threshold = network["cfg"], network["params"], network["variant"], network["threshold"]
    spec = variant.spec
    recipe = recipe_card(spec.he, spec.size, spec.aspect, spec.margin, detector)
    write_onnx_metadata(model_dir / view / ONNX_FILE, {
        "threshold": repr(threshold), "threshold_chosen_on": "validation", "input_size": str(spec.size),
        "recipe_sha256": recipe["recipe_sha256"], "card_format": CARD_FORMAT, "view": view,
        "backbone": params.backbone})
    files = {"onnx": f"{view}/{ONNX_FILE}", "pt2": f"{view}/{PT2_FILE}", "weights": f"{view}/{WEIGHTS_FILE}"}
    if network["torchscript"]:
        files["torchscript"] = f"{view}/{TORCHSCRIPT_FILE}"
    return {
        "trial_id": winner["trial_id"],
        "checkpoint": str(network["checkpoint"]),
        "store_variant": variant.key,
        "best_epoch": winner.get("best_epoch"),
        "selected_by": winner.get("selected_by"),
        "views": list(model_views(view, variant.views)),
        "classes": {"negative": variant.classes[0], "positive": variant.classes[1]},
        "flip": flip_as(view, params.flip, variant.views, pair_views(cfg.data.mirror_pair)),
        "backbone": params.backbone,
        "space": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "preprocessing": recipe,
        "network": {"input": ONNX_INPUT, "output": ONNX_OUTPUT, "stn": params.stn, "stn_in_graph": params.stn != "off",
                    "store_code_version": CODE_VERSION},
        "operating_threshold": {"value": threshold, "chosen_on": "validation", "rule": THRESHOLD_RULE},
        "metrics": card_metrics(validation_metrics(network["checkpoint"]), winner.get("test")),
        # did it learn: the best epoch's training AUC and the sweep's plain-words warnings (search.select.fit_warnings)
        "fit": {"train_auc": (winner.get("train") or {}).get("auc"), "warnings": winner.get("warnings", [])},
        "files": files,
        "parity": network["parity"],
        "data": {**(variant.meta.get("dataset") or {}), "variant": variant.key},
    }


def validation_metrics(checkpoint: Path) -> dict:
    """The selected epoch on the validation split with bootstrap intervals (the sweep kept only point values)."""
    from fsmodels.train import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint, split="val", with_scores=False)


def card_metrics(val: dict, test: dict | None) -> dict:
    """Validation and test metrics, each split's own Youden threshold renamed so it cannot pass for the operating one.

    Every threshold-dependent figure (accuracy, F1, sensitivity, specificity, confusion counts, their intervals)
    is at ``operating_threshold``; ``youden_threshold_of_<split>_scores`` is recomputed on that split's scores,
    for reference only (on test it would be chosen on the data it is scored on).
    """
    def relabel(split: str, metrics: dict | None) -> dict | None:
        if metrics is None:
            return None
        metrics = dict(metrics)
        if "youden_threshold" in metrics:
            metrics[f"youden_threshold_of_{split}_scores"] = metrics.pop("youden_threshold")
        return metrics

    return {"val": relabel("val", val), "test": relabel("test", test),
            "about": "figures at operating_threshold (chosen on validation); test was scored once, after selection; "
                     "youden_threshold_of_<split>_scores is that split's own optimum, for reference only"}


def parity_inputs(variant, view: str, size: int) -> torch.Tensor:
    """Real validation images of ``view`` (both views for a two-view model) plus random ones, in [0, 1]."""
    views = model_views(view, variant.views)
    real = [np.asarray(variant.images("val", v)[:PARITY_IMAGES]) for v in views]
    images = torch.from_numpy(np.concatenate(real)).float().div(255.0).unsqueeze(1)
    noise = torch.rand(PARITY_RANDOM, 1, size, size, generator=torch.Generator().manual_seed(0))
    return torch.cat([images, noise])


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The state dict as safetensors (loads without pickle), written atomically with the umask's mode."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))  # save_file alone leaves mode 0600


def batch_dim():
    """The dynamic batch dimension of model.pt2 and model.onnx (any batch of at least one image)."""
    return torch.export.Dim("batch", min=1)


def save_pt2(model: torch.nn.Module, samples: torch.Tensor, path: Path) -> torch.export.ExportedProgram:
    """``torch.export`` of the eval-mode network with a dynamic batch, saved with ``torch.export.save``; returns
    the program (``save_onnx`` converts the same graph instead of tracing the network again).

    Loads without fsweep: ``torch.export.load(path).module()(x)``; the STN's affine grid and adaptive
    pooling are exported as plain aten ops.
    """
    with torch.no_grad():
        program = torch.export.export(model.eval(), (samples[:2],), dynamic_shapes=({0: batch_dim()},))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a file object: torch.export.save logs a warning for a name not ending .pt2
            torch.export.save(program, handle)

    atomic_write(path, write)
    return program


def save_torchscript(model: torch.nn.Module, samples: torch.Tensor, path: Path) -> None:
    """torch.jit.trace of the eval-mode network; PyTorch's deprecation warning of torch.jit is left to show."""
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), samples[:2])
    traced.save(str(path))


def save_onnx(model: torch.nn.Module, samples: torch.Tensor, path: Path,
              program: torch.export.ExportedProgram | None = None) -> dict:
    """ONNX with a dynamic batch axis through the current exporter (``dynamo=True``); returns how it was written.

    ``program``: the network's ``torch.export`` program (``save_pt2``'s), converted as it is, so model.pt2 and
    the ONNX file come from one graph and the network is traced once; without it the exporter traces ``model``.

    ``{"exporter": "dynamo" or "legacy", "fallback_reason": None or one line}``. Where the current exporter
    cannot express the network, the legacy TorchScript-based exporter writes it, with one line on stderr
    saying why (its own deprecation warning is not hidden); a network neither can export is a FsweepError.
    """
    # a program carries its own dynamic batch; a module is traced with one
    source, dynamic_shapes = (model.eval(), ({0: batch_dim()},)) if program is None else (program, None)
    try:
        torch.onnx.export(
            source, (samples[:2],), str(path), dynamo=True, external_data=False, opset_version=ONNX_OPSET,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], dynamic_shapes=dynamic_shapes, verbose=False,
        )
        return {"exporter": "dynamo", "fallback_reason": None}
    except Exception as exc:  # the exporter raises many types; the operator named in the message is what matters
        path.unlink(missing_ok=True)
        reason = f"the current ONNX exporter cannot express this network ({one_line(exc)})"
    print(f"{path.parent.name}/{path.name}: {reason}; using the legacy TorchScript-based exporter", file=sys.stderr)
    size, stn = samples.shape[-1], getattr(model, "stn", None)
    if stn is not None and size % stn.loc_size:  # the legacy exporter pools only with a whole pooling window
        raise FsweepError(f"{path.parent.name}: the STN pools its {size}-px input to {stn.loc_size} px, which the "
                          f"legacy ONNX exporter cannot express; train with data.size a multiple of "
                          f"{stn.loc_size} (e.g. 64, 512)")
    try:
        torch.onnx.export(
            model.eval(), (samples[:2],), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        )
    except Exception as exc:  # as above
        path.unlink(missing_ok=True)
        raise FsweepError(f"{path.parent.name}: ONNX export failed ({one_line(exc)})") from None
    return {"exporter": "legacy", "fallback_reason": reason}


def one_line(exc: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}"


def write_onnx_metadata(path: Path, values: dict) -> None:
    """Set ``values`` (``ONNX_METADATA`` keys, strings) as the ONNX file's metadata_props, rewritten atomically."""
    import onnx

    assert set(values) == set(ONNX_METADATA), sorted(set(values) ^ set(ONNX_METADATA))
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key in ONNX_METADATA:
        graph.metadata_props.add(key=key, value=str(values[key]))
    atomic_write(path, lambda tmp: onnx.save(graph, str(tmp)))


def check_parity(model: torch.nn.Module, samples: torch.Tensor, folder: Path, view: str) -> dict:
    """Max |logit difference| of ONNX Runtime (each provider chain predict may use), model.pt2 and TorchScript
    (when written) against PyTorch.

    PyTorch, model.pt2 and TorchScript run in true fp32 (``fsmodels.precision.true_fp32``: on a GPU, TF32
    would be the reference's own error). ONNX Runtime runs once per chain of ``fsweep.predict.provider_chains``,
    with predict's provider options (CUDA without TF32): the sessions predict would open here. A chain whose
    first provider does not come up is an error, not a pass. FsweepError above the tolerance.
    """
    import onnxruntime as ort

    from fsmodels.precision import true_fp32
    from fsweep.predict import provider_chains, session_providers

    with torch.no_grad(), true_fp32():
        expected = model.eval()(samples).numpy()
        exported = torch.export.load(str(folder / PT2_FILE)).module()(samples).numpy()
        scripted = None
        if (folder / TORCHSCRIPT_FILE).is_file():
            scripted = torch.jit.load(str(folder / TORCHSCRIPT_FILE))(samples).numpy()
    per_provider = {}
    for chain in provider_chains(ort.get_available_providers()):
        session = ort.InferenceSession(str(folder / ONNX_FILE), providers=session_providers(chain))
        if session.get_providers()[0] != chain[0]:  # ONNX Runtime falls back quietly when a provider cannot start
            raise FsweepError(f"{view}: ONNX Runtime lists {chain[0]} but could not start it "
                              f"(got {session.get_providers()}); export refused")
        out = session.run(None, {ONNX_INPUT: samples.numpy()})[0]
        per_provider[chain[0]] = float(np.abs(out - expected).max())
    diffs = {**{f"onnx[{name}]": diff for name, diff in per_provider.items()},
             "model.pt2": float(np.abs(exported - expected).max())}
    if scripted is not None:
        diffs["TorchScript"] = float(np.abs(scripted - expected).max())
    for name, diff in diffs.items():
        if not diff <= PARITY_TOLERANCE:  # `not <=` also catches nan
            engine = f"ONNX Runtime ({name[5:-1]})" if name.startswith("onnx[") else name
            raise FsweepError(f"{view}: {engine} and PyTorch logits differ by {diff:.2e} > {PARITY_TOLERANCE:g} "
                              f"on {len(samples)} sample inputs; export refused")
    return {"onnx_max_abs_diff": max(per_provider.values()), "onnx_providers": per_provider,
            "pt2_max_abs_diff": diffs["model.pt2"], "torchscript_max_abs_diff": diffs.get("TorchScript"),
            "reference": "PyTorch fp32, TF32 off", "samples": int(len(samples)), "tolerance": PARITY_TOLERANCE,
            "compared": "logit"}


def data_fingerprint(models: dict) -> dict:
    """The training data's identity as the winners' store variant recorded it when built (DATASET may have changed)."""
    data = next(iter(models.values()))["data"]
    if not data.get("fingerprint"):
        raise FsweepError(f"store variant {data['variant']}: records no data fingerprint (built by an older fsweep); "
                          "rebuild the store and re-run the sweep")
    return data


def package_versions() -> dict:
    """Installed versions of the packages that shape the numbers (None when absent)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
