"""Run an exported model (``fsweep export``) on new radiographs: no Ray, no training code.

Inputs are image files (PNG, JPEG, TIFF, DICOM), folders of them (searched
recursively) or manifests (CSV/Parquet with an ``image`` column and, optionally,
``view``; paths relative to the manifest). Each image's view comes from its
manifest row, else the DICOM ImageLaterality / Laterality tag, else ``--view``;
with none, predict stops instead of guessing. Each image goes through exactly the
training recipe written in the model card's ``preprocessing`` entry (decode, detect,
crop, HE, aspect, resize, scale: ``preprocessing.decode.decode_image`` then
``preprocessing.recipe.preprocess_decoded``, with the parameters read from the card);
the ROI detector runs from ``roi/detector.onnx`` in ONNX Runtime with numpy's letterbox
and decoding (``preprocessing.detector_onnx``), and the network (STN included) in ONNX
Runtime on the first provider of ``PROVIDERS`` that this machine has. Nothing here imports
torch, ultralytics, timm or Ray: a deployment needs only ``requirements-predict.txt``.
Grad-CAM (``--cam``) needs gradients, so torch and the training code; without them it
stops with one line that says what to install.

Before anything is loaded, every file of MODEL_DIR is checked against the card's
sha256; weights are read only through safetensors (for ``--cam``).
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cluster.errors import FsweepError
from fsweep.modelcard import CARD, CARD_FORMAT, ONNX_INPUT, detector_dir, recipe_spec
from preprocessing.files import file_sha256
from preprocessing.vocab import ALL_VIEWS, LABEL_NAMES, VIEWS, ConfigError, view_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}
MANIFEST_SUFFIXES = {".csv", ".parquet", ".pq"}
BATCH = 16  # images per ONNX Runtime call
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # ONNX Runtime providers predict uses, best first
# True fp32 on the GPU: ONNX Runtime's CUDA provider lets Ampere and newer GPUs run fp32 convolutions and matmuls
# in TF32 unless told not to (its use_tf32 option), about 1e-3 relative error against the card's fp32 metrics
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}
COLUMNS = ["image", "view", "model", "logit", "probability", "label", "prediction", "threshold",
           "x0", "y0", "x1", "y1", "fallback"]  # predictions table, in this order (+ cam with --cam)


@dataclass(frozen=True)
class Item:
    """One input image and the view it was given by a manifest (None: not given)."""

    path: Path  # the image file
    view: str | None  # left / right, or another view name, from a manifest row
    where: str = ""  # the manifest and row that gave the view


def predict(model_dir, inputs, out=None, cam_dir=None, view: str | None = None) -> pd.DataFrame:
    """Predict every input image with MODEL_DIR; write ``out`` (CSV) and Grad-CAM PNGs in ``cam_dir`` if given.

    Returns one row per image: image, view, model, logit (the network's output), probability, label (1 abnormal,
    0 normal at the card's threshold), prediction, threshold, ROI box x0..y1 (raw pixels) and fallback (no box
    found: full frame).
    """
    model_dir = Path(model_dir)
    if cam_dir is not None:
        require_cam_packages()
    card = load_card(model_dir)
    items = collect_inputs([Path(p) for p in inputs])
    default = normalise_view(view, "--view") if view else None
    for given, where in [(item.view, item.where) for item in items] + [(default, "--view")]:
        if given is not None and given not in card["views"]:  # a view no model of this card was trained on
            raise FsweepError(f"{where}: unknown view {given!r} (this model's views: {', '.join(card['views'])})")
    views = [resolve_view(item, default, card) for item in items]
    keys = [model_key(card, v, item.path, model_dir) for item, v in zip(items, views)]
    rows = [None] * len(items)
    detector = load_detector(model_dir, card)
    cam_names: set[str] = set()  # Grad-CAM file names used by this call (two inputs may share a stem)
    for key in sorted(set(keys)):
        picked = [i for i, k in enumerate(keys) if k == key]
        scored = predict_with(model_dir, card, key, [items[i] for i in picked], detector, cam_dir, cam_names)
        for i, row in zip(picked, scored):
            rows[i] = {"image": str(items[i].path), "view": views[i], "model": key, **row}
    table = pd.DataFrame(rows, columns=COLUMNS + (["cam"] if cam_dir else []))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    return table


# --- the model directory ---------------------------------------------------------------

def load_card(model_dir: Path) -> dict:
    """The model card, after checking every listed file's sha256 (missing, truncated or changed: FsweepError)."""
    path = model_dir / CARD
    if not path.is_file():
        raise FsweepError(f"{model_dir}: no {CARD} (not a MODEL_DIR written by `fsweep export`)")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FsweepError(f"{path}: unreadable model card ({exc})") from None
    if isinstance(card, dict) and str(card.get("format", "")).startswith("fsweep-model-") \
            and card["format"] != CARD_FORMAT:
        raise FsweepError(f"{path}: a {card['format']} model card; this fsweep reads {CARD_FORMAT}: "
                          "re-export the model with `fsweep export`")
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or not card.get("sha256"):
        raise FsweepError(f"{path}: not an {CARD_FORMAT} model card")
    verify_files(model_dir, card["sha256"])
    return card


def verify_files(model_dir: Path, checksums: dict) -> None:
    """Every file the card lists exists and has its recorded sha256."""
    for name, expected in checksums.items():
        path = model_dir / name
        if not path.is_file():
            raise FsweepError(f"{path}: missing (listed in {CARD}); re-export the model")
        if file_sha256(path) != expected:
            raise FsweepError(f"{path}: sha256 differs from {CARD} (tampered or truncated); re-export the model")


def load_detector(model_dir: Path, card: dict):
    """The exported ROI detector in ONNX when any model uses one (its sha256 was checked with the card)."""
    detectors = [m["preprocessing"]["detect"] for m in card["models"].values() if m["preprocessing"]["detect"]]
    if not detectors:
        return None
    from preprocessing.detector_onnx import OnnxRoiDetector

    step = detectors[0]  # one detector per MODEL_DIR (export writes one)
    detector = OnnxRoiDetector(model_dir / detector_dir(step), confidence=float(step["confidence_threshold"]))
    if detector.size != int(step["input_size"]):
        raise FsweepError(f"{detector.path}: input {detector.size} px, but {CARD} says {step['input_size']}; "
                          "re-export the model")
    return detector


def require_cam_packages() -> None:
    """FsweepError in one line when Grad-CAM's packages (torch, timm: it needs gradients) are not installed."""
    missing = [name for name in ("torch", "timm", "safetensors") if importlib.util.find_spec(name) is None]
    if missing:
        raise FsweepError(f"--cam needs {', '.join(missing)} (Grad-CAM takes gradients of the PyTorch network): "
                          "install fsweep with its dependencies (`pip install .`, or `make setup` in its repository), "
                          "or predict without --cam")


def model_key(card: dict, view: str, path: Path, model_dir: Path) -> str:
    """The card's model for ``view``: the view's own model, else a two-view (``both``) model."""
    for key in (view, "both", ALL_VIEWS):
        if key in card["models"]:
            return key
    raise FsweepError(f"{path}: view {view}, but {model_dir} only has a model for {', '.join(card['views'])}")


# --- inputs and views ------------------------------------------------------------------

def collect_inputs(inputs: list[Path]) -> list[Item]:
    """Expand files, folders (recursive, sorted) and manifests into image items."""
    if not inputs:
        raise FsweepError("no INPUT given (image files, folders or a manifest)")
    items = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                raise FsweepError(f"{path}: no PNG, JPEG, TIFF or DICOM files in this folder")
            items += [Item(p, None) for p in found]
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            items += manifest_items(path)
        elif path.is_file():
            items.append(Item(path, None))
        else:
            raise FsweepError(f"{path}: no such file or folder")
    return items


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or an extensionless DICOM file (Part 10 magic bytes)."""
    from preprocessing.decode import is_dicom

    return path.suffix.lower() in IMAGE_SUFFIXES or (path.suffix == "" and is_dicom(path))


def manifest_items(path: Path) -> list[Item]:
    """Rows of a CSV/Parquet manifest: ``image`` (relative to the manifest) and optional ``view``."""
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() != ".csv" else pd.read_csv(path, dtype=str,
                                                                                          keep_default_na=False)
    except Exception as exc:  # pandas/pyarrow raise many types; the file and the type are what the user needs
        raise FsweepError(f"{path}: not a readable manifest ({type(exc).__name__})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if "image" not in frame.columns:
        raise FsweepError(f"{path}: manifest has no `image` column")
    items = []
    for number, row in enumerate(frame.to_dict("records"), start=1):
        given = str(row.get("view") or "").strip()
        where = f"{path} row {number}"
        items.append(Item(path.parent / str(row["image"]).strip(), normalise_view(given, where) if given else None,
                          where))
    return items


def normalise_view(value: str, where: str) -> str:
    """left / right from left, right, L, R (any case); any other view name as ingest spells it."""
    try:
        return view_name(value)
    except ConfigError as exc:
        raise FsweepError(f"{where}: unknown view {value!r} ({exc})") from None


def resolve_view(item: Item, default: str | None, card: dict | None = None) -> str:
    """Manifest view; else a card whose model covers every view (``all``) or whose data set had one view
    takes it (a DICOM laterality there would name no model); else DICOM laterality, else ``--view``;
    FsweepError when none says."""
    from preprocessing.decode import dicom_laterality

    view = item.view
    if view is None and card is not None and ALL_VIEWS in card["models"]:
        view = ALL_VIEWS  # a model over every view needs no view to pick it
    elif view is None and card is not None and len(card["views"]) == 1 and card["views"][0] not in VIEWS:
        view = card["views"][0]  # a single-view data set: there is nothing to choose
    view = view or dicom_laterality(item.path) or default
    if view is None:
        raise FsweepError(f"{item.path}: no view (no manifest `view`, no DICOM ImageLaterality); "
                          "pass --view left or --view right")
    return view


# --- running one model -----------------------------------------------------------------

def predict_with(model_dir: Path, card: dict, key: str, items: list[Item], detector, cam_dir,
                 cam_names: set[str]) -> list[dict]:
    """Preprocess ``items`` with model ``key``'s recipe and score them in ONNX Runtime batches."""
    from preprocessing.decode import decode_image
    from preprocessing.recipe import VariantSpec, preprocess_decoded

    entry = card["models"][key]
    fields = recipe_spec(entry["preprocessing"])
    if fields["roi_dir"]:  # the card names it relative to MODEL_DIR
        fields["roi_dir"] = str(model_dir / fields["roi_dir"])
    spec = VariantSpec(**fields)
    session = onnx_session(model_dir / entry["files"]["onnx"])
    threshold = float(entry["operating_threshold"]["value"])
    named = entry.get("classes")  # cards of data sets with their own class names; older cards: the defaults
    classes = (named["negative"], named["positive"]) if named else LABEL_NAMES
    cam = cam_writer(model_dir, entry, Path(cam_dir), spec, threshold, cam_names) if cam_dir is not None else None
    rows = []
    for start in range(0, len(items), BATCH):
        arrays, found = [], []
        for item in items[start:start + BATCH]:
            img = decode_image(item.path)
            array, box, fallback = preprocess_decoded(img, spec, detector)
            arrays.append(array)
            found.append({**dict(zip(("x0", "y0", "x1", "y1"), (float(v) for v in box))), "fallback": bool(fallback)})
            if cam is not None:
                found[-1]["cam"] = cam(item.path, img, box, array)
        x = np.stack(arrays)[:, None].astype(np.float32) / np.float32(255.0)
        for row, logit in zip(found, session.run(None, {ONNX_INPUT: x})[0]):
            probability = float(1.0 / (1.0 + np.exp(-float(logit))))
            row.update(logit=float(logit), probability=probability, label=int(probability >= threshold),
                       prediction=classes[int(probability >= threshold)], threshold=threshold)
        rows += found
    return rows


def provider_chains(available) -> list[list[str]]:
    """Every provider list predict may open a session with, given ONNX Runtime's ``available`` providers.

    Predict asks for the ``PROVIDERS`` this machine has, best first; ONNX Runtime runs each node on the
    first of them that supports it and falls back to the next. So the first chain is predict's own session
    and each later one is the session predict opens where the providers before it are missing (CUDA without
    its libraries: the CPU chain). ``fsweep export`` checks parity under each.
    """
    wanted = [p for p in PROVIDERS if p in set(available)]
    return [wanted[i:] for i in range(len(wanted))]


def session_providers(chain: list[str]) -> list[tuple[str, dict]]:
    """``chain`` as ONNX Runtime's ``providers`` argument, each with its ``PROVIDER_OPTIONS``."""
    return [(name, dict(PROVIDER_OPTIONS.get(name, {}))) for name in chain]


def onnx_session(path: Path):
    """An ONNX Runtime session on the best available provider chain (CUDA, then CPU for what CUDA lacks)."""
    import onnxruntime as ort

    chain = provider_chains(ort.get_available_providers())[0]
    return ort.InferenceSession(str(path), providers=session_providers(chain))


def cam_writer(model_dir: Path, entry: dict, cam_dir: Path, spec, threshold: float, taken: set[str]):
    """A function writing one image's Grad-CAM over its ROI crop as PNG (the crop's size); returns the PNG path.

    The PyTorch network is rebuilt from the exported safetensors weights (Grad-CAM needs gradients).
    """
    import cv2

    from fsweep.cam import grad_cam, heat_to_crop, model_from_weights, overlay
    from preprocessing.roi import crop_box

    model = model_from_weights(model_dir / entry["files"]["weights"], entry["backbone"], entry["network"]["stn"])
    cam_dir.mkdir(parents=True, exist_ok=True)

    def write(path: Path, img: np.ndarray, box, array: np.ndarray) -> str:
        crop = crop_box(img, box, spec.margin)
        heat = heat_to_crop(grad_cam(model, array, threshold), crop.shape, spec.aspect)
        target = cam_dir / unique_name(f"{path.stem}_cam", taken)
        cv2.imwrite(str(target), overlay(heat, crop))
        return str(target)

    return write


def unique_name(stem: str, taken: set[str]) -> str:
    """``stem.png``, or ``stem_2.png``... when two inputs share a file name."""
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}.png"
    taken.add(name)
    return name
