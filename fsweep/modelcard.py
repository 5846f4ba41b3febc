"""The exported MODEL_DIR's schema: file names, the model card's format and its preprocessing recipe.

A module of its own so that ``fsweep predict`` reads the schema without importing
export (which needs torch). The card's ``preprocessing`` entry is the recipe in
library-neutral words and numbers: each step says what it does to the pixels, with every
parameter, so that a user can reproduce the network's input without fsweep (the ROI
detector included: ``roi/detector.onnx`` with its letterbox and output decoding);
``fsweep predict`` reads its parameters from the same entry (``recipe_spec``).
"""
from __future__ import annotations

import hashlib
import json

CARD = "model_card.json"  # the model card, read first by predict
CARD_FORMAT = "fsweep-model-3"  # bump when the layout or the card's keys change (3: model.pt2, detector.onnx)
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"  # torch.export of the network (torch.export.load(path).module())
TORCHSCRIPT_FILE = "model.torchscript.pt"  # only with `fsweep export --torchscript` (deprecated by PyTorch)
WEIGHTS_FILE = "weights.safetensors"
ROI_DIR = "roi"  # the detector's directory inside MODEL_DIR
ROI_FILES = ("best.pt", "metrics.json")  # the detector as trained (what RoiDetector reads), copied beside its ONNX
RECIPE_STEPS = ("decode", "detect", "crop", "he", "aspect", "resize", "scale")  # the card's recipe, in order
ONNX_INPUT, ONNX_OUTPUT = "image", "logit"  # the graph's tensor names
THRESHOLD_RULE = ("Youden's J (the ROC point maximising sensitivity + specificity - 1) of the selected epoch's "
                  "validation scores; 0.5 when undefined (one class). Abnormal when probability >= threshold.")

DECODE = {
    "output": "one 2-D uint8 grey image, MONOCHROME2 (bone bright, air dark); multi-frame files are refused",
    "raster": "PNG, JPEG, TIFF read unchanged (8- or 16-bit depth kept until the bit-depth step; OpenCV "
              "IMREAD_UNCHANGED); colour becomes grey with the luma weights 0.299 R + 0.587 G + 0.114 B "
              "(OpenCV COLOR_BGR2GRAY / COLOR_BGRA2GRAY)",
    "dicom": "stored pixel values -> modality LUT (v * RescaleSlope + RescaleIntercept, or the Modality LUT "
             "Sequence) -> VOI: the VOI LUT Sequence if present, else the first WindowCenter/WindowWidth "
             "with the DICOM linear window function (PS3.3 C.11.2.1.2; VOILUTFunction SIGMOID or LINEAR_EXACT "
             "honoured), else unchanged; PALETTE COLOR goes through its palette, then the luma weights "
             "(pydicom's apply_modality_lut, apply_voi_lut, apply_color_lut do exactly this)",
    "bit_depth": "values that are still 8-bit unsigned integers here (8-bit PNG/JPEG/TIFF, 8-bit DICOM "
                 "without rescale or window) are kept as is; any other (16-bit, signed, float, rescaled or "
                 "windowed values) are mapped linearly from the image's own minimum..maximum onto 0..255: "
                 "v -> round((v - min) * (255 / (max - min))) in float64, rounding half to even (numpy.round); "
                 "a constant image becomes all 0",
    "monochrome1": "DICOM MONOCHROME1 is inverted after the bit-depth step: v -> 255 - v",
}
CROP_RULE = ("grow the box (x0, y0, x1, y1) by margin * (x1 - x0) left and right and margin * (y1 - y0) top and "
             "bottom, then round outwards and clip: left = max(floor(x0 - dx), 0), top = max(floor(y0 - dy), 0), "
             "right = min(ceil(x1 + dx), width), bottom = min(ceil(y1 + dy), height); the crop is rows "
             "top..bottom-1 and columns left..right-1 of the decoded image. No detector: the whole image")
HE_RULES = {
    "off": "none",
    "global": "the paper's eq. 1-4 on the crop: h(g) = number of pixels of grey g, p(g) = h(g) / (w * h), "
              "cdf(g) = sum over i <= g of p(i), y = round(cdf(g) * 255) rounding half up; in exact integers "
              "y = floor((2 * C(g) * 255 + n) / (2 * n)) with C(g) the count of pixels <= g and n = w * h "
              "(not OpenCV's equalizeHist, which also subtracts cdf of the darkest grey)",
}
ASPECT_RULES = {
    "stretch": "none: the crop is resized to size x size whatever its aspect ratio (the paper's plain resize)",
    "pad": "centre the crop on a black (0) square of side s = max(height, width): top = (s - height) // 2 and "
           "left = (s - width) // 2 rows/columns of 0 before it, the rest after it",
}
LETTERBOX_RULE = ("the decoded image (h, w) as 3 equal channels; r = min({size} / h, {size} / w); resize to "
                  "new_w = max(round(w * r), 1), new_h = max(round(h * r), 1) with OpenCV cv2.resize INTER_LINEAR "
                  "(skipped when the size is unchanged); pad with grey {pad} to the minimum rectangle (ultralytics "
                  "predict's rect=True): pad_w = ({size} - new_w) mod {stride}, pad_h = ({size} - new_h) mod "
                  "{stride}, left = round(pad_w / 2 - 0.1), right = round(pad_w / 2 + 0.1), top and bottom likewise "
                  "with pad_h (Python round: half to even), so the input is (1, 3, new_h + pad_h, new_w + pad_w); "
                  "channels RGB, layout CHW, float32(v) / float32(255)")
DETECTOR_OUTPUT_RULE = ("output 0 of shape (1, 4 + classes, anchors): per anchor cx, cy, w, h in letterboxed "
                        "pixels, then one score per class; score = the largest class score; the box is "
                        "(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2) in float32. A graph whose metadata "
                        "says end2end=True gives (1, N, 6) rows x0, y0, x1, y1, score, class instead")
RESIZE_RULE = ("resize the (padded) crop to size x size with OpenCV cv2.resize: interpolation INTER_AREA when its "
               "larger side exceeds size (shrinking: no aliasing), else INTER_LINEAR; both are OpenCV's pixel-centre "
               "conventions, so another library's 'area' or 'bilinear' resize does not give the same pixels")
SCALE_RULE = (f"x = float32(uint8 pixel) / float32(255), shape (batch, 1, size, size), input '{ONNX_INPUT}'; the "
              "ImageNet normalisation and the STN are inside the network. The output "
              f"'{ONNX_OUTPUT}' (batch,) gives probability = 1 / (1 + exp(-logit)) of abnormal")


def recipe_card(he: str, size: int, aspect: str, margin: float, detector: dict | None) -> dict:
    """The card's ``preprocessing`` entry: every step of ``RECIPE_STEPS`` with its parameters and rule, and its hash.

    ``detector``: ``{dir, sha256, onnx_sha256, input_size, stride, map50}`` of the exported ROI detector (``sha256``:
    its ``best.pt``), None without one.
    """
    from preprocessing.contrast import CLAHE_CLIP, CLAHE_TILES
    from preprocessing.detector_onnx import DETECTOR_ONNX, PAD_VALUE
    from preprocessing.roi import CONF_THRESHOLD, MAX_DET

    he_rule = HE_RULES.get(he) or (f"OpenCV CLAHE on the crop: cv2.createCLAHE(clipLimit={CLAHE_CLIP}, "
                                   f"tileGridSize={tuple(CLAHE_TILES)}).apply")
    detect = None
    if detector is not None:
        side, stride = detector["input_size"], detector["stride"]  # the detector's, not the network's size
        detect = {
            "weights": f"{detector['dir']}/{DETECTOR_ONNX}", "sha256": detector["onnx_sha256"],
            "library": "ONNX Runtime, CPU provider",
            "trained_weights": f"{detector['dir']}/best.pt", "trained_sha256": detector["sha256"],
            "input": f"float32 (1, 3, H, W), H and W at most {side} and multiples of {stride}, "
                     "the first input of the graph",
            "input_size": side, "stride": stride, "confidence_threshold": CONF_THRESHOLD,
            "max_detections": MAX_DET, "letterbox": LETTERBOX_RULE.format(size=side, pad=PAD_VALUE, stride=stride),
            "output": DETECTOR_OUTPUT_RULE,
            "box_rule": (f"the box with the highest score above {CONF_THRESHOLD} (score > {CONF_THRESHOLD}, as "
                         "ultralytics filters), taken back to the decoded image: subtract the letterbox's left and "
                         "top padding, divide x by new_w / w and y by new_h / h, clip to 0..w and 0..h (float32); "
                         "no score above it: the whole image (0, 0, width, height)"),
            "equivalent": (f"ultralytics YOLO(trained_weights).predict(image as 3-channel BGR, imgsz={side}, "
                           f"conf={CONF_THRESHOLD}, max_det={MAX_DET}, device='cpu'); export checked that both "
                           "give the same crop"),
            "map50": detector.get("map50"),
        }
    recipe = {
        "decode": DECODE,
        "detect": detect,
        "crop": {"margin": margin if detect else 0.0, "rule": CROP_RULE},
        "he": {"mode": he, "rule": he_rule},
        "aspect": {"mode": aspect, "rule": ASPECT_RULES[aspect]},
        "resize": {"size": size, "interpolation": "INTER_AREA when shrinking, else INTER_LINEAR", "rule": RESIZE_RULE},
        "scale": {"divide_by": 255, "dtype": "float32", "rule": SCALE_RULE},
    }
    return {**recipe, "recipe_sha256": recipe_sha256(recipe)}


def recipe_sha256(recipe: dict) -> str:
    """sha256 of the recipe steps as canonical JSON (sorted keys, no spaces); ``recipe_sha256`` itself left out."""
    steps = {k: v for k, v in recipe.items() if k != "recipe_sha256"}
    return hashlib.sha256(json.dumps(steps, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def recipe_spec(recipe: dict) -> dict:
    """The recipe's parameters as ``preprocessing.recipe.VariantSpec`` fields (``roi_dir`` relative to MODEL_DIR)."""
    detect = recipe["detect"]
    return {"he": recipe["he"]["mode"], "size": int(recipe["resize"]["size"]), "aspect": recipe["aspect"]["mode"],
            "roi_dir": detector_dir(detect) if detect else None, "margin": float(recipe["crop"]["margin"])}


def detector_dir(detect: dict) -> str:
    """The detector's directory in MODEL_DIR (what ``RoiDetector`` opens): the folder of the detect step's weights."""
    return detect["weights"].rsplit("/", 1)[0]
