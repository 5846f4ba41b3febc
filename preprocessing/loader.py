"""Trial-side datasets over a store variant's memory-mapped arrays.

They never decode, crop or equalize: they index the uint8 arrays the store built and
yield ``(uint8 tensor (1, S, S), float label)``. Normalisation and augmentation
happen on the device in fsmodels.

Flip (paper §3.3): a view's training set gains the OTHER view's TRAIN images mirrored
left-right, labels kept, so it doubles. Only the train split is ever mirrored in, and
splits are patient-level (DESIGN §3), so no val/test patient reaches training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cluster.errors import FsweepError
from preprocessing.variant import Variant
from preprocessing.vocab import SPLITS, VIEW_CHOICES, VIEWS


@dataclass(frozen=True)
class Part:
    """A slice of a training/eval set: every image of one split x view, mirrored or not."""

    images: np.ndarray  # (N, S, S) uint8 memmap
    labels: np.ndarray  # (N,) int64
    image_ids: tuple[str, ...]  # ids in array order
    mirrored: bool  # flip left-right when read


class ArraySet(Dataset):
    """A torch Dataset over one or more ``Part``s, in order."""

    def __init__(self, parts: list[Part]):
        self.parts = [part for part in parts if len(part.labels)]
        self.offsets = np.cumsum([0] + [len(part.labels) for part in self.parts])
        self.labels = np.concatenate([part.labels for part in self.parts] or [np.zeros(0, np.int64)])
        self.image_ids = [image_id for part in self.parts for image_id in part.image_ids]
        self.mirrored = np.concatenate(
            [np.full(len(part.labels), part.mirrored) for part in self.parts] or [np.zeros(0, bool)]
        )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        which = int(np.searchsorted(self.offsets, i, side="right")) - 1
        part, row = self.parts[which], i - int(self.offsets[which])
        image = part.images[row, :, ::-1] if part.mirrored else part.images[row]
        return torch.from_numpy(np.array(image)[None]), float(part.labels[row])  # a copy: memmaps are read-only


def train_set(variant: Variant, view: str, flip: bool) -> ArraySet:
    """Training set of ``view`` (left/right/both); with ``flip`` plus the mirrored train images of the other view(s)."""
    views = _views(view)
    parts = [_part(variant, "train", v, mirrored=False) for v in views]
    if flip:
        # one view: mirror the other view in; both: mirror every train image
        mirror_views = [v for v in VIEWS if v != view] if view in VIEWS else list(VIEWS)
        parts += [_part(variant, "train", v, mirrored=True) for v in mirror_views]
    return ArraySet(parts)


def eval_set(variant: Variant, view: str, split: str) -> ArraySet:
    """Evaluation set of ``split`` (val/test, or train) for ``view`` (left/right/both); never mirrored."""
    if split not in SPLITS:
        raise FsweepError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    return ArraySet([_part(variant, split, v, mirrored=False) for v in _views(view)])


def _part(variant: Variant, split: str, view: str, mirrored: bool) -> Part:
    return Part(
        images=variant.images(split, view),
        labels=variant.labels(split, view),
        image_ids=tuple(variant.image_ids(split, view)),
        mirrored=mirrored,
    )


def _views(view: str) -> tuple[str, ...]:
    if view not in VIEW_CHOICES:
        raise FsweepError(f"view={view!r}: must be one of {', '.join(VIEW_CHOICES)}")
    return VIEWS if view == "both" else (view,)
