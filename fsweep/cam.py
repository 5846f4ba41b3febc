"""Grad-CAM (Selvaraju et al. 2017) on the backbone's last convolutional stage.

The map answers "which part of the ROI crop drove this call": gradients of the
predicted class's evidence (the logit for abnormal, minus the logit for normal)
are averaged per channel of ``backbone.forward_features`` (timm's last stage),
weight those channels, and the ReLU of the sum is the map. With an STN in front,
the map lives in the warped frame; it is carried back to the input frame with the
inverse affine transform, then from the square network input to the crop's own
pixels by undoing the store's pad / stretch.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fsmodels.model import FsNet, model_skeleton
from fsmodels.stn import load_weights

HEAT_WEIGHT = 0.4  # share of the colour map in the overlay (the rest is the grey crop)


def model_from_weights(weights: str | Path, backbone: str, stn: str) -> FsNet:
    """An eval-mode FsNet with the exported safetensors state dict (no pickle, no pretrained download)."""
    from safetensors.torch import load_file

    model = model_skeleton(backbone, stn)
    load_weights(model, load_file(str(weights)), weights)
    return model.eval()


def grad_cam(model: FsNet, image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Heat map (S, S) float32 in [0, 1] over the network input ``image`` (uint8 S x S, as preprocessed)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div(255.0)[None, None]
    model.eval()
    warped, theta = (model.stn(x), model.stn.theta(x)) if model.stn is not None else (x, None)
    features = model.backbone.forward_features((warped - model.mean) / model.std)
    logit = model.backbone.forward_head(features).reshape(())
    evidence = logit if torch.sigmoid(logit) >= threshold else -logit  # the predicted class's score
    (grads,) = torch.autograd.grad(evidence, features)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if theta is not None:
        cam = unwarp(cam, theta.detach())
    cam = cam[0, 0]
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).numpy().astype(np.float32)


def unwarp(cam: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Map a (1, 1, S, S) map from the STN's output frame back to its input frame (inverse affine)."""
    linear, shift = theta[:, :, :2], theta[:, :, 2:]
    inverse = torch.linalg.inv(linear)
    back = torch.cat([inverse, -inverse @ shift], dim=2)
    grid = F.affine_grid(back, list(cam.shape), align_corners=False)
    return F.grid_sample(cam, grid, align_corners=False, padding_mode="zeros")


def heat_to_crop(heat: np.ndarray, crop_shape: tuple[int, int], aspect: str) -> np.ndarray:
    """The (S, S) map in the crop's own (height, width) pixels: undo the store's ``pad`` or ``stretch``."""
    height, width = crop_shape
    if aspect == "pad":  # the crop was centred on a black square of side max(height, width)
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return cv2.resize(heat, (side, side), interpolation=cv2.INTER_LINEAR)[top:top + height, left:left + width]
    return cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)


def overlay(heat: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """BGR uint8 image of the crop's size: the grey crop with the heat map (same size, [0, 1]) in colour."""
    colour = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(grey, 1 - HEAT_WEIGHT, colour, HEAT_WEIGHT, 0)
