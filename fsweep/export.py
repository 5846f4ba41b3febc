"""Export a sweep's winners as a self-contained MODEL_DIR (DESIGN §4.6).

One model per winning view (``winners.json``: left and right when the sweep spans
both, ``both`` for a two-view model). Layout::

    MODEL_DIR/model_card.json            recipe, metrics, versions, sha256 of every file below
    MODEL_DIR/roi/best.pt, metrics.json  the ROI detector (metrics.json gives its input size)
    MODEL_DIR/<view>/weights.safetensors the best epoch's state dict
    MODEL_DIR/<view>/model.torchscript.pt torch.jit.trace of the same network
    MODEL_DIR/<view>/model.onnx          opset 20 (AffineGrid + GridSample: the STN is in the graph),
                                         input ``image`` float32 (B, 1, S, S) = uint8 / 255, output ``logit`` (B,);
                                         metadata_props: threshold, input_size, recipe_sha256 (``ONNX_METADATA``)

The card's ``preprocessing`` entry is the whole recipe in words and numbers
(``fsweep.modelcard.recipe_card``); its hash is in the ONNX file too, so a graph and a
card can be matched. At export, ONNX Runtime (under every execution provider that
``fsweep predict`` may pick on this machine) and TorchScript are compared with PyTorch in
true fp32 (TF32 off) on the store's validation images of the view plus random inputs; a
difference above ``PARITY_TOLERANCE`` refuses the export. The directory is assembled under
a temporary name and renamed, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import platform
import shutil
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
PARITY_TOLERANCE = 1e-4  # max |logit difference| between PyTorch and ONNX Runtime / TorchScript
PARITY_IMAGES = 8  # real validation images per view in the parity batch (plus PARITY_RANDOM random ones)
PARITY_RANDOM = 2
ONNX_METADATA = ("threshold", "threshold_chosen_on", "input_size", "recipe_sha256", "card_format", "view",
                 "backbone")  # metadata_props of model.onnx, every value a string (ONNX's rule)
PACKAGES = ("torch", "timm", "onnx", "onnxruntime", "opencv-python", "pydicom", "ultralytics", "numpy",
            "safetensors", "ray", "fsweep")  # versions recorded in the card


def export_experiment(experiment: str | Path, out: str | Path) -> Path:
    """Export each view's winner of ``experiment`` (path or storage URI) into MODEL_DIR ``out``; returns ``out``."""
    from cluster.storage import is_uri

    experiment = str(experiment) if is_uri(experiment) else str(Path(experiment).resolve())
    out = Path(out).resolve()
    winners = read_winners(experiment)
    if out.exists() and any(out.iterdir()):
        raise FsweepError(f"{out}: exists and is not empty; choose another --out or remove it")
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        card = build_card(experiment, winners, tmp)
        # json.dumps writes float nan as a bare NaN (not JSON) and never asks `default` about it: json_safe first
        (tmp / CARD).write_text(json.dumps(json_safe(python_values(card)), indent=2))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for view, model in card["models"].items():
        print(f"exported {view}: {model['backbone']} trial {model['trial_id']} "
              f"(ONNX parity max |diff| {model['parity']['onnx_max_abs_diff']:.1e}) -> {out / view}")
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


def build_card(experiment: str, winners: dict, model_dir: Path) -> dict:
    """Export each winner into ``model_dir`` and return the model card (sha256 of every file last)."""
    from fsmodels.train import load_trial_model

    models, detector, source = {}, None, None
    for view, winner in sorted(winners.items()):
        checkpoint = locate_checkpoint(experiment, winner["checkpoint"])
        model, cfg = load_trial_model(checkpoint)
        roi = winner_detector(cfg, checkpoint)
        if detector is None:
            detector, source = copy_detector(roi, model_dir), roi
        elif roi != source:  # one detector per MODEL_DIR (predict crops every input with it)
            raise FsweepError(f"{checkpoint}: this winner's crops came from the detector {roi}, another view's from "
                              f"{source} (winners of different folds); a MODEL_DIR holds one detector")
        models[view] = export_view(model, cfg, view, winner, checkpoint, model_dir, detector)
    card = {
        "format": CARD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "experiment": experiment,
        "views": sorted({v for m in models.values() for v in m["views"]}),
        "models": models,
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


def copy_detector(roi: str, model_dir: Path) -> dict | None:
    """Copy the ROI detector's files into ``model_dir/roi``; its recipe entry (None without a detector)."""
    if is_off(roi):
        return None
    source = Path(roi)
    (model_dir / ROI_DIR).mkdir()
    for name in ROI_FILES:
        if not (source / name).is_file():
            raise FsweepError(f"{source / name}: the ROI detector the winner was trained with is missing")
        shutil.copy2(source / name, model_dir / ROI_DIR / name)
    trained = json.loads((source / "metrics.json").read_text())
    return {"dir": ROI_DIR, "sha256": file_sha256(model_dir / ROI_DIR / "best.pt"), "imgsz": trained.get("imgsz"),
            "map50": trained.get("map50")}


def export_view(model, cfg, view: str, winner: dict, checkpoint: Path, model_dir: Path, detector: dict | None) -> dict:
    """Write one view's weights, TorchScript and ONNX; check parity; return its card entry."""
    from fsmodels.checkpoint import load_state, recorded_variant
    from fsmodels.train import trial_params, validation_threshold
    from preprocessing.recipe import CODE_VERSION
    from preprocessing.variant import open_variant

    params = trial_params(cfg)
    state = load_state(checkpoint)
    recorded = recorded_variant(state)
    variant = open_variant(cfg.data.store, recorded["key"], expected=recorded["manifest"])  # never a recomputed key
    trained_on = variant.meta.get("detector_sha256")
    if detector is not None and trained_on != detector["sha256"]:
        raise FsweepError(f"{winner_detector(cfg, checkpoint)}/best.pt: changed since the store variant was built "
                          f"(sha256 {detector['sha256'][:12]} != {str(trained_on)[:12]}); rebuild and re-run the sweep")
    folder = model_dir / view
    folder.mkdir()
    spec = variant.spec
    recipe = recipe_card(spec.he, spec.size, spec.aspect, spec.margin, detector)
    threshold = validation_threshold(state)
    samples = parity_inputs(variant, view, spec.size)
    save_weights(model, folder / WEIGHTS_FILE)
    save_torchscript(model, samples, folder / TORCHSCRIPT_FILE)
    save_onnx(model, samples, folder / ONNX_FILE)
    write_onnx_metadata(folder / ONNX_FILE, {
        "threshold": repr(threshold), "threshold_chosen_on": "validation", "input_size": str(spec.size),
        "recipe_sha256": recipe["recipe_sha256"], "card_format": CARD_FORMAT, "view": view,
        "backbone": params.backbone})
    parity = check_parity(model, samples, folder, view)
    return {
        "trial_id": winner["trial_id"],
        "checkpoint": str(checkpoint),
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
        "metrics": card_metrics(validation_metrics(checkpoint), winner.get("test")),
        # did it learn: the best epoch's training AUC and the sweep's plain-words warnings (search.select.fit_warnings)
        "fit": {"train_auc": (winner.get("train") or {}).get("auc"), "warnings": winner.get("warnings", [])},
        "files": {"onnx": f"{view}/{ONNX_FILE}", "torchscript": f"{view}/{TORCHSCRIPT_FILE}",
                  "weights": f"{view}/{WEIGHTS_FILE}"},
        "parity": parity,
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


def save_torchscript(model: torch.nn.Module, samples: torch.Tensor, path: Path) -> None:
    """torch.jit.trace of the eval-mode network (the STN's affine grid traces as plain ops)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about python scalars in timm/STN code
        traced = torch.jit.trace(model.eval(), samples[:2])
    traced.save(str(path))


def save_onnx(model: torch.nn.Module, samples: torch.Tensor, path: Path) -> None:
    """ONNX with a dynamic batch axis; a one-line FsweepError when an operator cannot be exported."""
    size, stn = samples.shape[-1], getattr(model, "stn", None)
    if stn is not None and size % stn.loc_size:  # adaptive pooling exports only with a whole pooling window
        raise FsweepError(f"{path.parent.name}: the STN pools its {size}-px input to {stn.loc_size} px, which ONNX "
                          f"cannot express; train with data.size a multiple of {stn.loc_size} (e.g. 64, 512)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model.eval(), (samples[:2],), str(path), dynamo=False, opset_version=ONNX_OPSET,
                input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            )
        except Exception as exc:  # the exporter raises many types; the operator named in the message is what matters
            first = str(exc).strip().splitlines()[0][:200]
            raise FsweepError(f"{path.parent.name}: ONNX export failed ({type(exc).__name__}: {first})") from None


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
    """Max |logit difference| of ONNX Runtime (each provider chain predict may use) and TorchScript against PyTorch.

    PyTorch and TorchScript run in true fp32 (``fsmodels.precision.true_fp32``: on a GPU, TF32 would be the
    reference's own error). ONNX Runtime runs once per chain of ``fsweep.predict.provider_chains``, with
    predict's provider options (CUDA without TF32): the sessions predict would open here. A chain whose first
    provider does not come up is an error, not a pass.
    FsweepError above the tolerance.
    """
    import onnxruntime as ort

    from fsmodels.precision import true_fp32
    from fsweep.predict import provider_chains, session_providers

    with torch.no_grad(), warnings.catch_warnings(), true_fp32():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        expected = model.eval()(samples).numpy()
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
             "torchscript": float(np.abs(scripted - expected).max())}
    for name, diff in diffs.items():
        if not diff <= PARITY_TOLERANCE:  # `not <=` also catches nan
            engine = f"ONNX Runtime ({name[5:-1]})" if name.startswith("onnx") else "TorchScript"
            raise FsweepError(f"{view}: {engine} and PyTorch logits differ by {diff:.2e} > {PARITY_TOLERANCE:g} "
                              f"on {len(samples)} sample inputs; export refused")
    return {"onnx_max_abs_diff": max(per_provider.values()), "onnx_providers": per_provider,
            "torchscript_max_abs_diff": diffs["torchscript"], "reference": "PyTorch fp32, TF32 off",
            "samples": int(len(samples)), "tolerance": PARITY_TOLERANCE, "compared": "logit"}


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
