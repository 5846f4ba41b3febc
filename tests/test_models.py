"""Backbone registry, grey input, pretrained weights (offline), frozen vs fine-tuned, the STN."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fsmodels.backbones import create_backbone, list_backbones, resolve_backbone
from fsmodels.model import FsNet, build_model
from fsmodels.stn import MAX_ROTATION_DEG, MAX_SCALE, MAX_SHIFT, STN
from cluster.errors import FsweepError

SMALL = "resnet10t"  # a tiny timm model for the fast tests
SLOW = {"wide_resnet50", "res2net101", "vgg16", "vgg19"}  # several seconds each on 2 CPU cores


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_backbones()]
)
def test_registry_backbone_forward_backward_on_grey_input(name):
    model = create_backbone(name)
    first = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert first.in_channels == 1
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 1)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_registry_names_and_unknown_name():
    assert list_backbones() == ["resnet50", "resnext50", "wide_resnet50", "res2net101", "vgg16", "vgg19"]
    assert resolve_backbone("res2net101") == "res2net101_26w_4s"
    assert resolve_backbone("efficientnet_b0") == "efficientnet_b0"  # any timm name
    with pytest.raises(FsweepError, match="resnet50, resnext50, wide_resnet50"):
        create_backbone("resnet5o")


def test_frozen_backbone_trains_only_the_head_and_keeps_batchnorm_stats():
    frozen = FsNet(create_backbone(SMALL, finetune=False))
    tuned = FsNet(create_backbone(SMALL, finetune=True))
    for net in (frozen, tuned):
        net.train()
        net(torch.rand(4, 1, 32, 32)).sum().backward()
    head = {id(p) for p in frozen.backbone.get_classifier().parameters()}
    for p in frozen.parameters():
        assert (p.grad is not None) == (id(p) in head)
    assert all(p.grad is not None for p in tuned.backbone.parameters())
    bn = frozen.backbone.bn1 if hasattr(frozen.backbone, "bn1") else None
    assert bn is not None and not bn.training  # frozen BatchNorm stays in eval mode
    before = bn.running_mean.clone()
    frozen.train()(torch.rand(4, 1, 32, 32))
    assert torch.equal(before, bn.running_mean)


def _imagenet_style_state(arch: str) -> dict:
    """A 3-channel, 1000-class state dict like timm's ImageNet checkpoints."""
    torch.manual_seed(1)
    return timm.create_model(arch, pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_with_folded_first_conv(tmp_path, suffix):
    state = _imagenet_style_state(SMALL)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = create_backbone(SMALL, pretrained=str(path))
    loaded = model.state_dict()
    assert torch.allclose(loaded["conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(loaded["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    assert loaded["fc.weight"].shape == (1, state["fc.weight"].shape[1])  # ImageNet head replaced


def test_missing_local_weights_file_is_one_clear_line(tmp_path):
    with pytest.raises(FsweepError) as err:
        create_backbone(SMALL, pretrained=str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(err.value) and "\n" not in str(err.value)


def test_imagenet_offline_without_cached_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FsweepError) as err:
        create_backbone("resnet50", pretrained="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "timm/resnet50.a1_in1k" in message and "not in the Hugging Face cache" in message
    assert str(tmp_path / "empty_hf") in message


def test_imagenet_weights_load_from_the_hf_cache_offline(tmp_path, monkeypatch):
    repo = timm.models.get_pretrained_cfg(SMALL).hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    state = _imagenet_style_state(SMALL)
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_backbone(SMALL, pretrained="imagenet")
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_stn_is_the_identity_at_init():
    stn = STN()
    x = torch.rand(3, 1, 48, 48)
    theta = stn.theta(x)
    assert torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))
    assert torch.allclose(stn(x), x, atol=1e-5)


def test_stn_warps_stay_within_their_bounds_whatever_the_weights():
    """However far pretraining pushes the regressor, theta stays a similarity transform inside its bounds: no
    warp can shrink the crop to a sliver (a free affine reached determinant ~0 on the phantom's view task)."""
    torch.manual_seed(0)
    stn = STN(loc_size=32)
    with torch.no_grad():
        stn.regressor[2].weight.normal_(0, 50.0)
        stn.regressor[2].bias.normal_(0, 50.0)
    theta = stn.theta(torch.rand(64, 1, 32, 32))
    a, b, c, d = theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1]
    scale = (a * d - b * c).sqrt()
    assert torch.allclose(a, d) and torch.allclose(b, -c)  # rotation and isotropic scale: no shear, no mirror
    assert scale.min() >= 1 / MAX_SCALE - 1e-5 and scale.max() <= MAX_SCALE + 1e-5
    assert min(scale.min() - 1 / MAX_SCALE, MAX_SCALE - scale.max()) < 1e-3  # pushed hard, it rests on a bound
    assert torch.rad2deg(torch.atan2(c, a)).abs().max() <= MAX_ROTATION_DEG + 1e-3
    assert theta[:, :, 2].abs().max() <= MAX_SHIFT + 1e-6


def test_weights_of_the_free_affine_stn_are_refused_in_one_line(tmp_path):
    from fsmodels.stn import load_frozen_stn

    old = STN()
    old.regressor[2] = torch.nn.Linear(32, 6)  # the earlier STN's head: six free affine numbers
    save_file(old.state_dict(), str(tmp_path / "stn.safetensors"))
    with pytest.raises(FsweepError, match=r"stn\.safetensors: its STN is the free 6-number affine") as caught:
        load_frozen_stn(tmp_path / "stn.safetensors")
    assert "\n" not in str(caught.value)
    net = build_model(SMALL, "none", True, stn_mode="joint")  # a trial checkpoint's network, STN inside
    state = {**net.state_dict(), **{f"stn.{k}": v for k, v in old.state_dict().items()}}
    with pytest.raises(FsweepError, match="free 6-number affine"):
        net.load_state_dict(state)


def _rotation(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def test_stn_learns_a_known_rotation():
    torch.manual_seed(0)
    size = 32
    blobs = F.avg_pool2d(torch.rand(16, 1, size + 8, size + 8), 9, stride=1)  # smooth images, 32 x 32
    upright = (blobs - blobs.mean()) / blobs.std()
    rotated = _warp(upright, _rotation(20.0))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = (xx**2 + yy**2 < 0.5).float()  # compare inside a disc: no border effects
    stn = STN(loc_size=size)
    optimizer = torch.optim.Adam(stn.parameters(), lr=0.01)
    for _ in range(100):
        loss = (((stn(rotated) - upright) ** 2) * centre).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = stn.theta(rotated).mean(dim=0).detach()
    composed = learned[:, :2] @ _rotation(20.0)[:, :2]  # learned undoes the rotation: product = identity
    assert torch.allclose(composed, torch.eye(2), atol=0.05), learned
    assert loss.item() < 0.1 * float((((rotated - upright) ** 2) * centre).mean())


def test_build_model_joint_stn_and_bad_choice():
    net = build_model(SMALL, "none", True, stn_mode="joint")
    assert isinstance(net.stn, STN) and all(p.requires_grad for p in net.stn.parameters())
    assert build_model(SMALL, "none", True, stn_mode=False).stn is None  # YAML's bare off
    with pytest.raises(FsweepError, match="space.stn"):
        build_model(SMALL, "none", True, stn_mode="sideways")
