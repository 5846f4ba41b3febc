"""The ROI detector in ONNX: written from ``best.pt`` by ultralytics, run with onnxruntime and numpy alone.

``export_detector`` writes ``ROI_DIR/detector.onnx`` with ultralytics' own ONNX export
(the fused network, raw head output, input ``(batch, 3, H, W)`` with H and W dynamic, and
ultralytics' metadata: ``imgsz``, ``stride``, ``end2end``), through torch's
current exporter (``torch.onnx.export(..., dynamo=True)``); when that exporter cannot
express the network, the legacy one is used and a line says why.

``OnnxRoiDetector`` runs it without torch or ultralytics and gives the box
``preprocessing.roi.RoiDetector`` gives: ultralytics' predict steps written again in
numpy (``letterbox``, ``decode_output``):

1. letterbox: grey -> 3-channel, scale by ``r = min(S / h, S / w)`` to
   ``(max(round(w r), 1), max(round(h r), 1))`` with ``cv2.INTER_LINEAR``, pad each side's
   ``pad = (S - new) mod stride`` with grey 114 (left/top ``round(pad / 2 - 0.1)``,
   right/bottom ``round(pad / 2 + 0.1)``): ultralytics predict's minimum rectangle
   (``rect=True``), so the input is S on the long side and the short side rounded up to a
   multiple of the stride; RGB, CHW, ``float32 / 255``;
2. output ``(1, 4 + classes, anchors)`` (cx, cy, w, h, class scores): the anchor whose best
   class score is highest among those ``> confidence_threshold`` (ultralytics' NMS keeps the
   highest-scoring box first, and ``max_det=1`` keeps only it); an end-to-end head's
   ``(1, N, 6)`` rows (x0, y0, x1, y1, score, class) the same way; none: no box (full frame);
3. box back to the image: minus the letterbox padding, divided by ``new / old`` per axis,
   clipped to the image, all in float32 as ultralytics computes it.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from cluster.errors import FsweepError
from preprocessing.files import file_sha256

DETECTOR_ONNX = "detector.onnx"  # beside best.pt in ROI_DIR
PAD_VALUE = 114  # ultralytics' letterbox grey
ONNX_EXPORTER = "torch.onnx.export(dynamo=True)"  # the exporter used unless it fails (then "legacy")


def letterbox(img: np.ndarray, size: int, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``img`` (2-D uint8) as the detector's input (1, 3, H, W) float32, and the (new_h, new_w) it was scaled to.

    ultralytics' predict letterboxes to the minimum rectangle (its ``rect=True`` default): each side is padded
    only by ``(size - new) mod stride``, so H and W are the scaled sides rounded up to a multiple of ``stride``.
    """
    height, width = img.shape[:2]
    ratio = min(size / height, size / width)
    new_w, new_h = max(round(width * ratio), 1), max(round(height * ratio), 1)
    bgr = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_GRAY2BGR)
    if (width, height) != (new_w, new_h):
        bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_w, pad_h = ((size - new_w) % stride) / 2, ((size - new_h) % stride) / 2
    top, bottom = round(pad_h - 0.1), round(pad_h + 0.1)
    left, right = round(pad_w - 0.1), round(pad_w + 0.1)
    bgr = cv2.copyMakeBorder(bgr, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    chw = np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1)[None])
    return chw.astype(np.float32) / np.float32(255), (new_h, new_w)


def decode_output(output: np.ndarray, conf: float, padded: tuple[int, ...], scaled: tuple[int, int],
                  shape: tuple[int, ...], end2end: bool = False):
    """The highest-scoring box ``((x0, y0, x1, y1), score)`` in pixels of an image of ``shape``, or None.

    ``output``: the detector's first output for one image; ``padded``: the shape of the letterboxed input
    (..., H, W); ``scaled``: (new_h, new_w) from ``letterbox``.
    """
    rows = np.asarray(output, dtype=np.float32)[0]
    if end2end:  # (N, 6): x0, y0, x1, y1, score, class
        boxes, scores = rows[:, :4], rows[:, 4]
    else:  # (4 + classes, anchors): cx, cy, w, h, one score per class
        scores = rows[4:].max(axis=0)
        centre, half = rows[:2].T, rows[2:4].T / np.float32(2)
        boxes = np.concatenate([centre - half, centre + half], axis=1)
    found = np.flatnonzero(scores > conf)  # ultralytics keeps candidates strictly above the threshold
    if found.size == 0:
        return None
    best = found[int(np.argmax(scores[found]))]
    box = boxes[best].astype(np.float32).copy()
    height, width = shape[:2]
    new_h, new_w = scaled
    pad_x, pad_y = round((padded[-1] - new_w) / 2 - 0.1), round((padded[-2] - new_h) / 2 - 0.1)
    box[[0, 2]] -= pad_x
    box[[1, 3]] -= pad_y
    box[[0, 2]] /= new_w / width
    box[[1, 3]] /= new_h / height
    box[[0, 2]] = box[[0, 2]].clip(0, width)
    box[[1, 3]] = box[[1, 3]].clip(0, height)
    return tuple(float(v) for v in box), float(scores[best])


class OnnxRoiDetector:
    """``ROI_DIR/detector.onnx`` on ONNX Runtime's CPU provider: the same ``detect`` as ``RoiDetector``, no torch."""

    def __init__(self, roi_dir: str | Path, confidence: float | None = None):
        import onnxruntime as ort

        from preprocessing.roi import CONF_THRESHOLD

        self.roi_dir = Path(roi_dir)
        self.path = self.roi_dir / DETECTOR_ONNX
        if not self.path.is_file():
            raise FsweepError(f"{self.path}: missing; re-export the model with `fsweep export` (it writes the "
                              "detector in ONNX)")
        self.confidence = CONF_THRESHOLD if confidence is None else confidence
        # the CPU always, as RoiDetector: the box must not depend on the machine's GPU
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types; the file and the first line are what matter
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FsweepError(f"{self.path}: not a loadable ONNX detector ({reason})") from None
        self.input_name = self.session.get_inputs()[0].name
        meta = self.session.get_modelmeta().custom_metadata_map  # ultralytics writes imgsz, stride, end2end
        try:
            self.size = max(int(v) for v in ast.literal_eval(meta["imgsz"]))
            self.stride = int(meta["stride"])
        except (KeyError, ValueError, TypeError, SyntaxError):
            raise FsweepError(f"{self.path}: no ultralytics imgsz/stride metadata; re-export the model with "
                              "`fsweep export`") from None
        self.end2end = meta.get("end2end", "False") == "True"
        self.sha256 = file_sha256(self.path)

    def detect(self, img: np.ndarray) -> tuple[tuple[float, float, float, float], float] | None:
        """Highest-confidence box ``((x0, y0, x1, y1), conf)`` in pixels of ``img`` (2-D uint8), or None."""
        x, scaled = letterbox(img, self.size, self.stride)
        output = self.session.run(None, {self.input_name: x})[0]
        return decode_output(output, self.confidence, x.shape, scaled, img.shape, self.end2end)


def export_detector(roi_dir: Path, imgsz: int) -> dict:
    """Write ``roi_dir/detector.onnx`` from ``roi_dir/best.pt`` at input size ``imgsz``; returns how it was exported.

    ``{"exporter": ..., "fallback_reason": None or one line, "input_size": S, "stride": ..., "seconds": ...}``.
    """
    import time

    from preprocessing.roi import _load_yolo

    weights = roi_dir / "best.pt"
    yolo = _load_yolo(str(weights))
    started = time.monotonic()
    used = {"exporter": ONNX_EXPORTER, "fallback_reason": None}
    with _current_exporter(used), _quiet_ultralytics_info():
        written = yolo.export(format="onnx", imgsz=imgsz, simplify=False, dynamic=True,
                              device="cpu", verbose=False)
    if not written or not Path(written).is_file():
        raise FsweepError(f"{weights}: ultralytics' ONNX export wrote nothing")
    Path(written).replace(roi_dir / DETECTOR_ONNX)
    detector = OnnxRoiDetector(roi_dir)
    return {**used, "input_size": detector.size, "stride": detector.stride,
            "seconds": round(time.monotonic() - started, 1)}


@contextlib.contextmanager
def _current_exporter(used: dict):
    """Make ultralytics' ONNX step use torch's current exporter (``dynamo=True``); legacy only where it fails.

    ultralytics 8.4 calls ``torch.onnx.export(..., dynamo=False)``, the deprecated TorchScript-based exporter,
    from ``ultralytics.utils.export.engine.torch2onnx``; everything else of its export (fusing, the head's
    export mode, the metadata) is kept by replacing that one function for the duration of the export.
    """
    import ultralytics.utils.export.engine as engine

    original = getattr(engine, "torch2onnx", None)
    if original is None:  # ultralytics moved it: its own choice of exporter runs
        reason = "this ultralytics has no utils.export.engine.torch2onnx to route through the current exporter"
        print(f"roi/{DETECTOR_ONNX}: {reason}; ultralytics exports it as it chooses", file=sys.stderr)
        used.update(exporter="ultralytics' own", fallback_reason=reason)
        yield
        return

    def torch2onnx(model, im, output_file, opset=14, input_names=None, output_names=None, dynamic=None):
        import torch

        try:
            # ultralytics names its dynamic axes per input (dynamic_axes); the current exporter takes them as
            # dynamic_shapes, one {axis: Dim} per positional input
            shapes = None
            if dynamic:
                shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in dynamic.get(name, {})}
                               for name in (input_names or ["images"]))
            torch.onnx.export(model, im, str(output_file), opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_shapes=shapes, dynamo=True, external_data=False,
                              verbose=False)
        except Exception as exc:  # the exporter raises many types; its first line names what it could not express
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            reason = f"the current ONNX exporter cannot express the detector ({type(exc).__name__}: {first})"
            print(f"roi/{DETECTOR_ONNX}: {reason}; using the legacy exporter", file=sys.stderr)
            used.update(exporter="legacy", fallback_reason=reason)
            return original(model, im, output_file, opset=opset, input_names=input_names,
                            output_names=output_names, dynamic=dynamic)
        return str(output_file)

    engine.torch2onnx = torch2onnx
    try:
        yield
    finally:
        engine.torch2onnx = original


@contextlib.contextmanager
def _quiet_ultralytics_info():
    """ultralytics' INFO lines (banner, "Predict: yolo predict ...") off during the export; warnings still show."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
