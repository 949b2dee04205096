"""Norm arithmetic shared by the hook engine and the decompositions: the scale 1/s of a norm, its
gain and bias, and a norm applied with its scale frozen (linear in its input).

Norm kinds: ``"rms"`` (RMSNorm), ``"rms_offset"`` (Gemma: the weight w multiplies as 1 + w) and
``"layer"`` (LayerNorm: centred, with a bias).
"""

from __future__ import annotations

import torch
from torch import nn

from lmscope.errors import UnsupportedArchitectureError

NORM_KINDS = ("rms", "rms_offset", "layer")


def norm_eps(module: nn.Module) -> float:
    """The epsilon of a norm module (HF RMSNorms call it ``variance_epsilon``, torch norms ``eps``)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    raise UnsupportedArchitectureError(f"Cannot find the epsilon of norm module {type(module).__name__}.")


def norm_scale(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """1/s of a norm for input ``x`` (..., D) -> (..., 1): the factor a frozen-scale decomposition uses."""
    x = x.float()
    if kind == "layer":
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return torch.rsqrt(var + eps)
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def norm_gain(module: nn.Module, kind: str) -> torch.Tensor:
    """The multiplicative gain of a norm module (Gemma stores w and multiplies by 1 + w)."""
    w = module.weight.float()
    return 1.0 + w if kind == "rms_offset" else w


def norm_bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.float()


def apply_frozen_norm(c: torch.Tensor, scale: torch.Tensor, module: nn.Module, kind: str) -> torch.Tensor:
    """Map a component ``c`` (..., D) through a norm with its scale frozen (no bias): linear in ``c``
    (the norm's weight is read detached: nothing flows back into the model)."""
    c = c.float()
    if kind == "layer":
        c = c - c.mean(dim=-1, keepdim=True)
    return c * scale * norm_gain(module, kind).detach()
