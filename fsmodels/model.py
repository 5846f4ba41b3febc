"""The trial's network: optional STN -> grey normalisation -> timm backbone -> one logit.

Input is a float batch (B, 1, S, S) in [0, 1]; the normalisation lives inside
the module so an exported model needs no preprocessing constants besides /255.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fsmodels.backbones import GREY_MEAN, GREY_STD, create_backbone, set_frozen_eval
from fsmodels.config import STN_MODES
from fsmodels.stn import STN, load_frozen_stn
from preprocessing.vocab import normalise_choice


class FsNet(nn.Module):
    """Classifier returning one abnormal-vs-normal logit per image (shape (B,))."""

    def __init__(self, backbone: nn.Module, stn: nn.Module | None = None):
        super().__init__()
        self.stn = stn
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(GREY_MEAN))
        self.register_buffer("std", torch.tensor(GREY_STD))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stn is not None:
            x = self.stn(x)
        return self.backbone((x - self.mean) / self.std).squeeze(1)

    def train(self, mode: bool = True) -> "FsNet":
        """Like nn.Module.train, but frozen parts (frozen STN, frozen backbone body) stay in eval mode."""
        super().train(mode)
        if mode:
            set_frozen_eval(self)
        return self


def build_model(
    backbone: str, pretrained: str, finetune: bool, stn_mode: str = "off", stn_weights=None
) -> FsNet:
    """An FsNet; ``stn_mode`` frozen needs ``stn_weights`` (see ``fsmodels.stn.ensure_frozen_stn``).

    ``joint`` starts the STN at the identity and trains it with the classifier.
    """
    mode = normalise_choice(stn_mode, "space.stn", STN_MODES)
    stn = None
    if mode == "frozen":
        stn = load_frozen_stn(stn_weights)
    elif mode == "joint":
        stn = STN()
    return FsNet(create_backbone(backbone, pretrained=pretrained, in_chans=1, num_classes=1, finetune=finetune), stn)


def model_skeleton(backbone: str, stn_mode: str) -> FsNet:
    """An FsNet of the right shape with random weights, to load a saved state dict into (reads no weights file)."""
    stn = None if normalise_choice(stn_mode, "space.stn", STN_MODES) == "off" else STN()
    return FsNet(create_backbone(backbone, pretrained="none", in_chans=1, num_classes=1, finetune=True), stn)
