"""Spatial transformer (Jaderberg et al. 2015) as the paper uses it.

Localization net -> affine theta (a bounded similarity transform, the identity at
initialisation: ``STN``) -> ``affine_grid``
-> ``grid_sample``. The paper trains it separately and freezes it; it does not say
on what task, so we use the natural auxiliary one: left vs right view, with a
tiny classifier behind the STN, on the store variant's train split. On a data set
with other views the task is recognising which of its N views an image is (one
logit and BCE for two views, N logits and cross-entropy for more); a one-view
set has nothing to recognise, and the sweep refuses ``stn: frozen`` there.

A pretrained STN is a store artifact like a variant (``preprocessing.artifact``):
``STORE/stn/<key>/`` holds the weights, stats (loss, accuracy, and theta's rotation,
scale and determinant on validation images) and a before/after figure, with a
checksummed manifest written last. Its key hashes (variant key, epochs, seed,
``STN_CODE``); with a DATASET of folds, the fold too (``fold<k>-<16 hex>``): fold k's
STN learns from fold k's training images only, and its stats list those patients. It is trained under the key's build lock (concurrent trials and
drivers train it once), and a ``s3://``/``gs://`` store gets it uploaded, manifest
last, and downloaded once per node, so every node uses the same STN. Theta and the
sampling grid are computed in true float32 even under autocast and with TF32 allowed
(``fsmodels.precision.true_fp32``): bf16/fp16 coordinates shift the sampled pixels by whole
pixels at 512 px, and TF32's ~1e-3 relative error in theta moves them by about half a pixel.
Pretraining runs on the CPU unless ``device`` says otherwise: the artifact's key must name the
same weights whichever node trains it (a GPU and a CPU differ in the last bits), it runs outside
Ray's GPU accounting (in the sweep's driver), and the task is small (a 64 px localization net).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cluster.errors import FsweepError
from cluster.storage import is_uri, join, resolve_storage
from fsmodels.metrics import json_safe
from fsmodels.precision import true_fp32
from preprocessing.artifact import LOCKS, MANIFEST, NotBuilt, build_lock, content_key, open_artifact, write_manifest
from preprocessing.files import atomic_write, atomic_write_text
from preprocessing.remote import publish, staging_dir
from preprocessing.splits import fold_column
from preprocessing.vocab import SPLITS

STN_CODE = "stn-2"  # bump whenever the same (variant, epochs, seed) would train a different STN
STN_DIR = "stn"  # STORE/stn/<key>/: one directory per pretrained STN
STN_WEIGHTS = "stn.safetensors"  # frozen STN weights
STN_STATS = "stn.json"  # pretraining loss/accuracy, epochs, seed
STN_FIGURE = "stn_before_after.png"  # validation images before (top) and after (bottom) the STN
PAPER_STN = {"loss": 0.0218, "accuracy": 0.99}  # what the paper reports for its STN pretraining
MAX_ROTATION_DEG = 30.0  # theta rotates by at most this many degrees either way
MAX_SCALE = 1.25  # and scales by a factor within [1 / MAX_SCALE, MAX_SCALE]
MAX_SHIFT = 0.2  # and shifts by at most this fraction of the half-width (10 % of the image) each way


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per image: without HE the phantom's grey range is narrow and learning stalls."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6)


class STN(nn.Module):
    """Spatial transformer whose theta is a bounded similarity transform; the identity at initialisation.

    The localization net sees a ``loc_size`` x ``loc_size`` average-pooled copy of
    the input, so its cost hardly grows with the image size. It regresses four numbers, each squashed by tanh
    into its bound (``MAX_ROTATION_DEG``, ``MAX_SCALE``, ``MAX_SHIFT``): rotation, isotropic scale and shift.
    A free 6-number affine let the view task shrink or shear the crop to a sliver that still tells left from
    right (theta's determinant near 0: the classifier behind a frozen STN then sees no anatomy); bounded, every
    warp keeps most of the ROI crop whatever the pretraining converges to (docs/store.md, "The frozen STN").
    """

    def __init__(self, loc_size: int = 64):
        super().__init__()
        self.loc_size = loc_size
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, 7), nn.MaxPool2d(2), nn.ReLU(True),
            nn.Conv2d(8, 10, 5), nn.MaxPool2d(2), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.regressor = nn.Sequential(nn.Linear(10 * 16, 32), nn.ReLU(True), nn.Linear(32, 4))
        # zero weights and bias: rotation 0, scale 1, shift 0, so theta is exactly [[1,0,0],[0,1,0]] at init
        nn.init.zeros_(self.regressor[2].weight)
        nn.init.zeros_(self.regressor[2].bias)
        self.register_load_state_dict_pre_hook(_refuse_free_affine)

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 2, 3) affine matrices for a (B, 1, H, W) batch."""
        small = standardise(F.adaptive_avg_pool2d(x, self.loc_size))
        rotation, log_scale, shift_x, shift_y = torch.tanh(self.regressor(self.localization(small))).unbind(1)
        angle = rotation * math.radians(MAX_ROTATION_DEG)
        scale = torch.exp(log_scale * math.log(MAX_SCALE))
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
        return torch.stack([cos, -sin, shift_x * MAX_SHIFT, sin, cos, shift_y * MAX_SHIFT], dim=1).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # theta, the grid and the sampling in float32 whatever autocast says (see the module docstring)
        with torch.autocast(device_type=x.device.type, enabled=False), true_fp32():
            x32 = x.float()
            grid = F.affine_grid(self.theta(x32), list(x32.shape), align_corners=False)
            return F.grid_sample(x32, grid, align_corners=False, padding_mode="zeros").to(x.dtype)


def _refuse_free_affine(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: weights of the earlier free-affine STN (6 regressor outputs) fail in one line."""
    weight = state_dict.get(f"{prefix}regressor.2.weight")
    if weight is not None and weight.shape[0] == 6:
        raise FsweepError("its STN is the free 6-number affine of an earlier fsweep; this one bounds theta "
                          "(docs/store.md, \"The frozen STN\"): train it again, or use the fsweep that trained it")


def load_weights(module: nn.Module, state: dict, source) -> None:
    """``module.load_state_dict(state)``; a refusal of the pre-hook above names ``source`` (a file or checkpoint)."""
    try:
        module.load_state_dict(state)
    except FsweepError as exc:
        raise FsweepError(f"{source}: {exc}") from None


class ViewClassifier(nn.Module):
    """STN + a tiny CNN for the view-recognition pretraining task (``classes`` views)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.stn = STN()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, 1 if classes == 2 else classes),  # 4x4 keeps where things are
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warped = self.stn(x)
        logits = self.cnn(standardise(F.adaptive_avg_pool2d(warped, min(128, x.shape[-1]))))
        return logits.squeeze(1) if logits.shape[1] == 1 else logits


def view_task(variant, split: str, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S) uint8 and view labels (0 left, 1 right; else the index in the data set's views) of one split.

    ``fold``: that fold's ``split`` (the rows its column of the variant's index names, from every stored
    array); None: the stored split.
    """
    if fold is None:
        images = [np.asarray(variant.images(split, view)) for view in variant.views]
    else:
        images = [_fold_images(variant, split, view, fold) for view in variant.views]
    labels = [np.full(len(imgs), i, dtype=np.float32) for i, imgs in enumerate(images)]
    return np.concatenate(images), np.concatenate(labels)


def _fold_images(variant, split: str, view: str, fold: int) -> np.ndarray:
    """The images of ``view`` in fold ``fold``'s ``split``, in stored-split then array order."""
    column = fold_column(fold)
    if column not in variant.index:
        raise FsweepError(f"{variant.path}: the variant's index has no {column} (a dataset without fold {fold})")
    of = dict(zip(variant.index["image_id"], variant.index[column]))
    picked = []
    for stored in SPLITS:
        rows = [i for i, image_id in enumerate(variant.image_ids(stored, view)) if of[image_id] == split]
        picked.append(np.asarray(variant.images(stored, view))[rows])
    return np.concatenate(picked)


def fold_patients(variant, split: str, fold: int) -> list[str]:
    """Sorted patients (hashed ids) of fold ``fold``'s ``split`` in the variant's index."""
    index = variant.index
    return sorted(set(index.loc[index[fold_column(fold)] == split, "patient"]))


def _batches(n: int, batch: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch):
        yield order[start:start + batch].numpy()


def _to_device(images: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(images[idx]).to(device).unsqueeze(1).float().div_(255.0)


def view_accuracy(model: ViewClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """Left-vs-right accuracy of ``model`` on the given images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for idx in _batches(len(images), 64, None):
            logits = model(_to_device(images, idx, device))
            guess = (logits > 0).float() if logits.ndim == 1 else logits.argmax(1).float()
            correct += int((guess.cpu().numpy() == labels[idx]).sum())
    return correct / max(len(images), 1)


def pretrain_stn(variant, epochs: int, seed: int, batch: int = 16,
                 val: tuple[np.ndarray, np.ndarray] | None = None, device: str = "cpu",
                 fold: int | None = None) -> tuple[STN, dict]:
    """Train STN + tiny classifier on left vs right; return the STN and its loss/accuracy.

    ``val``: the variant's ``view_task(variant, "val", fold)`` when the caller has read it already.
    ``device``: the CPU by default, so the same key gives the same weights on every node (module docstring).
    ``fold``: learn from that fold's training images only (None: the stored train split).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    images, labels = view_task(variant, "train", fold)
    if len(np.unique(labels)) < 2:
        raise FsweepError(f"{variant.path}: STN pretraining needs train images of two or more views "
                          "(one view: use stn joint or off)")
    model = ViewClassifier(len(variant.views)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    target_all = torch.from_numpy(labels).to(device)
    loss_sum = torch.zeros((), device=device)
    for _ in range(epochs):
        model.train()
        loss_sum.zero_()
        for idx in _batches(len(images), batch, generator):
            logits = model(_to_device(images, idx, device))
            loss = (F.binary_cross_entropy_with_logits(logits, target_all[idx]) if logits.ndim == 1
                    else F.cross_entropy(logits, target_all[idx].long()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
    val_images, val_labels = view_task(variant, "val", fold) if val is None else val
    stats = dict(
        epochs=epochs, seed=seed, train_loss=float(loss_sum) / len(images),
        train_accuracy=view_accuracy(model, images, labels, device),
        val_accuracy=view_accuracy(model, val_images, val_labels, device) if len(val_images) else float("nan"),
        paper=PAPER_STN,
    )
    return model.stn.cpu().eval(), stats


def save_stn_figure(stn: STN, images: np.ndarray, path: Path, count: int = 6) -> None:
    """``images`` (the validation ones, both views: ``shown_images``) before (top row) and after (bottom row) the STN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick = np.linspace(0, len(images) - 1, min(count, len(images))).astype(int)
    with torch.no_grad():
        after = stn(torch.from_numpy(images[pick]).unsqueeze(1).float() / 255.0).squeeze(1).numpy()
    fig, axes = plt.subplots(2, len(pick), figsize=(2 * len(pick), 4.2), squeeze=False)
    for col, i in enumerate(pick):
        for row, img in enumerate((images[i] / 255.0, after[col])):
            axes[row, col].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[row, col].axis("off")
    axes[0, 0].set_title("before STN", loc="left", fontsize=9)
    axes[1, 0].set_title("after STN", loc="left", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def shown_images(variant, val_images: np.ndarray, fold: int | None = None) -> np.ndarray:
    """The images theta stats and the figure use: the validation ones, or the train ones when there are none."""
    return val_images if len(val_images) else view_task(variant, "train", fold)[0]


def theta_stats(stn: STN, images: np.ndarray) -> dict:
    """Mean/std/min/max of theta's rotation (degrees), scale (sqrt |det|) and determinant over ``images``."""
    with torch.no_grad():
        theta = torch.cat([stn.theta(_to_device(images, idx, torch.device("cpu"))) for idx in _batches(len(images), 64, None)])
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    det = a * d - b * c
    values = {"rotation_deg": torch.rad2deg(torch.atan2(c, a)), "scale": det.abs().sqrt(), "det": det}
    return {name: {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "min": float(v.min()),
                   "max": float(v.max())} for name, v in values.items()}


def stn_key(variant_key: str, epochs: int, seed: int, fold: int | None = None) -> str:
    """Content key of the STN pretrained on ``variant_key`` for ``epochs`` with ``seed``.

    ``fold``: pretrained on that fold's training images only; the key is then ``fold<k>-<16 hex>``, the fold
    hashed in too (a variant without a detector is shared by every fold, its STNs are not).
    """
    payload = {"code": STN_CODE, "variant": variant_key, "epochs": int(epochs), "seed": int(seed)}
    if fold is None:
        return content_key(payload)
    return f"fold{int(fold)}-{content_key({**payload, 'fold': int(fold)})}"


@dataclass(frozen=True)
class FrozenStn:
    """A checked pretrained STN in the store: the handle an experiment records, and its local files."""

    key: str  # stn_key(variant, epochs, seed, fold)
    manifest: str  # sha256 of its manifest.json
    path: Path  # local directory (in place, or this node's copy of a URI store's)

    @property
    def weights(self) -> Path:
        """The safetensors weights file."""
        return self.path / STN_WEIGHTS


def open_stn(store, key: str, expected: str | None = None) -> FrozenStn:
    """Open the pretrained STN ``key`` of ``store`` (cheap check; ``expected``: its recorded manifest sha256)."""
    path, manifest = open_artifact(resolve_storage(store), f"{STN_DIR}/{key}", "frozen STN", expected)
    return FrozenStn(key=key, manifest=manifest, path=path)


def ensure_frozen_stn(variant, epochs: int, seed: int, force: bool = False, store=None,
                      fold: int | None = None) -> FrozenStn:
    """The variant's STN pretrained for ``epochs`` with ``seed``, training it first if missing (once, under its lock).

    ``store``: the STORE path or URI (default: the directory holding the variant, for a path store).
    ``fold``: pretrain on that fold's training images only (a DATASET with folds); None: the stored train split.
    """
    store = resolve_storage(store or Path(variant.path).parent)
    key = stn_key(variant.key, epochs, seed, fold)
    workdir = staging_dir(store) if is_uri(store) else Path(store)
    with build_lock(workdir / LOCKS, f"stn-{key}"):
        if not force:
            try:
                return open_stn(store, key)
            except FsweepError as reason:
                if not isinstance(reason, NotBuilt):
                    print(f"frozen STN {key}: {reason}; training it again")
        _train_into(workdir / STN_DIR / key, variant, epochs, seed, key, fold)
        if is_uri(store):
            publish(workdir / STN_DIR / key, join(store, STN_DIR, key))
        return open_stn(store, key)


def _train_into(stn_dir: Path, variant, epochs: int, seed: int, key: str, fold: int | None = None) -> None:
    """Pretrain, then write weights, stats and figure, then the manifest (last: the STN is complete)."""
    stn_dir.mkdir(parents=True, exist_ok=True)
    (stn_dir / MANIFEST).unlink(missing_ok=True)  # a killed retraining leaves nothing that verifies
    val = view_task(variant, "val", fold)  # read once: validation accuracy, theta stats and the figure
    stn, stats = pretrain_stn(variant, epochs=epochs, seed=seed, val=val, fold=fold)
    images = shown_images(variant, val[0], fold)
    stats["variant"], stats["theta"] = variant.key, theta_stats(stn, images)
    if fold is not None:  # what it learned from: every patient here is one of the fold's training patients
        stats["fold"], stats["patients"] = int(fold), fold_patients(variant, "train", fold)
    save_stn_figure(stn, images, stn_dir / STN_FIGURE)
    atomic_write_text(stn_dir / STN_STATS, json.dumps(json_safe(stats), indent=2))
    atomic_write(stn_dir / STN_WEIGHTS, lambda tmp: save_file(stn.state_dict(), str(tmp)))
    write_manifest(stn_dir, key, [STN_WEIGHTS, STN_STATS, STN_FIGURE])


def load_frozen_stn(path: str | Path) -> STN:
    """An STN with the weights at ``path``, gradients off, in eval mode."""
    stn = STN()
    load_weights(stn, load_file(str(path)), path)
    for param in stn.parameters():
        param.requires_grad_(False)
    return stn.eval()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pretrain_stn_cli(store, *, variant: str | None, epochs: int, seed: int, force: bool = False) -> None:
    """``fsweep stn train``: pretrain the STN of one variant (or every variant) in ``store``; print loss/accuracy."""
    from preprocessing.variant import list_variants, open_variant

    root = resolve_storage(store)  # a path or an s3:// / gs:// URI
    keys = [variant] if variant else list_variants(root)
    if not keys:
        raise FsweepError(f"{root}: no store variants found (run `fsweep store build` first)")
    for key in keys:
        opened = open_variant(root, key)
        # a fold's variant (cropped by the fold's own detector) gets that fold's STN
        stn = ensure_frozen_stn(opened, epochs=epochs, seed=seed, force=force, store=root, fold=opened.meta.get("fold"))
        stats = json.loads((stn.path / STN_STATS).read_text())
        rotation, scale = stats["theta"]["rotation_deg"], stats["theta"]["scale"]
        print(
            f"{key}: STN view-task loss={stats['train_loss']:.4g} train_acc={stats['train_accuracy']:.3f} "
            f"val_acc={_fmt(stats['val_accuracy'])} (paper: loss {PAPER_STN['loss']}, acc {PAPER_STN['accuracy']:.0%}) "
            f"theta rotation={rotation['mean']:.1f}±{rotation['std']:.1f}° scale={scale['mean']:.3f} -> {stn.weights}"
        )
