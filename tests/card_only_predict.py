"""Predict with an exported MODEL_DIR from its model card alone: the preprocessing written again, no fsweep.

What a user of ``fsweep export`` would write with numpy, OpenCV, pydicom (DICOM only)
and onnxruntime, reading every parameter and rule from ``model_card.json``
(``models.<view>.preprocessing``: decode, detect, crop, he, aspect, resize, scale); the ROI
detector is ``roi/detector.onnx`` run by onnxruntime with the card's letterbox and output
decoding (no ultralytics, no torch). It imports nothing of fsweep; ``tests/test_export.py``
runs it in a process where fsweep cannot be imported and compares its probabilities with
``fsweep predict``'s.

Usage: ``python card_only_predict.py MODEL_DIR VIEW=IMAGE ...``; prints one JSON object
``{"probabilities": [...], "boxes": [...], "inputs_sha256": [...], "heavy_modules": [...]}`` (the sha256 of
each S x S uint8 network input, in the order of the arguments; which of torch, ultralytics, timm got imported).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort


def to_8bit(values: np.ndarray) -> np.ndarray:
    """decode.bit_depth: uint8 kept, anything else from its own min..max onto 0..255, numpy rounding."""
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def linear_window(values: np.ndarray, ds) -> np.ndarray:
    """decode.dicom: the DICOM LINEAR window function (PS3.3 C.11.2.1.2.1), output range 0..2^BitsStored - 1."""
    center, width = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1
    y_min, y_max = 0.0, 2.0 ** int(ds.BitsStored) - 1  # unsigned stored values
    if "RescaleSlope" in ds:  # the range follows the rescale
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    values = values.astype(np.float64)
    below, above = values <= center - width / 2, values > center + width / 2
    out = ((values - center) / width + 0.5) * (y_max - y_min) + y_min
    return np.where(below, y_min, np.where(above, y_max, out))


def decode(path: Path) -> np.ndarray:
    """The card's decode step for PNG/JPEG/TIFF and uncompressed grey DICOM (MONOCHROME1/2)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        ds = pydicom.dcmread(path)
        values = ds.pixel_array
        if "RescaleSlope" in ds:
            values = values * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if "WindowCenter" in ds:
            values = linear_window(values, ds)
        grey = to_8bit(values)
        return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey
    values = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if values.ndim == 3:
        values = cv2.cvtColor(values, cv2.COLOR_BGR2GRAY if values.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    return to_8bit(values)


def letterbox(img: np.ndarray, size: int, stride: int, pad: int = 114) -> tuple[np.ndarray, int, int]:
    """The card's detect.letterbox: (1, 3, H, W) float32 (the minimum rectangle) and the scaled (new_h, new_w)."""
    h, w = img.shape
    r = min(size / h, size / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    if (new_w, new_h) != (w, h):
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_w, pad_h = (size - new_w) % stride, (size - new_h) % stride
    left, right = round(pad_w / 2 - 0.1), round(pad_w / 2 + 0.1)
    top, bottom = round(pad_h / 2 - 0.1), round(pad_h / 2 + 0.1)
    canvas = np.full((new_h + top + bottom, new_w + left + right, 3), pad, np.uint8)
    canvas[top:top + new_h, left:left + new_w] = rgb
    return canvas.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255), new_h, new_w


def detect(session, step: dict, img: np.ndarray) -> tuple[float, float, float, float]:
    """The card's detect step: the highest-scoring box above the threshold, or the whole image."""
    height, width = img.shape
    whole = (0.0, 0.0, float(width), float(height))
    if session is None:
        return whole
    x, new_h, new_w = letterbox(img, step["input_size"], step["stride"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0][0]  # (4 + classes, anchors)
    scores = out[4:].max(axis=0)
    if not (scores > step["confidence_threshold"]).any():
        return whole
    best = int(np.argmax(np.where(scores > step["confidence_threshold"], scores, -np.inf)))
    cx, cy, bw, bh = out[:4, best]
    half_w, half_h = bw / np.float32(2), bh / np.float32(2)
    box = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], np.float32)
    box[[0, 2]] -= round((x.shape[3] - new_w) / 2 - 0.1)
    box[[1, 3]] -= round((x.shape[2] - new_h) / 2 - 0.1)
    box[[0, 2]] = np.clip(box[[0, 2]] / np.float32(new_w / width), 0, width)
    box[[1, 3]] = np.clip(box[[1, 3]] / np.float32(new_h / height), 0, height)
    return tuple(float(v) for v in box)


def crop(img: np.ndarray, box, margin: float) -> np.ndarray:
    """The card's crop step: grow by the margin, round outwards, clip."""
    height, width = img.shape
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(math.floor(x0 - dx), 0), max(math.floor(y0 - dy), 0)
    right, bottom = min(math.ceil(x1 + dx), width), min(math.ceil(y1 + dy), height)
    return np.ascontiguousarray(img[top:bottom, left:right])


def equalize(img: np.ndarray, step: dict) -> np.ndarray:
    """The card's he step: off, the paper's eq. 1-4 in exact integers, or OpenCV CLAHE."""
    if step["mode"] == "off":
        return img
    if step["mode"] == "global":
        cumulative = np.cumsum(np.bincount(img.ravel(), minlength=256)).astype(np.int64)
        n = img.size
        lut = ((2 * cumulative * 255 + n) // (2 * n)).astype(np.uint8)
        return lut[img]
    raise SystemExit(f"he mode {step['mode']!r}: not re-implemented here")


def square(img: np.ndarray, aspect: str, size: int) -> np.ndarray:
    """The card's aspect and resize steps."""
    if aspect == "pad":
        height, width = img.shape
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        padded = np.zeros((side, side), np.uint8)
        padded[top:top + height, left:left + width] = img
        img = padded
    interpolation = cv2.INTER_AREA if max(img.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)


def recipe_hash(recipe: dict) -> str:
    """The card's recipe_sha256: canonical JSON of the steps."""
    steps = {k: v for k, v in recipe.items() if k != "recipe_sha256"}
    return hashlib.sha256(json.dumps(steps, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def main(model_dir: Path, requests: list[str]) -> dict:
    card = json.loads((model_dir / "model_card.json").read_text())
    for name, digest in card["sha256"].items():
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest, name
    probabilities, boxes, digests, detectors = [], [], [], {}
    for request in requests:
        view, image = request.split("=", 1)
        model = card["models"][view] if view in card["models"] else card["models"]["both"]
        recipe = model["preprocessing"]
        assert recipe_hash(recipe) == recipe["recipe_sha256"]
        session = ort.InferenceSession(str(model_dir / model["files"]["onnx"]), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map  # the ONNX file's metadata_props
        assert meta["recipe_sha256"] == recipe["recipe_sha256"]
        assert int(meta["input_size"]) == recipe["resize"]["size"]
        assert float(meta["threshold"]) == model["operating_threshold"]["value"]
        step = recipe["detect"]
        if step and step["weights"] not in detectors:
            detectors[step["weights"]] = ort.InferenceSession(str(model_dir / step["weights"]),
                                                              providers=["CPUExecutionProvider"])
        img = decode(Path(image))
        box = detect(detectors[step["weights"]] if step else None, step, img)
        array = square(equalize(crop(img, box, recipe["crop"]["margin"]), recipe["he"]),
                       recipe["aspect"]["mode"], recipe["resize"]["size"])
        x = array[None, None].astype(np.float32) / np.float32(recipe["scale"]["divide_by"])
        logit = float(session.run(None, {model["network"]["input"]: x})[0][0])
        probabilities.append(1.0 / (1.0 + math.exp(-logit)))
        boxes.append(box)
        digests.append(hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())
    heavy = sorted(name for name in ("torch", "ultralytics", "timm") if name in sys.modules)
    return {"probabilities": probabilities, "boxes": boxes, "inputs_sha256": digests, "heavy_modules": heavy}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:])))
