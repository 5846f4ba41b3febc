"""The exported MODEL_DIR's schema: file names and the model card's format, shared by export and predict.

A module of its own so that ``fsweep predict`` reads the schema without importing
export (which needs torch).
"""
from __future__ import annotations

CARD = "model_card.json"  # the model card, read first by predict
CARD_FORMAT = "fsweep-model-1"  # bump when the layout or the card's keys change
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
WEIGHTS_FILE = "weights.safetensors"
ROI_DIR = "roi"  # the detector's directory inside MODEL_DIR
ROI_FILES = ("best.pt", "metrics.json")  # what RoiDetector reads
