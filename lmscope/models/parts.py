"""The parts an architecture adapter is built from.

An :class:`Adapter` describes one architecture family by composition: the token :class:`Embedding`;
a :class:`Block` made of a *mixer* (:class:`Attention`, or the selective state-space mixer
:class:`StateSpace` of Mamba, or :class:`StateSpace2` of Mamba-2, or RWKV's time mixing :class:`TimeMix`), an
optional :class:`MLP` and its :class:`Norms`; the :class:`Final` norm, unembedding
and soft-cap; and the :class:`ConfigFields`, the HF config field names read once per family.
Module paths are dotted attribute paths: global ones relative to the ``*ForCausalLM`` model,
block ones relative to a decoder block.

The parts a model has decide which site kinds it has (each kind in :data:`lmscope.sites.KINDS`
names the part it needs): a model without an MLP part has no ``mlp_out`` or ``mlp.post``.
Nothing here runs a forward pass; the native Hugging Face model always does that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lmscope.errors import SiteError, UnsupportedArchitectureError
from lmscope.models.norms import NORM_KINDS
from lmscope.sites import KINDS, Site, parse_site

PARTS = ("embedding", "block", "attention", "ssm", "wkv", "mlp", "final_norm", "unembedding")


@dataclass(frozen=True)
class ConfigFields:
    """HF config field names, named once per family (None: the family has no such field).

    ``n_kv_heads`` None means as many key/value heads as query heads. ``norm_kind`` names a config
    field that chooses the norm kind, for families that let the config choose.
    """

    d_model: str = "hidden_size"
    n_heads: str | None = "num_attention_heads"  # None: no attention heads (a state-space model)
    n_kv_heads: str | None = "num_key_value_heads"
    n_ctx: str | None = "max_position_embeddings"  # None: no context limit (a recurrent model)
    parallel: str | None = None  # attention and MLP read the same residual (GPT-NeoX, GPT-J)
    softcap: str | None = None  # final-logit soft-cap c: logits = c·tanh(z / c)
    attn_softcap: str | None = None  # attention-score soft-cap (the forward gets it from transformers;
    # read-outs that recompute scores from q and k need it)
    sliding_window: str | None = None
    norm_kind: str | None = None


@dataclass(frozen=True)
class Embedding:
    tokens: str  # the token-embedding module
    positions: str | None = None  # absolute position embedding (GPT-2)
    norm: str | None = None  # a norm the first block applies to the embeddings (RWKV's pre_ln; path relative
    # to block 0): the residual stream (``embed``, ``blocks.0.resid_pre``) starts after it


@dataclass(frozen=True)
class Attention:
    """Attention mixer: either separate q/k/v projections or one fused ``qkv`` projection.

    ``qkv_layout``: "blocks" (GPT-2: [q|k|v] over all heads) or "per_head" (NeoX: [q|k|v] per head).
    """

    module: str  # its output is the attention write before any post-norm
    o_proj: str  # output projection: its input is z, its output the summed head writes
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv: str | None = None
    qkv_layout: str | None = None
    part = "attention"
    write_kind = "attn_out"  # the site kind of the mixer's write

    def __post_init__(self):
        separate = None not in (self.q_proj, self.k_proj, self.v_proj)
        fused = self.qkv is not None and self.qkv_layout in ("blocks", "per_head")
        if separate == fused:
            raise ValueError("Attention needs q_proj/k_proj/v_proj, or qkv with qkv_layout 'blocks' or "
                             "'per_head', not both.")


@dataclass(frozen=True)
class StateSpace:
    """Selective state-space mixer (Mamba; Gu and Dao 2023), paths relative to the block.

    ``in_proj`` maps x to [x_a | g] (2E); ``conv`` is the depthwise causal convolution over x_a
    (width K); ``x_proj`` gives the selective [Δ_rank | B | C] from the conv output u;
    ``dt_proj`` lifts Δ to E channels; ``A_log`` and ``D`` are parameters of ``module``;
    ``out_proj`` maps s ⊙ SiLU(g) back to D. Its write is ``module``'s output. ``selective_norms``: the
    mixer's own norms of Δ_rank, B and C (paths relative to ``module``), applied to the ``x_proj``
    output before Δ is lifted (Falcon-Mamba's weightless RMS norms); None for plain Mamba.
    """

    module: str
    in_proj: str
    conv: str
    x_proj: str
    dt_proj: str
    out_proj: str
    selective_norms: tuple[str, str, str] | None = None
    part = "ssm"
    write_kind = "ssm_out"
    scan = "mamba"  # which explicit path (lmscope.models.ssm.EXPLICIT) computes its inner sites


@dataclass(frozen=True)
class StateSpace2:
    """Mamba-2's state-space mixer (SSD; Dao and Gu 2024), paths relative to the block.

    ``in_proj`` maps x to [g | x_a, B, C | Δ] (E, E + 2·G·N, H); ``conv`` is the depthwise causal
    convolution over [x_a, B, C]; Δ (one per head), ``A_log`` (one per head), ``dt_bias`` and ``D``
    are parameters of ``module``; ``norm`` is the gated RMS norm that makes the ``out_proj`` input
    ``norm(s ⊙ SiLU(g))`` (grouped, with a weight). Its write is ``module``'s output.
    """

    module: str
    in_proj: str
    conv: str
    norm: str
    out_proj: str
    part = "ssm"
    write_kind = "ssm_out"
    scan = "mamba2"


@dataclass(frozen=True)
class TimeMix:
    """RWKV's time-mixing (WKV) mixer (Peng et al. 2023, RWKV-4), paths relative to the block.

    With x the pre-mixer norm's output and x' the previous token's (token shift; zero before the first),
    ``r = σ(receptance(μ_r x + (1 − μ_r) x'))``, ``k = key(μ_k x + ...)``, ``v = value(μ_v x + ...)``; the WKV
    recurrence with per-channel decay w = exp(time_decay) and bonus u = time_first of ``module`` gives
    ``wkv_t = (a_{t−1} + e^{u + k_t} v_t) / (b_{t−1} + e^{u + k_t})``, ``a_t = e^{−w} a_{t−1} + e^{k_t} v_t``,
    ``b_t = e^{−w} b_{t−1} + e^{k_t}``; the write is ``output(r ⊙ wkv)``, ``module``'s output (see
    :mod:`lmscope.models.wkv`).
    """

    module: str
    receptance: str
    key: str
    value: str
    output: str
    part = "wkv"
    write_kind = "wkv_out"
    scan = "wkv"


@dataclass(frozen=True)
class MLP:
    module: str  # its output is the MLP write before any post-norm
    down: str  # down projection: its input is mlp.post
    gate: str | None = None  # a module whose sigmoid multiplies the down projection's output (RWKV's channel
    # mix: write = σ(gate(x)) ⊙ down(post)); per-neuron terms then carry that factor, frozen at its value in the run


@dataclass(frozen=True)
class Norms:
    """The block's norms (block-relative paths) and the norm kind of the model."""

    kind: str  # "rms", "rms_offset" (Gemma: weight is 1 + w) or "layer"
    pre_mixer: str
    pre_mlp: str | None = None
    post_mixer: str | None = None  # Gemma 2/3: the mixer's write passes through its own norm
    post_mlp: str | None = None

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"Norm kind {self.kind!r}: use one of {NORM_KINDS}.")
        if (self.post_mixer is None) != (self.post_mlp is None) and self.pre_mlp is not None:
            raise ValueError("Give both post-norms (after the mixer and after the MLP) or neither.")


@dataclass(frozen=True)
class Block:
    mixer: Attention | StateSpace | StateSpace2 | TimeMix
    norms: Norms
    mlp: MLP | None = None

    def __post_init__(self):
        if (self.mlp is None) != (self.norms.pre_mlp is None):
            raise ValueError("A block with an MLP names its pre-MLP norm; a block without one names none.")

    @property
    def post_norms(self) -> bool:
        return self.norms.post_mixer is not None

    @property
    def mixer_write(self) -> str:
        """The module whose output the mixer adds to the residual stream."""
        return self.norms.post_mixer or self.mixer.module

    @property
    def mlp_write(self) -> str | None:
        if self.mlp is None:
            return None
        return self.norms.post_mlp or self.mlp.module


@dataclass(frozen=True)
class Final:
    norm: str
    unembed: str


@dataclass(frozen=True)
class Adapter:
    """One architecture family, composed of parts. ``linear``: "linear" (weight out x in) or
    "conv1d" (GPT-2: in x out)."""

    family: str
    model_types: tuple[str, ...]
    embedding: Embedding
    layers: str  # the ModuleList of blocks
    block: Block
    final: Final
    config: ConfigFields = ConfigFields()
    linear: str = "linear"
    source: str = ""  # the file that defines the family (for error messages)

    @property
    def parts(self) -> frozenset[str]:
        """The parts this adapter has (names from :data:`PARTS`)."""
        have = {"embedding", "block", "final_norm", "unembedding", self.block.mixer.part}
        if self.block.mlp is not None:
            have.add("mlp")
        return frozenset(have)

    def for_config(self, config) -> Adapter:
        """This adapter with config-chosen details (the norm kind) resolved."""
        if self.config.norm_kind is None:
            return self
        kind = config_field(config, self.config.norm_kind, self)
        return dataclasses.replace(self, block=dataclasses.replace(
            self.block, norms=dataclasses.replace(self.block.norms, kind=kind)))


def _has_part_for(adapter: Adapter, kind: str) -> bool:
    """Whether ``adapter`` has the part site ``kind`` needs. ``resid_mid`` (the stream between the mixer's write and
    the MLP's) belongs to the attention part, and also exists where another mixer is followed by an MLP (RWKV)."""
    return KINDS[kind].part in adapter.parts or (kind == "resid_mid" and adapter.block.mlp is not None)


def site_kinds(adapter: Adapter, parallel: bool) -> tuple[str, ...]:
    """The site kinds a model built from ``adapter`` has (no resid_mid when blocks run in parallel)."""
    return tuple(k.name for k in KINDS.values() if _has_part_for(adapter, k.name)
                 and not (k.name == "resid_mid" and parallel))


def require_kinds(adapter: Adapter, parallel: bool, name: str, kinds, method: str | None = None) -> None:
    """Raise unless a model ``name`` built from ``adapter`` has every site kind in ``kinds`` (see
    :meth:`lmscope.models.Model.require`)."""
    who = method or "This run"
    for item in kinds:
        kind = item.kind if isinstance(item, Site) else (item if item in KINDS else parse_site(item).kind)
        if kind == "resid_mid" and parallel:
            raise SiteError(f"{who} needs resid_mid, but {name} runs attention and MLP in parallel, so it has no "
                            "resid_mid; use resid_pre, attn_out or mlp_out.")
        part = KINDS[kind].part
        if not _has_part_for(adapter, kind):
            block = adapter.block
            what = f"{block.mixer.part}" + (" + mlp" if block.mlp is not None else " only")
            raise UnsupportedArchitectureError(
                f"{who} needs {kind}, which needs the {part} part; {name} ({adapter.family}) has no {part}: its "
                f"blocks are {what}. Use a method or site that reads only what it has: "
                f"{', '.join(site_kinds(adapter, parallel))}.")


def config_field(config, name: str, adapter: Adapter):
    """The value of config field ``name``; an error naming the family file if the config lacks it."""
    if not hasattr(config, name):
        raise UnsupportedArchitectureError(
            f"The {adapter.family} adapter reads config field {name!r}, which this "
            f"{type(config).__name__} lacks. Fix the field name in {adapter.source or 'its family file'}.")
    return getattr(config, name)


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def linear_weight(module: nn.Module, linear: str) -> torch.Tensor:
    """The weight as (in, out), whatever the layer's storage convention."""
    return module.weight.T if linear == "linear" else module.weight
