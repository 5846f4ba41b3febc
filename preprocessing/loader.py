"""Trial-side datasets over a store variant's memory-mapped arrays.

They never decode, crop or equalize: they index the uint8 arrays the store built and
yield ``(uint8 tensor (1, S, S), float label)``. Normalisation and augmentation
happen on the device in fsmodels.

Flip (paper §3.3): a view's training set gains the OTHER view's TRAIN images mirrored
left-right, labels kept, so it doubles. Only the train split is ever mirrored in, and
splits are patient-level (docs/design.md, 'Patient-level splits'), so no val/test patient reaches training. That
cross-view Flip needs the mirrored pair (left and right) in the data; for a view outside
it (a PA-only set, elbow/wrist/shoulder) Flip is a plain horizontal flip: the view's own
train images join mirrored (``preprocessing.vocab.flip_kind`` says which one a model gets).

Folds (``fsweep ingest --folds K``): the store's arrays follow the dataset's ``split``
(fold 0); another fold's sets take their rows from every array of the view, picked by
that fold's column of the variant's index (``fold_splits``), so no fold needs a store of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cluster.errors import FsweepError
from preprocessing.splits import dataset_folds, fold_column
from preprocessing.variant import Variant
from preprocessing.vocab import SPLITS, VIEWS, check_view_choice, flip_kind, model_views


@dataclass(frozen=True)
class Part:
    """A slice of a training/eval set: every image of one split x view, mirrored or not."""

    images: np.ndarray  # (N, S, S) uint8 memmap
    labels: np.ndarray  # (N,) int64
    image_ids: tuple[str, ...]  # ids in array order
    mirrored: bool  # flip left-right when read
    rows: np.ndarray | None = None  # the array rows this part reads (None: all, in order)


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
        stored = int(part.rows[row]) if part.rows is not None else row  # the array row; labels are per part
        image = part.images[stored, :, ::-1] if part.mirrored else part.images[stored]
        return torch.from_numpy(np.array(image)[None]), float(part.labels[row])  # a copy: memmaps are read-only


def fold_splits(variant: Variant, fold: int) -> dict[str, str] | None:
    """image_id -> split in fold ``fold`` (None for fold 0: the store's own split); FsweepError for a missing fold."""
    if fold == 0:
        return None
    rows = variant.index
    if fold_column(fold) not in rows:
        raise FsweepError(f"space.fold={fold}: variant {variant.key} has {dataset_folds(rows.columns)} folds "
                          "(run `fsweep ingest --folds K`, then `fsweep store build`)")
    return dict(zip(rows["image_id"], rows[fold_column(fold)]))


def train_set(variant: Variant, view: str, flip: bool, splits: dict[str, str] | None = None,
              pair: tuple[str, ...] = VIEWS) -> ArraySet:
    """Training set of ``view`` (a view, or both/all); with ``flip`` plus mirrored train images (``train_views``).

    ``splits`` (``fold_splits``) picks another fold's train rows; None keeps the store's split. ``pair``: the
    mirrored pair of cross-view Flip (``data.mirror_pair``).
    """
    views, mirror_views = train_views(view, flip, variant.views, pair)
    parts = [p for v in views for p in _parts(variant, "train", v, False, splits)]
    parts += [p for v in mirror_views for p in _parts(variant, "train", v, True, splits)]
    return ArraySet(parts)


def train_views(view: str, flip: bool, data_views: tuple[str, ...] = VIEWS, pair: tuple[str, ...] = VIEWS
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(views a training set reads as stored, views it reads mirrored) for a data set of ``data_views``:
    with cross-view Flip one view of the ``pair`` mirrors the other view in, and both/all mirrors every
    train image; with horizontal Flip each view mirrors its own train images in."""
    views = _views(view, data_views)
    if not flip:
        return views, ()
    if flip_kind(view, data_views, pair) == "horizontal" or view in ("both", "all"):
        return views, views
    return views, tuple(v for v in pair if v != view)


def eval_set(variant: Variant, view: str, split: str, splits: dict[str, str] | None = None) -> ArraySet:
    """Evaluation set of ``split`` (val/test, or train) for ``view`` (left/right/both); never mirrored."""
    if split not in SPLITS:
        raise FsweepError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    return ArraySet([p for v in _views(view, variant.views) for p in _parts(variant, split, v, False, splits)])


def _parts(variant: Variant, split: str, view: str, mirrored: bool, splits: dict[str, str] | None) -> list[Part]:
    """The images of ``split`` x ``view``: one store array, or (another fold) the matching rows of every array."""
    if splits is None:
        return [_part(variant, split, view, mirrored)]
    parts = []
    for stored in SPLITS:
        ids = variant.image_ids(stored, view)
        rows = np.array([i for i, image_id in enumerate(ids) if splits.get(image_id) == split], dtype=np.int64)
        whole = _part(variant, stored, view, mirrored)
        parts.append(Part(images=whole.images, labels=whole.labels[rows], mirrored=mirrored, rows=rows,
                          image_ids=tuple(ids[i] for i in rows)))
    return parts


def _part(variant: Variant, split: str, view: str, mirrored: bool) -> Part:
    return Part(
        images=variant.images(split, view),
        labels=variant.labels(split, view),
        image_ids=tuple(variant.image_ids(split, view)),
        mirrored=mirrored,
    )


def _views(view: str, data_views: tuple[str, ...]) -> tuple[str, ...]:
    check_view_choice(view, data_views, "space.view")
    return model_views(view, data_views)
