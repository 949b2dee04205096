"""Reading the native model's weights: the model's spec, and q/k/v weights in a per-head layout (fused
projections split, grouped key/value heads expanded to query heads). ``Model``'s weight views call these.

Shapes: D residual width, H query heads of width dh.
"""

from __future__ import annotations

import torch

from lmscope.models.batch import ModelSpec
from lmscope.models.parts import config_field, get_module, linear_weight


def _cap(value) -> float | None:
    """A soft-cap from the config: None or 0 mean none."""
    return float(value) if value else None


NO_CONTEXT_LIMIT = 1 << 20  # n_ctx of a recurrent model, whose config names no context length


def make_spec(model) -> ModelSpec:
    """The spec of a model: config fields named once by its adapter, widths read from its weights."""
    c, a = model.hf.config, model.adapter
    f = a.config

    def read(name: str | None, default=None):
        return default if name is None else config_field(c, name, a)

    n_heads = read(f.n_heads, 0)
    part = a.block.mixer.part
    d_head = 0 if part != "attention" else \
        linear_weight(get_module(model.block(0), a.block.mixer.o_proj), a.linear).shape[0] // n_heads
    # a state-space mixer: E channels and a state of N per channel (Mamba's and Mamba-2's mixers name both);
    # RWKV's time mix: E channels (its key projection's width), a state of two (numerator, denominator) per channel
    mixer = get_module(model.block(0), a.block.mixer.module) if part != "attention" else None
    d_inner, d_state = (int(mixer.intermediate_size), int(mixer.ssm_state_size)) if part == "ssm" else \
        (linear_weight(get_module(model.block(0), a.block.mixer.key), a.linear).shape[1], 2) if part == "wkv" else (0, 0)
    d_mlp = 0 if a.block.mlp is None else linear_weight(get_module(model.block(0), a.block.mlp.down),
                                                        a.linear).shape[0]
    return ModelSpec(
        family=a.family, n_layers=len(model._blocks()), n_heads=n_heads, n_kv_heads=read(f.n_kv_heads) or n_heads,
        d_model=read(f.d_model), d_head=d_head, d_mlp=d_mlp, d_vocab=model.W_U.shape[1],
        n_ctx=read(f.n_ctx, NO_CONTEXT_LIMIT),
        norm=a.block.norms.kind, post_norms=a.block.post_norms, parallel=bool(read(f.parallel, False)),
        softcap=_cap(read(f.softcap)), attn_softcap=_cap(read(f.attn_softcap)),
        sliding_window=read(f.sliding_window), d_inner=d_inner, d_state=d_state,
    )


def qkv(model, layer: int, which: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(D, heads*dh) weight and bias of q (0), k (1) or v (2), before GQA expansion."""
    model.require(["attn.q"], "Per-head query/key/value weights")
    a, s, block = model.adapter.block.mixer, model.spec, model.block(layer)
    linear = model.adapter.linear
    if a.qkv is None:
        mod = get_module(block, (a.q_proj, a.k_proj, a.v_proj)[which])
        return linear_weight(mod, linear), mod.bias
    mod = get_module(block, a.qkv)
    w, b = linear_weight(mod, linear), mod.bias
    d = s.n_heads * s.d_head
    if a.qkv_layout == "blocks":
        cols = slice(which * d, (which + 1) * d)
        return w[:, cols], None if b is None else b[cols]
    idx = torch.arange(s.n_heads)[:, None] * 3 * s.d_head + which * s.d_head + torch.arange(s.d_head)
    idx = idx.flatten().to(w.device)
    return w[:, idx], None if b is None else b[idx]


def per_head(spec: ModelSpec, w: torch.Tensor) -> torch.Tensor:
    """(R, heads*dh) -> (H, R, dh), KV heads expanded to query heads."""
    s = spec
    heads = w.shape[1] // s.d_head
    w = w.reshape(w.shape[0], heads, s.d_head).permute(1, 0, 2)
    return w.repeat_interleave(s.n_heads // heads, dim=0)


def per_head_bias(model, layer: int, which: int) -> torch.Tensor | None:
    b = qkv(model, layer, which)[1]
    return None if b is None else per_head(model.spec, b.unsqueeze(0)).squeeze(1)
