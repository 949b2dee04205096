"""Site names: one grammar for every place in a model that can be read or intervened on.

Canonical names (shapes for a batch B of T tokens, H heads of width dh, residual width D, F neurons):

=================================  ===========  ==============================================
``embed``                          B T D        token embedding as the first block sees it
``blocks.{l}.resid_pre|mid|post``  B T D        the residual stream
``blocks.{l}.attn.q|k|v``          B T H dh     per query head (GQA keys/values expanded), after RoPE
``blocks.{l}.attn.pattern``        B H T T      attention probabilities (query, key)
``blocks.{l}.attn.z``              B T H dh     per-head output before W_O
``blocks.{l}.attn.head_out``       B T H D      each head's write into the residual stream
``blocks.{l}.attn_out|mlp_out``    B T D        block writes (after post-norms where present)
``blocks.{l}.mlp.post``            B T F        neuron activations (input of the down projection)
``final.scale``                    B T 1        the final norm's scale 1/s (frozen for DLA)
``logits``                         B T V        the logits
=================================  ===========  ==============================================

TransformerLens-style names (``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_z``, ``hook_embed``,
``ln_final.hook_scale``, ...) are accepted as aliases.

Layer, head and position indices are checked in one place (:func:`resolve_layers`,
:func:`resolve_heads`, :func:`resolve_positions`, and :func:`resolve_count` for "top k" counts):
negative numbers count from the end, and anything outside the model or the prompt raises
:class:`~lmscope.errors.RangeError` naming the valid range; nothing is wrapped around silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from collections.abc import Iterable

from lmscope.errors import RangeError, SiteError

LAYER_KINDS = (
    "resid_pre", "resid_mid", "resid_post",
    "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.head_out",
    "attn_out", "mlp_out", "mlp.post",
)
GLOBAL_KINDS = ("embed", "final.scale", "logits")
HEAD_KINDS = ("attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.head_out")
ATTN_INNER_KINDS = ("attn.q", "attn.k", "attn.v", "attn.pattern")

_ALIASES = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "attn.hook_q": "attn.q", "attn.hook_k": "attn.k", "attn.hook_v": "attn.v",
    "attn.hook_pattern": "attn.pattern", "attn.hook_z": "attn.z", "attn.hook_result": "attn.head_out",
    "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out", "mlp.hook_post": "mlp.post",
    # short forms
    "q": "attn.q", "k": "attn.k", "v": "attn.v", "pattern": "attn.pattern", "z": "attn.z",
    "head_out": "attn.head_out", "result": "attn.head_out", "post": "mlp.post",
}
_GLOBAL_ALIASES = {
    "hook_embed": "embed", "embed": "embed", "ln_final.hook_scale": "final.scale",
    "final.scale": "final.scale", "logits": "logits",
}
_LAYER_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site: ``kind`` is one of LAYER_KINDS or GLOBAL_KINDS; ``layer`` is None for globals."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    @property
    def per_head(self) -> bool:
        return self.kind in HEAD_KINDS

    def __str__(self) -> str:
        return self.name


def parse_site(name: str | Site, n_layers: int | None = None) -> Site:
    """Parse a site name (canonical or TransformerLens alias); check the layer if ``n_layers`` is given.

    Negative layers count from the end (``blocks.-1.resid_post`` is the last block's output).
    """
    if isinstance(name, Site):
        site = name
    else:
        text = name.strip()
        if text in _GLOBAL_ALIASES:
            return Site(_GLOBAL_ALIASES[text])
        m = _LAYER_RE.match(text)
        if not m:
            raise SiteError(
                f"Cannot parse site {name!r}. Use 'embed', 'logits', 'final.scale' or "
                f"'blocks.<layer>.<kind>' with kind one of: {', '.join(LAYER_KINDS)}."
            )
        kind = _ALIASES.get(m.group(2), m.group(2))
        if kind not in LAYER_KINDS:
            raise SiteError(
                f"Unknown site kind {m.group(2)!r} in {name!r}. Valid kinds: {', '.join(LAYER_KINDS)}."
            )
        site = Site(kind, int(m.group(1)))
    if site.layer is not None and n_layers is not None:
        site = Site(site.kind, resolve_index(site.layer, n_layers, "layer", context=f" in {site.name!r}"))
    return site


def resolve_index(index: int, size: int, what: str, owner: str = "the model", context: str = "",
                  unit: str | None = None) -> int:
    """``index`` (negative counts from the end) as 0..size-1; RangeError naming the valid range otherwise.

    The message reads "<What> <index> is out of range<context>: <owner> has <size> <unit> (0..size-1; ...)",
    ``unit`` defaulting to ``what`` + "s".
    """
    try:
        whole = not isinstance(index, bool) and int(index) == index
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise RangeError(f"{what.capitalize()} {index!r} is not an integer; give a {what} index.")
    index = int(index)
    if not -size <= index < size:
        valid = f"0..{size - 1}; negative numbers count from the end" if size else "there is none"
        raise RangeError(f"{what.capitalize()} {index} is out of range{context}: {owner} has {size} "
                         f"{unit or what + 's'} ({valid}). Give a {what} in that range.")
    return index % size


def _indices(values: int | Iterable[int] | None, size: int, what: str, owner: str = "the model",
             unit: str | None = None) -> list[int]:
    if values is None:
        return list(range(size))
    items = [values] if isinstance(values, int) else list(values)
    if not items:
        raise RangeError(f"Give at least one {what} (or none at all for every {what}).")
    return [resolve_index(v, size, what, owner, unit=unit) for v in items]


def resolve_layers(layers: int | Iterable[int] | None, n_layers: int) -> list[int]:
    """Layer indices 0..n_layers-1 (None: every layer); out of range raises RangeError."""
    return _indices(layers, n_layers, "layer")


def resolve_heads(heads: int | Iterable[int] | None, n_heads: int) -> list[int]:
    """Head indices 0..n_heads-1 (None: every head); out of range raises RangeError."""
    return _indices(heads, n_heads, "head")


def resolve_positions(positions: int | Iterable[int] | None, n_tokens: int) -> list[int]:
    """Token positions 0..n_tokens-1 (None: every position); out of range raises RangeError."""
    return _indices(positions, n_tokens, "position", "the prompt", "tokens")


def resolve_position(position: int | None, n_tokens: int) -> int:
    """One token position (None: the last one); out of range raises RangeError."""
    if position is None:
        return n_tokens - 1
    return resolve_index(position, n_tokens, "position", "the prompt", unit="tokens")


def resolve_count(k: int, limit: int, what: str) -> int:
    """A count of items to show or take, e.g. the top k tokens: 1..limit, else RangeError."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise RangeError(f"{k!r} {what}: give a whole number from 1 to {limit}.")
    return k


def site_names(kind: str, n_layers: int, layers: list[int] | None = None) -> list[str]:
    """All names of one kind over the given layers (default: every layer)."""
    return [f"blocks.{layer}.{kind}" for layer in (range(n_layers) if layers is None else layers)]
