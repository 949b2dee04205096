"""Interventions are data: what to change at a site, where (positions, heads), and with what.

Each intervention names a site (see :mod:`lmscope.sites`) and optionally restricts itself to
some positions (the token axis; for ``attn.pattern`` the query axis) and some heads (for per-head
sites). The hook engine applies them; a batched run applies many intervention sets at once.

Shapes: a site's activation for one batch of B prompts is ``(B, T, ...)``; values given to
:class:`Patch`, :class:`Add` and :class:`Ablate` must broadcast to it (for example a full
``(B, T, D)`` tensor from a clean run, or a ``(D,)`` steering vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmscope.errors import InputError
from lmscope.sites import Site, parse_site

Positions = int | Sequence[int] | None
Heads = int | Sequence[int] | None

_ABLATE_MODES = ("zero", "mean", "resample")


def _norm_index(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class _Base:
    site: Site | str
    positions: Positions = field(default=None, kw_only=True)
    heads: Heads = field(default=None, kw_only=True)

    def __post_init__(self):
        object.__setattr__(self, "site", parse_site(self.site))
        object.__setattr__(self, "positions", _norm_index(self.positions))
        object.__setattr__(self, "heads", _norm_index(self.heads))
        if self.heads is not None and not self.site.per_head:
            raise InputError(
                f"{type(self).__name__} on {self.site.name} restricts heads, but that site has no head "
                "axis. Use a per-head site (attn.z, attn.q/k/v, attn.pattern, attn.head_out)."
            )

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Patch(_Base):
    """Replace the activation with ``value`` (broadcast to the site's shape) where selected."""

    value: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.value, torch.Tensor):
            raise InputError(f"Patch on {self.site.name} needs value=<tensor>, e.g. from a clean run's cache.")

    def apply(self, x):
        return torch.where(_mask(self, x), _broadcast(self.value, x, self.site), x)


@dataclass(frozen=True, eq=False)
class Ablate(_Base):
    """Zero, mean or resample ablation.

    ``mode="mean"`` uses the mean over ``reference``'s first (batch) axis, or over the current batch
    when no reference is given. ``mode="resample"`` takes random rows of ``reference`` (seeded), or
    the other prompts of the current batch when none is given.
    """

    mode: str = "zero"
    reference: torch.Tensor | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in _ABLATE_MODES:
            raise InputError(f"Ablate mode {self.mode!r} is unknown; use one of {_ABLATE_MODES}.")

    def apply(self, x):
        if self.mode == "zero":
            repl = torch.zeros_like(x)
        elif self.mode == "mean":
            ref = x if self.reference is None else self.reference.to(x)
            repl = ref.mean(dim=0, keepdim=True).expand_as(x)
        else:
            if self.reference is None:
                if x.shape[0] < 2:
                    raise InputError("Resample ablation without a reference needs a batch of ≥ 2 prompts.")
                repl = x.roll(1, dims=0)
            else:
                g = torch.Generator().manual_seed(self.seed)
                rows = torch.randint(self.reference.shape[0], (x.shape[0],), generator=g)
                repl = self.reference[rows].to(x)
        return torch.where(_mask(self, x), repl, x)


@dataclass(frozen=True, eq=False)
class Add(_Base):
    """Add ``scale * vector`` (steering); the vector broadcasts to the site's shape."""

    vector: torch.Tensor | None = None
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.vector, torch.Tensor):
            raise InputError(f"Add on {self.site.name} needs vector=<tensor>.")

    def apply(self, x):
        delta = self.scale * _broadcast(self.vector, x, self.site)
        return x + torch.where(_mask(self, x), delta, torch.zeros_like(delta))


@dataclass(frozen=True, eq=False)
class Scale(_Base):
    """Multiply the activation by ``factor`` where selected."""

    factor: float = 0.0

    def apply(self, x):
        return torch.where(_mask(self, x), x * self.factor, x)


@dataclass(frozen=True, eq=False)
class Erase(_Base):
    """Remove the component along ``direction`` (D,) where selected (linear erasure of a direction)."""

    direction: torch.Tensor | None = None

    def __post_init__(self):
        super().__post_init__()
        d = self.direction
        if not isinstance(d, torch.Tensor) or d.ndim != 1 or not torch.isfinite(d).all() or d.norm() == 0:
            raise InputError(f"Erase on {self.site.name} needs direction=<a finite, non-zero (D,) tensor>.")
        object.__setattr__(self, "direction", d.float() / d.float().norm())

    def apply(self, x):
        u = _broadcast(self.direction, x, self.site)
        return torch.where(_mask(self, x), x - (x * u).sum(dim=-1, keepdim=True) * u, x)


@dataclass(frozen=True, eq=False)
class Knockout:
    """Block attention from query ``from_positions`` to key ``to_positions`` in ``layer``.

    The blocked scores are set to -inf before the softmax, so the rest renormalises.
    """

    layer: int
    from_positions: Positions = None
    to_positions: Positions = None
    heads: Heads = None

    def __post_init__(self):
        object.__setattr__(self, "from_positions", _norm_index(self.from_positions))
        object.__setattr__(self, "to_positions", _norm_index(self.to_positions))
        object.__setattr__(self, "heads", _norm_index(self.heads))

    @property
    def site(self) -> Site:
        return Site("attn.pattern", self.layer)

    def score_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean mask over scores (B, H, Tq, Tk): True where attention is knocked out."""
        _, h, tq, tk = scores.shape
        dev = scores.device
        m = torch.ones(1, h, tq, tk, dtype=torch.bool, device=dev)
        m = m & _axis_mask(self.heads, h, dev).view(1, h, 1, 1)
        m = m & _axis_mask(self.from_positions, tq, dev).view(1, 1, tq, 1)
        return m & _axis_mask(self.to_positions, tk, dev).view(1, 1, 1, tk)


Intervention = Patch | Ablate | Add | Scale | Erase | Knockout


def _broadcast(value: torch.Tensor, x: torch.Tensor, site: Site) -> torch.Tensor:
    """``value`` expanded to ``x``'s shape, or an error that says which shapes disagree."""
    try:
        return value.to(device=x.device, dtype=x.dtype).expand_as(x)
    except RuntimeError:
        raise InputError(
            f"A value of shape {tuple(value.shape)} does not fit site {site.name} of shape {tuple(x.shape)}. "
            "Patch values come from a run of prompts with the same number of tokens (check that clean and "
            "corrupted prompts tokenise to the same length); vectors must have the site's last dimension."
        ) from None


def _axis_mask(index: tuple[int, ...] | None, size: int, device) -> torch.Tensor:
    m = torch.zeros(size, dtype=torch.bool, device=device)
    if index is None:
        m[:] = True
        return m
    for i in index:
        if not -size <= i < size:
            raise InputError(f"Index {i} is out of range for an axis of length {size}.")
        m[i] = True
    return m


def _mask(iv: _Base, x: torch.Tensor) -> torch.Tensor:
    """Boolean mask broadcastable to ``x`` selecting the intervention's positions and heads."""
    shape = [1] * x.ndim
    pattern = iv.site.kind == "attn.pattern"
    pos_dim, head_dim = (2, 1) if pattern else (1, 2)
    m = torch.ones(shape, dtype=torch.bool, device=x.device)
    if iv.positions is not None:
        s = list(shape)
        s[pos_dim] = x.shape[pos_dim]
        m = m & _axis_mask(iv.positions, x.shape[pos_dim], x.device).view(s)
    if iv.heads is not None:
        s = list(shape)
        s[head_dim] = x.shape[head_dim]
        m = m & _axis_mask(iv.heads, x.shape[head_dim], x.device).view(s)
    return m
