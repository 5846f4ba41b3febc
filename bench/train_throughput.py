"""Training throughput (images/s) per registry backbone; grey-input folding vs channel repeat.

CUDA: each backbone in fp32 NCHW and in AMP (bf16 where supported) + channels_last;
the last line is ``amp_speedup_x=`` (geometric mean over backbones of the ratio).
CPU: AMP is a CUDA feature here, so the table compares NCHW with channels_last
instead and the last line is ``amp_speedup_x=nan`` with the CPU ratio on the line
before it. Usage: ``python bench/train_throughput.py [--size 512 --batch 4] [--quick]``; ``--quick``: the
smallest run (timm resnet10t only at 32 px, one timed step, no grey-input comparison) to check that the bench works.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from fsmodels.backbones import create_backbone, list_backbones

QUICK = dict(size=32, steps=1, backbones="resnet10t", grey="")  # --quick: the smallest run


def train_step_rate(model: torch.nn.Module, size: int, batch: int, steps: int, amp: bool, channels_last: bool,
                    device: torch.device, repeat_grey: bool = False) -> float:
    """Images/s of SGD training steps on random uint8 input, after two warm-up steps."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    target = torch.randint(0, 2, (batch,), device=device).float()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16

    def step() -> None:
        x = images.float().div_(255.0)
        if repeat_grey:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.binary_cross_entropy_with_logits(model(x).reshape(-1).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def grey_comparison(name: str, size: int, batch: int, steps: int, device: torch.device) -> None:
    """in_chans=1 (timm folds conv1) vs in_chans=3 with the grey channel repeated: output gap and speed."""
    torch.manual_seed(0)
    rgb = create_backbone(name, in_chans=3).eval()
    grey = create_backbone(name, in_chans=1).eval()
    state = rgb.state_dict()
    conv = grey.pretrained_cfg["first_conv"] + ".weight"
    state[conv] = state[conv].sum(dim=1, keepdim=True)  # the same folding timm applies to pretrained weights
    grey.load_state_dict(state)
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        repeated = rgb(x.expand(-1, 3, -1, -1))
        gap = ((repeated - grey(x)).abs().max() / repeated.abs().max()).item()
    fold = train_step_rate(grey, size, batch, steps, False, False, device)
    repeat = train_step_rate(rgb, size, batch, steps, False, False, device, repeat_grey=True)
    print(f"grey input {name} {size}px: max |folded - repeated| / max |repeated| = {gap:.1e}; "
          f"train img/s folded {fold:.1f} vs repeated {repeat:.1f} (x{fold / repeat:.2f})")


def main() -> None:
    """Print the throughput table, then the headline ratio."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512 if cuda else 64, help="square input size")
    parser.add_argument("--batch", type=int, default=4, help="batch size (paper: 4)")
    parser.add_argument("--steps", type=int, default=20 if cuda else 3, help="timed steps per measurement")
    parser.add_argument("--backbones", default=",".join(list_backbones()), help="comma-separated names")
    parser.add_argument("--grey", default="resnet50", help="backbone for the grey-input comparison ('' = skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help=f"the smallest run ({QUICK}); overrides those flags")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} threads={torch.get_num_threads()} "
          f"size={args.size} batch={args.batch} steps={args.steps}")
    fast_label = "amp+channels_last" if cuda else "channels_last"
    print(f"{'backbone':<20}{'fp32 img/s':>12}{fast_label + ' img/s':>26}{'ratio':>8}")
    ratios = []
    for name in args.backbones.split(","):
        torch.manual_seed(0)
        base = train_step_rate(create_backbone(name), args.size, args.batch, args.steps, False, False, device)
        fast = train_step_rate(create_backbone(name), args.size, args.batch, args.steps, cuda, True, device)
        ratios.append(fast / base)
        print(f"{name:<20}{base:>12.1f}{fast:>26.1f}{fast / base:>8.2f}")
    if args.grey:
        grey_comparison(args.grey, args.size, args.batch, args.steps, device)
    mean_ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    if cuda:
        print(f"amp_speedup_x={mean_ratio:.2f}")
    else:
        print(f"CPU run: no AMP measured (CUDA only); channels_last/NCHW geometric mean x{mean_ratio:.2f}")
        print("amp_speedup_x=nan")


if __name__ == "__main__":
    main()
