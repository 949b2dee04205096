"""Work reuse for batched intervention sets: layer-wise growing batches and prefix key/value reuse.

Two facts make patching sweeps cheaper than one forward per cell:

* **Layers below the patched one are unchanged.** A set whose lowest touched layer is l needs its
  own copy of the batch only from block l on. :class:`Expansion` describes a forward that starts
  with the b base rows and, at the input of chosen blocks, appends copies of the base rows (the
  unpatched stream at that depth), so every set joins the batch exactly where it starts to differ.
* **Positions before the first patched one are unchanged** (causal attention). A set whose
  interventions all sit at positions ≥ p only needs positions p..T−1 recomputed; the keys and values
  of positions < p in every layer are the base run's. :class:`Prefix` holds those keys/values (and
  each layer's full attention mask) from one capture run; a forward on tokens p..T−1 concatenates
  them in front of its own keys/values inside the lmscope attention function.

:func:`first_position` finds p for an intervention; :func:`shift` rewrites an intervention for a
forward that starts at position p (positions minus p, position-shaped values sliced). Keys,
values and the key axis of patterns keep their full length in such a forward (the prefix is
concatenated before they are read), so they are not shifted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from lmscope.interventions import Ablate, Add, Intervention, Knockout, Patch, Scale

# position axis of each site kind, counted from the right of the site's shape
_POS_FROM_RIGHT = {
    "embed": 2, "resid_pre": 2, "resid_mid": 2, "resid_post": 2, "attn_out": 2, "mlp_out": 2, "mlp.post": 2,
    "attn.q": 3, "attn.z": 3, "attn.head_out": 3, "attn.pattern": 2,
}
_FULL_LENGTH = ("attn.k", "attn.v")  # key-axis sites: full length in a prefix forward


@dataclass
class Expansion:
    """Grow a batch of ``b`` rows during one forward.

    ``spawns`` maps a block index to the number of copies of the base rows appended at that
    block's input. With ``keep_base=False`` there must be exactly one spawn and the base rows are
    replaced by the copies (set i then occupies rows i*b..(i+1)*b−1); with ``keep_base=True`` the
    base rows stay first and set i occupies rows (i+1)*b..(i+2)*b−1.
    """

    b: int
    spawns: dict[int, int]
    keep_base: bool = False

    @property
    def first(self) -> int:
        return min(self.spawns)

    @property
    def offset(self) -> int:
        return self.b if self.keep_base else 0


@dataclass
class Prefix:
    """Keys/values (per layer: (b, H_kv, T, dh), after RoPE) and attention masks of a base run,
    used for positions < ``start`` of a forward over positions ``start``..T−1."""

    start: int = 0
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None  # (b, T) padding mask of the base batch

    def at(self, start: int) -> Prefix:
        return Prefix(start, self.keys, self.values, self.masks, self.attention_mask)

    def kv(self, layer: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached keys/values of positions < start, repeated to ``rows`` rows."""
        k, v = self.keys[layer][:, :, : self.start], self.values[layer][:, :, : self.start]
        reps = rows // k.shape[0]
        return (k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1)) if reps > 1 else (k, v)

    def mask(self, layer: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The attention mask of query rows start..T−1 over all T keys, (rows or 1, 1, T−start, T)."""
        m = self.masks.get(layer)
        if m is None:
            t = self.attention_mask.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=self.attention_mask.device).tril()
            m = causal[None, None] & self.attention_mask.bool()[:, None, None, :]
        m = m[:, :, self.start:]
        if m.shape[0] > 1 and m.shape[0] != rows:
            m = m.repeat(rows // m.shape[0], 1, 1, 1)
        return m


def _norm(positions, t: int) -> list[int]:
    return [p % t for p in positions]


def first_position(iv: Intervention, t: int) -> int:
    """The lowest token position an intervention can change (0 when it touches every position)."""
    if isinstance(iv, Knockout):
        return 0 if iv.from_positions is None else min(_norm(iv.from_positions, t))
    if iv.site.kind in ("logits", "final.scale"):
        return 0
    return 0 if iv.positions is None else min(_norm(iv.positions, t))


def _slice_value(v: torch.Tensor | None, kind: str, start: int, t: int) -> torch.Tensor | None:
    if v is None or kind in _FULL_LENGTH:
        return v
    k = _POS_FROM_RIGHT[kind]
    if v.ndim >= k and v.shape[-k] == t and t > 1:
        return v.narrow(v.ndim - k, start, t - start)
    return v


def shift(iv: Intervention, start: int, t: int) -> Intervention:
    """``iv`` rewritten for a forward over positions start..T−1 (requires start ≤ first_position)."""
    if start == 0:
        return iv
    if isinstance(iv, Knockout):
        return dataclasses.replace(iv, from_positions=[p - start for p in _norm(iv.from_positions, t)])
    kind = iv.site.kind
    pos = None if iv.positions is None else [p - start for p in _norm(iv.positions, t)]
    if kind in _FULL_LENGTH:
        pos = iv.positions
    if isinstance(iv, Patch):
        return dataclasses.replace(iv, positions=pos, value=_slice_value(iv.value, kind, start, t))
    if isinstance(iv, Ablate):
        return dataclasses.replace(iv, positions=pos, reference=_slice_value(iv.reference, kind, start, t))
    if isinstance(iv, Add):
        return dataclasses.replace(iv, positions=pos, vector=_slice_value(iv.vector, kind, start, t))
    if isinstance(iv, Scale):
        return dataclasses.replace(iv, positions=pos)
    raise TypeError(f"Cannot shift {type(iv).__name__}")
