"""Device-resident data: a trial's split(s) loaded to the device once as uint8, batches drawn there.

A ``ResidentSet`` holds each distinct (split, view) array of an ``ArraySet`` once (the
cross-view Flip reuses the other view's train images, so they are not stored twice),
plus per-sample row indices and mirror flags. A batch is a gather by index, a
left-right flip of the mirrored rows and nothing else: ``engine.to_input`` then casts
to float on the device. No DataLoader, no host copy per step.

The order is the DataLoader's for the same seed (``engine.make_loader``): its
``RandomSampler`` draws one int64 from the generator (the DataLoader's base seed)
before ``randperm``; ``shuffled_order`` does the same, so a resident trial trains on
the same samples in the same order as a memmap one.
"""
from __future__ import annotations

import numpy as np
import torch

from preprocessing.loader import ArraySet


class ResidentSet:
    """An ``ArraySet`` copied to ``device`` once; ``batches`` yields (uint8 (B,1,S,S), float labels) there."""

    def __init__(self, data: ArraySet, device: torch.device):
        arrays, rows, mirrored = [], [], []
        offset_of: dict[tuple, int] = {}  # image ids of a part -> its first row in the stacked arrays
        for part in data.parts:
            key = part.image_ids
            if key not in offset_of:
                offset_of[key] = sum(len(a) for a in arrays)
                # one read of the memmap (of the rows another fold takes, when it takes some)
                arrays.append(np.asarray(part.images if part.rows is None else part.images[part.rows]))
            rows.append(np.arange(len(part.labels)) + offset_of[key])
            mirrored.append(np.full(len(part.labels), part.mirrored))
        size = data.parts[0].images.shape[1:] if data.parts else (0, 0)
        stacked = np.concatenate(arrays) if arrays else np.zeros((0, *size), np.uint8)
        self.images = torch.from_numpy(stacked).to(device).unsqueeze(1)  # (M, 1, S, S) uint8
        self.rows = torch.from_numpy(np.concatenate(rows or [np.zeros(0, np.int64)])).to(device)
        flags = np.concatenate(mirrored or [np.zeros(0, bool)])
        self.mirrored = torch.from_numpy(flags).to(device)
        self.any_mirrored = bool(flags.any())  # from numpy: no device sync; val/test sets mirror nothing
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.float32)).to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``index`` (a device tensor): uint8 images with the mirrored ones flipped, and their labels."""
        images = self.images[self.rows[index]]
        if not self.any_mirrored:  # the flip would select every row unflipped: skip it on the hot path
            return images, self.labels[index]
        flip = self.mirrored[index].view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images), self.labels[index]

    def batches(self, batch_size: int, seed: int | None) -> "ResidentBatches":
        """One epoch's batches: shuffled with ``seed`` and the last partial batch dropped, or in order (None)."""
        n = len(self)
        if seed is None:
            return ResidentBatches(self, torch.arange(n, device=self.device), batch_size, drop_last=False)
        # as make_loader: no size-1 last batch for BatchNorm
        return ResidentBatches(self, shuffled_order(n, seed).to(self.device), batch_size, drop_last=n > batch_size)


class ResidentBatches:
    """An iterable over one epoch of a ``ResidentSet`` (what ``train_epoch``/``score_loader`` loop over)."""

    def __init__(self, data: ResidentSet, order: torch.Tensor, batch_size: int, drop_last: bool):
        self.data, self.order, self.batch_size = data, order, batch_size
        self.count = len(order) // batch_size if drop_last else -(-len(order) // batch_size)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for b in range(self.count):
            yield self.data.gather(self.order[b * self.batch_size:(b + 1) * self.batch_size])


def shuffled_order(n: int, seed: int) -> torch.Tensor:
    """The sample order a shuffled ``DataLoader(generator=Generator().manual_seed(seed))`` yields."""
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed, drawn first
    return torch.randperm(n, generator=generator)


def resident_bytes(*datasets: ArraySet) -> int:
    """Bytes the distinct arrays of ``datasets`` take as uint8 (what ``ResidentSet`` would hold)."""
    seen = {}
    for data in datasets:
        for part in data.parts:
            seen[part.image_ids] = len(part.labels) * int(np.prod(part.images.shape[1:]))
    return sum(seen.values())
