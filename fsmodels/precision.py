"""True fp32 for the passes whose numbers are read: evaluation and the STN's theta.

On Ampere and newer GPUs cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa, about
1e-3 relative error), and a matmul may too when ``torch.set_float32_matmul_precision`` allows it.
Validation and test scores (selection, the leaderboard) and the STN's affine theta (a small shift
moves the sampled pixels) must be the fp32 numbers the exported model computes, so those passes
run inside ``true_fp32``; training keeps whatever TF32/bf16 the config and torch allow.
"""
from __future__ import annotations

import contextlib

import torch


def _controls() -> list:
    """The per-backend precision controls of this torch: the fp32_precision API (torch >= 2.9) or allow_tf32."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(conv, "fp32_precision"):
        return [(matmul, "fp32_precision", "ieee"), (conv, "fp32_precision", "ieee")]
    return [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]


def tf32_state() -> tuple:
    """The current (matmul, convolution) fp32 precision settings (for tests and benchmarks)."""
    return tuple(getattr(obj, name) for obj, name, _ in _controls())


@contextlib.contextmanager
def true_fp32():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block; the previous settings after it.

    The settings are process-wide flags read at each kernel launch, so the block covers exactly the
    calls made inside it. On the CPU they change nothing (CPU fp32 kernels never use TF32).
    """
    controls = _controls()
    saved = [getattr(obj, name) for obj, name, _ in controls]
    try:
        for obj, name, value in controls:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(controls, saved):
            setattr(obj, name, value)
