"""Site names: one grammar for every place in a model that can be read or intervened on.

Canonical names (shapes for a batch B of T tokens, S key positions (S = T in an ordinary forward),
H heads of width dh, residual width D, F neurons, V vocabulary):

=================================  ===========  ==============================================
``embed``                          B T D        token embedding as the first block sees it
``blocks.{l}.resid_pre|mid|post``  B T D        the residual stream
``blocks.{l}.attn.q``              B T H dh     per query head, after RoPE
``blocks.{l}.attn.k|v``            B S H dh     per query head (GQA keys/values expanded)
``blocks.{l}.attn.pattern``        B H T S      attention probabilities (query, key)
``blocks.{l}.attn.z``              B T H dh     per-head output before W_O
``blocks.{l}.attn.head_out``       B T H D      each head's write into the residual stream
``blocks.{l}.attn_out|mlp_out``    B T D        block writes (after post-norms where present)
``blocks.{l}.mlp.post``            B T F        neuron activations (input of the down projection)
``blocks.{l}.ssm.in|gate|conv``    B T E        Mamba: input projection halves, conv output (E channels)
``blocks.{l}.ssm.state``           B T E N      Mamba: recurrent state after each token
``blocks.{l}.ssm.out|y``           B T E        Mamba: scan output s, out_proj input s ⊙ SiLU(g)
``blocks.{l}.ssm_out``             B T D        Mamba: the mixer's write (out_proj output)
``blocks.{l}.wkv.r|k|v``           B T E        RWKV time mix: receptance σ(R x_r), keys, values
``blocks.{l}.wkv.state``           B T E N      RWKV: WKV state (numerator a, denominator b; N = 2)
``blocks.{l}.wkv.out|y``           B T E        RWKV: the WKV output, output-projection input r ⊙ wkv
``blocks.{l}.wkv_out``             B T D        RWKV: the time mix's write (output projection's output)
``final.scale``                    B T 1        the final norm's scale 1/s (frozen for DLA)
``logits``                         B T V        the model's logits (after any final soft-cap)
=================================  ===========  ==============================================

TransformerLens-style names (``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_z``, ``hook_embed``,
``ln_final.hook_scale``, ...) are accepted as aliases.

:data:`KINDS` is the one table of site kinds: name, TransformerLens alias, axes (from which the
shape, the width of one token's vector, the position axis and the head axis follow) and the
adapter part a model needs to have the site (see :mod:`lmscope.models.parts`). Every other module
derives what it needs from it.

Layer, head and position indices are checked in one place (:func:`resolve_layers`,
:func:`resolve_heads`, :func:`resolve_positions`, and :func:`resolve_count` for "top k" counts):
negative numbers count from the end, and anything outside the model or the prompt raises
:class:`~lmscope.errors.RangeError` naming the valid range; nothing is wrapped around silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from collections.abc import Iterable

from lmscope.errors import RangeError, SiteError

# axis symbol -> ModelSpec field giving its size (B, T and S come from the batch)
_SPEC_AXES = {"D": "d_model", "H": "n_heads", "dh": "d_head", "F": "d_mlp", "V": "d_vocab", "E": "d_inner",
              "N": "d_state"}
POSITION_AXES = ("T", "S")


@dataclass(frozen=True)
class SiteKind:
    """One kind of site.

    ``axes``: axis symbols, B batch, T query/token positions, S key positions, H heads, dh head
    width, D residual width, F neurons, V vocabulary, "1" a singleton.
    ``part``: the adapter part the model needs for the site to exist ("embedding", "block",
    "attention", "mlp", "final_norm", "unembedding"; see :data:`lmscope.models.parts.PARTS`).
    """

    name: str
    tl: str  # TransformerLens hook name (relative to ``blocks.{l}.`` for layer kinds)
    axes: tuple[str, ...]
    part: str
    layer: bool = True
    short: tuple[str, ...] = ()  # further accepted spellings (layer kinds)
    doc: str = ""

    def shape(self, spec, b: int, t: int) -> tuple[int, ...]:
        """The shape of the site for a batch of ``b`` prompts of ``t`` tokens on a model with ``spec``."""
        sizes = {"B": b, "T": t, "S": t, "1": 1}
        return tuple(sizes[a] if a in sizes else getattr(spec, _SPEC_AXES[a]) for a in self.axes)

    def width(self, spec) -> int:
        """Size of one token's vector (every axis but batch and position, flattened)."""
        return math.prod(1 if a == "1" else getattr(spec, _SPEC_AXES[a])
                         for a in self.axes if a not in ("B", *POSITION_AXES))

    @property
    def pos_axis(self) -> int:
        """Index of the token (query) axis, or of the key axis for key-side sites."""
        return self.axes.index("T") if "T" in self.axes else self.axes.index("S")

    @property
    def key_side(self) -> bool:
        """The position axis is the key axis (full length in a forward that reuses a prefix)."""
        return "T" not in self.axes

    @property
    def per_token(self) -> bool:
        """One vector per token (exactly one position axis)."""
        return sum(a in POSITION_AXES for a in self.axes) == 1

    @property
    def head_axis(self) -> int | None:
        return self.axes.index("H") if "H" in self.axes else None


def _k(name, tl, axes, part, **kw) -> SiteKind:
    return SiteKind(name, tl, tuple(axes.split()), part, **kw)


KINDS: dict[str, SiteKind] = {k.name: k for k in (
    _k("embed", "hook_embed", "B T D", "embedding", layer=False, doc="token embedding as block 0 sees it"),
    _k("resid_pre", "hook_resid_pre", "B T D", "block", doc="residual stream into the block"),
    _k("resid_mid", "hook_resid_mid", "B T D", "attention", doc="residual stream after the mixer's write"),
    _k("resid_post", "hook_resid_post", "B T D", "block", doc="residual stream out of the block"),
    _k("attn.q", "attn.hook_q", "B T H dh", "attention", short=("q",), doc="queries after RoPE"),
    _k("attn.k", "attn.hook_k", "B S H dh", "attention", short=("k",), doc="keys, KV heads expanded"),
    _k("attn.v", "attn.hook_v", "B S H dh", "attention", short=("v",), doc="values, KV heads expanded"),
    _k("attn.pattern", "attn.hook_pattern", "B H T S", "attention", short=("pattern",),
       doc="attention probabilities"),
    _k("attn.z", "attn.hook_z", "B T H dh", "attention", short=("z",), doc="per-head output before W_O"),
    _k("attn.head_out", "attn.hook_result", "B T H D", "attention", short=("head_out", "result"),
       doc="each head's write"),
    _k("attn_out", "hook_attn_out", "B T D", "attention", doc="the attention block's write"),
    _k("mlp_out", "hook_mlp_out", "B T D", "mlp", doc="the MLP's write"),
    _k("mlp.post", "mlp.hook_post", "B T F", "mlp", short=("post",), doc="neuron activations"),
    # state-space mixer (Mamba): E inner channels, N state size per channel
    _k("ssm.in", "ssm.hook_in", "B T E", "ssm", doc="conv-branch half of the input projection (W_a x)"),
    _k("ssm.gate", "ssm.hook_gate", "B T E", "ssm", short=("gate",), doc="gate half of the input projection "
       "(g = W_g x, before SiLU)"),
    _k("ssm.conv", "ssm.hook_conv", "B T E", "ssm", short=("conv",), doc="SiLU of the causal convolution: the "
       "scan's input u"),
    _k("ssm.state", "ssm.hook_state", "B T E N", "ssm", short=("state",), doc="recurrent state h after each token"),
    _k("ssm.out", "ssm.hook_out", "B T E", "ssm", doc="scan output s = C·h + D·u, before the gate"),
    _k("ssm.y", "ssm.hook_y", "B T E", "ssm", doc="out_proj input s ⊙ SiLU(g)"),
    _k("ssm_out", "hook_ssm_out", "B T D", "ssm", doc="the state-space mixer's write (out_proj output)"),
    # RWKV's time-mixing (WKV) mixer: E channels, a state of N = 2 (numerator, denominator) per channel
    _k("wkv.r", "wkv.hook_r", "B T E", "wkv", doc="receptance σ(R x_r), the gate of the WKV output"),
    _k("wkv.k", "wkv.hook_k", "B T E", "wkv", doc="keys k = K x_k"),
    _k("wkv.v", "wkv.hook_v", "B T E", "wkv", doc="values v = V x_v"),
    _k("wkv.state", "wkv.hook_state", "B T E N", "wkv", doc="WKV state (a, b) after each token: "
       "a_t = e^−w a_{t−1} + e^k_t v_t, b_t = e^−w b_{t−1} + e^k_t"),
    _k("wkv.out", "wkv.hook_out", "B T E", "wkv", doc="WKV output (a_{t−1} + e^{u+k_t} v_t) / (b_{t−1} + e^{u+k_t})"),
    _k("wkv.y", "wkv.hook_y", "B T E", "wkv", doc="output-projection input r ⊙ wkv"),
    _k("wkv_out", "hook_wkv_out", "B T D", "wkv", doc="the time mix's write (output projection's output)"),
    _k("final.scale", "ln_final.hook_scale", "B T 1", "final_norm", layer=False, doc="final norm's 1/s"),
    _k("logits", "logits", "B T V", "unembedding", layer=False, doc="the logits"),
)}

LAYER_KINDS = tuple(k.name for k in KINDS.values() if k.layer)
GLOBAL_KINDS = tuple(k.name for k in KINDS.values() if not k.layer)
HEAD_KINDS = tuple(k.name for k in KINDS.values() if k.head_axis is not None)
ATTN_INNER_KINDS = ("attn.q", "attn.k", "attn.v", "attn.pattern")  # need the explicit attention path
SSM_INNER_KINDS = ("ssm.in", "ssm.gate", "ssm.conv", "ssm.state", "ssm.out", "ssm.y")  # need the explicit scan
WKV_INNER_KINDS = ("wkv.r", "wkv.k", "wkv.v", "wkv.state", "wkv.out", "wkv.y")  # from RWKV's explicit time mix

_ALIASES = {alias: k.name for k in KINDS.values() if k.layer for alias in (k.tl, *k.short)}
_GLOBAL_ALIASES = {alias: k.name for k in KINDS.values() if not k.layer for alias in (k.tl, k.name)}
_LAYER_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


def tl_name(site: Site) -> str:
    """TransformerLens-style hook name of a parsed site (``blocks.3.attn.z`` -> ``blocks.3.attn.hook_z``)."""
    tl = KINDS[site.kind].tl
    return tl if site.layer is None else f"blocks.{site.layer}.{tl}"


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

    @property
    def spec(self) -> SiteKind:
        return KINDS[self.kind]

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
