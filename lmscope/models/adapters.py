"""Architecture adapters: one declarative entry per family, mapping canonical sites to HF modules.

An adapter names, for one architecture family, the modules the hook engine attaches to and the
weight layout needed for per-head and per-neuron views. Nothing here runs a forward pass; the
native Hugging Face model always does that. A model whose ``config.model_type`` is in no adapter
gets an :class:`UnsupportedArchitectureError` naming the supported families; nothing is guessed.

Module paths are dotted attribute paths: global ones relative to the ``*ForCausalLM`` model, block
ones relative to a decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmscope.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    # global modules
    embed: str
    layers: str
    final_norm: str
    unembed: str
    # block modules
    attn: str  # the attention module (its output is the attention write before any post-norm)
    o_proj: str  # output projection: its input is z, its output the summed head writes
    mlp: str
    mlp_down: str  # down projection: its input is mlp.post
    attn_write: str  # module whose output is added to the residual stream (attention)
    mlp_write: str  # same, for the MLP
    # layout
    norm_kind: str  # "rms", "rms_offset" (Gemma: weight is 1 + w) or "layer"
    linear: str = "linear"  # "linear" (weight is out x in) or "conv1d" (GPT-2: in x out)
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv: str | None = None  # fused projection
    qkv_layout: str | None = None  # "blocks" (GPT-2: [q|k|v]) or "per_head" (NeoX: per head [q|k|v])
    pos_embed: str | None = None
    parallel_flag: str | None = None  # config attribute that says attention and MLP run in parallel
    post_norms: bool = False  # attention and MLP writes pass through their own norms (Gemma 2/3)
    attn_norm: str = "input_layernorm"  # block module: the norm applied to the attention's input
    # config attributes holding the soft-caps c (x -> c·tanh(x / c)) of the final logits and of the
    # attention scores; None: no soft-cap. (The forward gets the attention soft-cap from transformers;
    # the entry serves read-outs that recompute scores from q and k.)
    logit_softcap: str | None = None
    attn_softcap: str | None = None


_LLAMA_LIKE = dict(
    embed="model.embed_tokens", layers="model.layers", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp", mlp_down="mlp.down_proj",
    attn_write="self_attn", mlp_write="mlp",
    q_proj="self_attn.q_proj", k_proj="self_attn.k_proj", v_proj="self_attn.v_proj",
)

ADAPTERS: tuple[Adapter, ...] = (
    Adapter(family="llama", model_types=("llama", "mistral", "qwen2", "smollm3"), norm_kind="rms",
            **_LLAMA_LIKE),
    Adapter(family="gemma3", model_types=("gemma3_text", "gemma2"), norm_kind="rms_offset",
            post_norms=True, logit_softcap="final_logit_softcapping", attn_softcap="attn_logit_softcapping",
            **{**_LLAMA_LIKE, "attn_write": "post_attention_layernorm",
               "mlp_write": "post_feedforward_layernorm"}),
    Adapter(family="gpt2", model_types=("gpt2",), norm_kind="layer", linear="conv1d",
            embed="transformer.wte", pos_embed="transformer.wpe", layers="transformer.h",
            final_norm="transformer.ln_f", unembed="lm_head", attn="attn", o_proj="attn.c_proj",
            mlp="mlp", mlp_down="mlp.c_proj", attn_write="attn", mlp_write="mlp",
            qkv="attn.c_attn", qkv_layout="blocks", attn_norm="ln_1"),
    Adapter(family="gpt-neox", model_types=("gpt_neox",), norm_kind="layer",
            embed="gpt_neox.embed_in", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head", attn="attention", o_proj="attention.dense", mlp="mlp",
            mlp_down="mlp.dense_4h_to_h", attn_write="attention", mlp_write="mlp",
            qkv="attention.query_key_value",
            qkv_layout="per_head", parallel_flag="use_parallel_residual"),
)


def adapter_for(config) -> Adapter:
    """The adapter for a HF config, or an error that names the supported families."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedArchitectureError(
        f"lmscope has no adapter for model_type {model_type!r}. Supported: {supported}. "
        "To add one, write an Adapter entry in lmscope/models/adapters.py naming the module paths."
    )


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def linear_weight(module: nn.Module, linear: str) -> torch.Tensor:
    """The weight as (in, out), whatever the layer's storage convention."""
    return module.weight.T if linear == "linear" else module.weight


def norm_eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(module, name):
            return float(getattr(module, name))
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
    """Map a component ``c`` (..., D) through a norm with its scale frozen (no bias): linear in ``c``."""
    c = c.float()
    if kind == "layer":
        c = c - c.mean(dim=-1, keepdim=True)
    return c * scale * norm_gain(module, kind)
