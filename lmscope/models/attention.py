"""The lmscope attention function, registered with transformers' ``AttentionInterface``.

Every model lmscope loads runs with ``attn_implementation="lmscope"``. In layers where nothing
asks for queries, keys, values or probabilities, the function hands the call to the stock SDPA
kernel. In layers where a hook session installed itself (``module._lmscope_attn``) it computes
attention explicitly, so q/k/v and the pattern can be cached or intervened on and edges knocked out.

The eager mask function is registered under the same name: without it transformers may pass no
mask, and explicitly computed patterns silently lose causality.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from lmscope.sites import Site

if TYPE_CHECKING:
    from lmscope.models.hooks import HookSession

ATTN_IMPL = "lmscope"
ATTN_ATTR = "_lmscope_attn"


def lmscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, T, dh), key/value (B, Hkv, S, dh) -> (B, T, H, dh), probabilities or None."""
    hook = getattr(module, ATTN_ATTR, None)
    softcap = kwargs.get("softcap")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if hook is None and softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if hook is None:
        return _explicit(query, key, value, attention_mask, scaling, softcap)
    return hook(module, query, key, value, attention_mask, scaling, softcap)


def _expand_kv(query, key, value):
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return key, value


def _scores(q, k, mask, scaling, softcap):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        mask = mask[..., : k.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    return scores


def _explicit(query, key, value, mask, scaling, softcap):
    key, value = _expand_kv(query, key, value)
    probs = torch.softmax(_scores(query, key, mask, scaling, softcap).float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def explicit_attention(session: HookSession, layer: int, query, key, value, mask, scaling, softcap):
    """Explicit attention with the session's q/k/v/pattern sites and knockouts applied."""
    key, value = _expand_kv(query, key, value)
    q = session.process(Site("attn.q", layer), query.transpose(1, 2)).transpose(1, 2)
    k = session.process(Site("attn.k", layer), key.transpose(1, 2)).transpose(1, 2)
    v = session.process(Site("attn.v", layer), value.transpose(1, 2)).transpose(1, 2)
    scores = _scores(q, k, mask, scaling, softcap)
    knockouts = session.knockouts.get(layer)
    if knockouts:
        blocked = torch.zeros_like(scores, dtype=torch.bool)
        for rows, ko in knockouts:
            sl = slice(None) if rows is None else rows
            blocked[sl] = blocked[sl] | ko.score_mask(scores[sl])
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = session.process(Site("attn.pattern", layer), probs)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_IMPL, lmscope_attention)
AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
