"""Spatial transformer (Jaderberg et al. 2015) as the paper uses it.

Localization net -> affine theta (initialised to the identity) -> ``affine_grid``
-> ``grid_sample``. The paper trains it separately and freezes it; it does not say
on what task, so we use the natural auxiliary one: left vs right view, with a
tiny classifier behind the STN, on the store variant's train split. The result
is saved once per variant in ``STORE/<key>/stn/`` (weights, stats, a before/after
figure) under a file lock, so concurrent trials train it once and never read a
half-written file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from filelock import FileLock
from safetensors.torch import load_file, save_file

from cluster.errors import FsweepError
from fsmodels.metrics import json_safe
from preprocessing.files import atomic_write, atomic_write_text
from preprocessing.vocab import VIEWS

STN_WEIGHTS = "stn.safetensors"  # frozen STN weights in the variant's stn/ dir (written last)
STN_STATS = "stn.json"  # pretraining loss/accuracy, epochs, seed
STN_FIGURE = "stn_before_after.png"  # validation images before (top) and after (bottom) the STN
PAPER_STN = {"loss": 0.0218, "accuracy": 0.99}  # what the paper reports for its STN pretraining


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per image: without HE the phantom's grey range is narrow and learning stalls."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-6)


class STN(nn.Module):
    """Affine spatial transformer; the identity transform at initialisation.

    The localization net sees a ``loc_size`` x ``loc_size`` average-pooled copy of
    the input, so its cost hardly grows with the image size.
    """

    def __init__(self, loc_size: int = 64):
        super().__init__()
        self.loc_size = loc_size
        self.localization = nn.Sequential(
            nn.Conv2d(1, 8, 7), nn.MaxPool2d(2), nn.ReLU(True),
            nn.Conv2d(8, 10, 5), nn.MaxPool2d(2), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.regressor = nn.Sequential(nn.Linear(10 * 16, 32), nn.ReLU(True), nn.Linear(32, 6))
        # zero weights + identity bias: theta is exactly [[1,0,0],[0,1,0]] for every input at init
        nn.init.zeros_(self.regressor[2].weight)
        with torch.no_grad():
            self.regressor[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 2, 3) affine matrices for a (B, 1, H, W) batch."""
        small = standardise(F.adaptive_avg_pool2d(x, self.loc_size))
        return self.regressor(self.localization(small)).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(self.theta(x).to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class ViewClassifier(nn.Module):
    """STN + a tiny CNN for the left-vs-right pretraining task."""

    def __init__(self):
        super().__init__()
        self.stn = STN()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 1),  # 4x4 keeps where things are
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warped = self.stn(x)
        return self.cnn(standardise(F.adaptive_avg_pool2d(warped, min(128, x.shape[-1])))).squeeze(1)


def view_task(variant, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S) uint8 and view labels (0 left, 1 right) of one split, in memory."""
    images = [np.asarray(variant.images(split, view)) for view in VIEWS]
    labels = [np.full(len(imgs), i, dtype=np.float32) for i, imgs in enumerate(images)]
    return np.concatenate(images), np.concatenate(labels)


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
            correct += int(((logits > 0).float().cpu().numpy() == labels[idx]).sum())
    return correct / max(len(images), 1)


def pretrain_stn(variant, epochs: int, seed: int, batch: int = 16) -> tuple[STN, dict]:
    """Train STN + tiny classifier on left vs right; return the STN and its loss/accuracy."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    images, labels = view_task(variant, "train")
    if len(np.unique(labels)) < 2:
        raise FsweepError(f"{variant.path}: STN pretraining needs train images of both views")
    model = ViewClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    target_all = torch.from_numpy(labels).to(device)
    loss_sum = torch.zeros((), device=device)
    for _ in range(epochs):
        model.train()
        loss_sum.zero_()
        for idx in _batches(len(images), batch, generator):
            loss = F.binary_cross_entropy_with_logits(model(_to_device(images, idx, device)), target_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
    val_images, val_labels = view_task(variant, "val")
    stats = dict(
        epochs=epochs, seed=seed, train_loss=float(loss_sum) / len(images),
        train_accuracy=view_accuracy(model, images, labels, device),
        val_accuracy=view_accuracy(model, val_images, val_labels, device) if len(val_images) else float("nan"),
        paper=PAPER_STN,
    )
    return model.stn.cpu().eval(), stats


def save_stn_figure(stn: STN, variant, path: Path, count: int = 6) -> None:
    """Validation images (both views) before (top row) and after (bottom row) the STN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, _ = view_task(variant, "val")
    if len(images) == 0:
        images, _ = view_task(variant, "train")
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


def ensure_frozen_stn(variant, epochs: int, seed: int, force: bool = False) -> Path:
    """Path of the variant's pretrained STN weights, training them first if missing (once, under a lock)."""
    stn_dir = Path(variant.path) / "stn"
    stn_dir.mkdir(parents=True, exist_ok=True)
    weights = stn_dir / STN_WEIGHTS
    with FileLock(str(stn_dir / ".lock")):
        if weights.is_file() and not force:
            return weights
        stn, stats = pretrain_stn(variant, epochs=epochs, seed=seed)
        save_stn_figure(stn, variant, stn_dir / STN_FIGURE)
        atomic_write_text(stn_dir / STN_STATS, json.dumps(json_safe(stats), indent=2))
        # weights last: their presence means the STN is complete
        atomic_write(weights, lambda tmp: save_file(stn.state_dict(), str(tmp)))
    return weights


def load_frozen_stn(path: str | Path) -> STN:
    """An STN with the weights at ``path``, gradients off, in eval mode."""
    stn = STN()
    stn.load_state_dict(load_file(str(path)))
    for param in stn.parameters():
        param.requires_grad_(False)
    return stn.eval()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def pretrain_stn_cli(store, *, variant: str | None, epochs: int, seed: int, force: bool = False) -> None:
    """``fsweep stn train``: pretrain the STN of one variant (or every variant) in ``store``; print loss/accuracy."""
    from preprocessing.variant import open_variant

    root = Path(store)
    if not root.is_dir():
        raise FsweepError(f"{root}: store directory not found")
    keys = [variant] if variant else sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
    if not keys:
        raise FsweepError(f"{root}: no store variants found (run `fsweep store build` first)")
    for key in keys:
        opened = open_variant(root, key)
        path = ensure_frozen_stn(opened, epochs=epochs, seed=seed, force=force)
        stats = json.loads((path.parent / STN_STATS).read_text())
        print(
            f"{key}: STN view-task loss={stats['train_loss']:.4g} train_acc={stats['train_accuracy']:.3f} "
            f"val_acc={_fmt(stats['val_accuracy'])} (paper: loss {PAPER_STN['loss']}, acc {PAPER_STN['accuracy']:.0%}) "
            f"-> {path}"
        )
