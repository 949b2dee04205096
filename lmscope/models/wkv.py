"""RWKV's explicit path: the time mix (WKV) with its inner sites and state interventions, and the channel
mix, both with padding kept out.

transformers' RWKV ignores the attention mask, so in a left-padded batch the pad tokens would enter
every row's token shift and WKV sums. In every lmscope hook session on an RWKV model, each block's time
mix and channel mix run through the functions here instead (same arithmetic, the native modules' own
weights): a pad token is zeroed before the token shift (so a row's first real token sees a zero
previous token, as in a run of that prompt alone) and leaves no term in the WKV state. A batched run
then equals the single-prompt runs; the load check holds the path to the native logits. With x the
pre-norm output, x' the previous token's (zero before the first)::

    r = σ(W_r (μ_r x + (1 − μ_r) x')),  k = W_k (μ_k x + (1 − μ_k) x'),  v = W_v (μ_v x + (1 − μ_v) x')
    a_t = e^{−w} a_{t−1} + e^{k_t} v_t,   b_t = e^{−w} b_{t−1} + e^{k_t}       (w = exp(time_decay))
    wkv_t = (a_{t−1} + e^{u + k_t} v_t) / (b_{t−1} + e^{u + k_t})              (u = time_first)
    o_t = W_o (r_t ⊙ wkv_t)

Numerically, the sums are kept as a' = a·e^{−K}, b' = b·e^{−K} with K the largest real key of the row
and channel (and of an incoming state), in float64; the ratio is unchanged. The site ``wkv.state``
gives (a, b) at their true scale (B T E 2), and an intervention on it at position p changes (a_p, b_p),
the change flowing on with the decay e^{−w} per token, as state steering on Mamba. Cached generation
passes transformers' state (shift vectors, a', b' and K per layer) in and out.

The channel mix is ``σ(W_r x_r) ⊙ W_v relu(W_k x_k)²``; its native modules are called, so the ``mlp.post``
and gate hooks fire.

Shapes: B prompts, T tokens, E channels (``attention_hidden_size``), D residual width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmscope.errors import ModelCheckError
from lmscope.models.parts import get_module
from lmscope.models.ssm import _state_interventions
from lmscope.sites import Site

if TYPE_CHECKING:
    from lmscope.models.hooks import HookSession
    from lmscope.models.model import Model


def prepare(hf) -> None:
    """Keep an RWKV model's residual stream true: transformers' eval mode divides the output weights of
    block l by 2^(l // rescale_every) in place and halves the residual after every ``rescale_every`` blocks
    (an fp16 overflow guard). Set ``rescale_every`` to 0 (undoing a rescale already applied), so the weights
    are the checkpoint's and ``embed + Σ writes`` is the final residual; in fp32 the logits do not change."""
    base = hf.rwkv
    every = hf.config.rescale_every
    if base.layers_are_rescaled and every > 0:
        with torch.no_grad():
            for i, block in enumerate(base.blocks):
                block.attention.output.weight.mul_(2 ** (i // every))
                block.feed_forward.value.weight.mul_(2 ** (i // every))
    hf.config.rescale_every = 0
    base.layers_are_rescaled = not base.training


def _shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """The previous token's vector (B, T, D): ``last`` (B, D) or zero before the first token."""
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def _mix(x, prev, mu):
    return x * mu + prev * (1 - mu)


def time_mix(session: HookSession, layer: int, att):
    """The time mix's forward for ``session`` (transformers' signature): inner sites, state interventions, padding."""

    def forward(hidden, state=None, use_cache=False):
        mask = session.token_mask(hidden)
        x = hidden if mask is None else hidden * mask
        prev = _shift(x, None if state is None else state[1][:, :, layer])
        r = torch.sigmoid(att.receptance(_mix(x, prev, att.time_mix_receptance)))
        k = att.key(_mix(x, prev, att.time_mix_key))
        v = att.value(_mix(x, prev, att.time_mix_value))
        r = session.process(Site("wkv.r", layer), r)
        k = session.process(Site("wkv.k", layer), k)
        v = session.process(Site("wkv.v", layer), v)
        inner = None if state is None else tuple(s[:, :, layer] for s in state[2:])
        out, last = wkv_scan(session, layer, att, k, v, mask, inner)
        out = session.process(Site("wkv.out", layer), out.to(hidden.dtype))
        y = session.process(Site("wkv.y", layer), r * out)
        if state is not None:
            state[1][:, :, layer] = hidden[:, -1]
            for i, s in enumerate(last):
                state[2 + i][:, :, layer] = s
        return att.output(y), state

    return forward


def wkv_scan(session: HookSession | None, layer: int, att, k, v, mask=None, inner=None):
    """The WKV output (B, T, E) of keys and values (B, T, E), and the final state (a', b', K) (each (B, E),
    float32) in transformers' layout. ``mask`` (B, T, 1): pad tokens leave no term; ``inner``: an incoming
    state (a', b', K) as transformers keeps it."""
    k, v = k.double(), v.double()
    bsz, t, e = k.shape
    real = torch.ones_like(k, dtype=torch.bool) if mask is None else mask.bool().expand_as(k)
    keys = k.masked_fill(~real, float("-inf"))
    top = keys.max(dim=1).values  # (B, E): K, the largest real key
    if inner is not None:
        top = torch.maximum(top, inner[2].double())
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ek = torch.exp(keys - top[:, None])  # e^{k − K}, 0 for pads
    decay = torch.exp(-torch.exp(att.time_decay.double()))  # (E,)
    u = att.time_first.double()
    a = torch.zeros(bsz, e, dtype=torch.float64, device=k.device)
    b = torch.zeros_like(a)
    if inner is not None:
        rescale = torch.exp(inner[2].double() - top)
        a, b = inner[0].double() * rescale, inner[1].double() * rescale
    before, states = [], []  # the state before and after each token
    for i in range(t):
        before.append(torch.stack([a, b], dim=-1))
        a = decay * a + ek[:, i] * v[:, i]
        b = decay * b + ek[:, i]
        states.append(torch.stack([a, b], dim=-1))
    before, states = torch.stack(before, dim=1), torch.stack(states, dim=1)  # (B, T, E, 2)
    site = Site("wkv.state", layer)
    if session is not None and session.wants(site):
        scale = torch.exp(top)[:, None, :, None]  # the true scale (a, b) = (a', b') · e^K
        steps = decay[None, None, :, None].expand_as(states)
        changed = _state_interventions(session, layer, (states * scale).float(), steps.float(), site).double() / scale
        if site in session.ivs:
            start = before[:, :1]
            states = changed
            before = torch.cat([start, states[:, :-1]], dim=1)
    own = torch.where(real, torch.exp(u + k - top[:, None]), torch.ones_like(k))  # a pad's output is its own v
    out = (before[..., 0] + own * v) / (before[..., 1] + own)
    last = (states[:, -1, :, 0].float(), states[:, -1, :, 1].float(), top.float())
    return out, last


def channel_mix(session: HookSession, layer: int, ff):
    """The channel mix's forward for ``session`` (transformers' signature), padding kept out of the token shift."""

    def forward(hidden, state=None):
        mask = session.token_mask(hidden)
        x = hidden if mask is None else hidden * mask
        prev = _shift(x, None if state is None else state[0][:, :, layer])
        key = torch.square(torch.relu(ff.key(_mix(x, prev, ff.time_mix_key))))
        value = ff.value(key)
        gate = torch.sigmoid(ff.receptance(_mix(x, prev, ff.time_mix_receptance)))
        if state is not None:
            state[0][:, :, layer] = hidden[:, -1]
        return gate * value, state

    return forward


def install(session: HookSession) -> list:
    """Run every block's time mix and channel mix of ``session``'s model through this path; the modules."""
    model, part = session.model, session.model.adapter.block
    modules = []
    for layer in range(model.spec.n_layers):
        block = model.block(layer)
        for path, make in ((part.mixer.module, time_mix), (part.mlp.module, channel_mix)):
            module = get_module(block, path)
            if "forward" in module.__dict__:
                raise RuntimeError("Another lmscope hook session is active on this model; nest runs instead.")
            module.forward = make(session, layer, module)
            modules.append(module)
    return modules


def check_wkv_writes(model: Model, batch, cache: dict) -> None:
    """Each block's native time-mix write (transformers' forward, no session) equals ``output(r ⊙ wkv)`` of the
    explicit path's r and wkv, and its WKV output equals transformers' own recurrence of the same keys and values."""
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    n, native, handles = model.spec.n_layers, {}, []
    mixers = [get_module(model.block(layer), model.adapter.block.mixer.module) for layer in range(n)]
    for layer, att in enumerate(mixers):
        handles.append(att.register_forward_hook(
            lambda module, args, output, layer=layer: native.__setitem__(layer, output[0].detach())))
    try:
        with torch.no_grad():
            model.forward(batch)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for layer, att in enumerate(mixers):
            r, out = cache[f"blocks.{layer}.wkv.r"], cache[f"blocks.{layer}.wkv.out"]
            want = native[layer]
            err = (att.output(r * out) - want).abs().max().item()
            theirs, _ = rwkv_linear_attention_cpu(att.time_decay, att.time_first, cache[f"blocks.{layer}.wkv.k"],
                                                  cache[f"blocks.{layer}.wkv.v"])
            err_wkv = (theirs - out).abs().max().item()
            if err > 1e-3 * max(1.0, want.abs().max().item()) or err_wkv > 1e-3 * max(1.0, out.abs().max().item()):
                raise ModelCheckError(f"{model.name}: block {layer}'s time-mix write differs from output(r ⊙ wkv) by "
                                      f"{err:.2e} (its WKV from transformers' recurrence by {err_wkv:.2e}); the "
                                      "adapter's time-mix paths are wrong.")
