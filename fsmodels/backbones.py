"""Backbone registry: the paper's names plus any timm model, grey input, local weights.

Grey input is handled once, by timm itself: ``in_chans=1`` folds (sums) the
pretrained RGB first-conv weights into one channel. Convolution is linear, so
this gives the same output as repeating the (normalised) grey channel three
times up to float rounding (``bench/train_throughput.py`` measures both); the
folded stem does a third of the first conv's work and needs no 3x copy of the
batch, so it is never the costlier choice. The grey input is normalised with
the mean of ImageNet's channel means and stds (inside ``FsNet``).

``pretrained`` is ``none`` (random init), ``imagenet`` (timm's default
pretrained tag, read from the local Hugging Face cache only) or a path to a
``.pth``/``.pt``/``.bin`` state dict or a ``.safetensors`` file. Weights always
go through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), which
folds the first conv to one channel and drops an ImageNet head of another size.
Nothing is downloaded here.
"""
from __future__ import annotations

import os
from pathlib import Path

import timm
import torch.nn as nn

from cluster.errors import FsweepError
from preprocessing.vocab import is_off

# The paper's names (Tables 3 and 6) -> timm architectures.
PAPER_BACKBONES = {
    "resnet50": "resnet50",
    "resnext50": "resnext50_32x4d",
    "wide_resnet50": "wide_resnet50_2",
    "res2net101": "res2net101_26w_4s",
    "vgg16": "vgg16",
    "vgg19": "vgg19",
}
# ImageNet statistics folded to one grey channel (mean over R, G, B).
GREY_MEAN = sum(timm.data.IMAGENET_DEFAULT_MEAN) / 3
GREY_STD = sum(timm.data.IMAGENET_DEFAULT_STD) / 3
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for on the hub


def list_backbones() -> list[str]:
    """The paper's registry names; any other timm model name is accepted too."""
    return list(PAPER_BACKBONES)


def resolve_backbone(name: str) -> str:
    """Map a registry alias to its timm name; fail on names timm does not know."""
    arch = PAPER_BACKBONES.get(name, name)
    if not timm.is_model(arch):
        raise FsweepError(
            f"backbone {name!r}: unknown (registry: {', '.join(PAPER_BACKBONES)}; or any name from timm.list_models())"
        )
    return arch


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_imagenet_file(arch: str) -> Path:
    """Local file of ``arch``'s default ImageNet weights in the HF cache, or a one-line FsweepError."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise FsweepError(f"backbone {arch}: timm has no ImageNet weights on the Hugging Face hub for it")
    cache = hf_cache_dir()
    for filename in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    raise FsweepError(
        f"backbone {arch}: ImageNet weights {repo}/{HF_WEIGHT_FILES[0]} are not in the Hugging Face cache {cache}; "
        f"fetch them once where there is internet (`huggingface-cli download {repo}`) and copy the cache, "
        f"or set train.pretrained to a local .pth/.safetensors file"
    )


def weights_file(arch: str, pretrained: str) -> Path | None:
    """The weights file for ``pretrained`` (none -> None), checked to exist."""
    choice = str(pretrained)
    if is_off(choice):
        return None
    if choice.lower() == "imagenet":
        return cached_imagenet_file(arch)
    path = Path(choice).expanduser()
    if not path.is_file():
        raise FsweepError(f"{path}: pretrained weights file not found (train.pretrained: none, imagenet or a file)")
    return path


def create_backbone(
    name: str, pretrained: str = "none", in_chans: int = 1, num_classes: int = 1, finetune: bool = True
) -> nn.Module:
    """A timm classifier with ``num_classes`` logits for ``in_chans``-channel input.

    ``finetune=False`` freezes every parameter except the classifier head (the
    paper's Table 4 "frozen" rows); :func:`set_frozen_eval` keeps the frozen
    BatchNorm statistics fixed during training too.
    """
    arch = resolve_backbone(name)
    path = weights_file(arch, pretrained)
    kwargs = dict(in_chans=in_chans, num_classes=num_classes)
    if path is not None:  # timm's loader with a local file: no network; folds conv1, drops a mismatched head
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
    try:
        model = timm.create_model(arch, pretrained=path is not None, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FsweepError(f"{path}: cannot load weights into {arch} ({first[:200]})") from exc
    if not finetune:
        freeze_body(model)
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (timm's ``get_classifier``)."""
    return list(model.get_classifier().parameters())


def freeze_body(model: nn.Module) -> None:
    """Turn off gradients everywhere except the classifier head."""
    head = {id(p) for p in head_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in head)


def set_frozen_eval(model: nn.Module) -> None:
    """Put modules whose own parameters are all frozen in eval mode, so frozen BatchNorm keeps its statistics."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            module.eval()
