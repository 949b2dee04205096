"""The explicit path of the selective state-space mixer (Mamba): its inner sites, state
interventions and SSM knockout.

transformers computes the mixer in one function, so its inner values (the conv output, the
recurrent state, the scan output, the gate) are not module outputs. For layers where a hook
session reads or changes them, lmscope swaps the mixer's ``forward`` for this explicit one (and
only for that session); elsewhere the native forward runs. The load check holds the explicit
path to the native logits. With ``[x_a | g] = in_proj(x)`` (E channels each)::

    u_t = SiLU(b + Σ_k w_k ⊙ x_a[t−K+1+k])                 (depthwise causal conv, width K)
    Δ_t = softplus(dt_proj(x_proj(u_t)_Δ)),  B_t, C_t = x_proj(u_t)_B, x_proj(u_t)_C
    h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t u_t) B_t            (E × N state, A = −exp(A_log))
    s_t = C_t · h_t + D ⊙ u_t,   y_t = s_t ⊙ SiLU(g_t),   o_t = out_proj(y_t)

**State interventions** (``ssm.state``, e.g. state steering: adding a vector to the recurrent
state, Paulo et al. 2024) change h_p at the chosen positions, and the change flows on through the
recurrence: the states after p are recomputed from the changed h_p.

**SSM knockout** (the state-space analogue of attention knockout; Sen Sharma, Atkinson and Bau
2024) blocks the flow from source positions S to a target position t inside one layer. Unrolled,
``h_t = Σ_{r≤t} exp(A Σ_{q=r+1..t} Δ_q) ⊙ (Δ_r u_r) B_r``: every earlier token r reaches t
through its own term (the hidden attention of Mamba), and through the convolution each token x_a[s]
also enters u_r for r = s..s+K−1. Knockout recomputes the target's scan output with the source
tokens' terms removed from the sum, and the sources' conv inputs removed from every u_r (r ≤ t,
including u_t in the D skip) that the target reads, keeping the selective parameters (Δ, B, C, the
gate) at their values in the run, as attention knockout keeps the other tokens' values. A token is
never knocked out of itself (pairs with source ≥ target are left alone). Other positions and
layers are unchanged.

Shapes: B prompts, T tokens, E channels, N state size, D residual width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmscope.errors import InputError
from lmscope.models.parts import get_module
from lmscope.sites import Site

if TYPE_CHECKING:
    from lmscope.interventions import Knockout
    from lmscope.models.hooks import HookSession

def selective(mixer, u_BTE: torch.Tensor, norms: tuple[str, str, str] | None = None):
    """The selective parameters of conv outputs u (B, T, E): Δ (B, T, E), A (E, N), B and C (B, T, N),
    all float32. ``norms``: the mixer's norms of Δ_rank, B and C (Falcon-Mamba), applied to x_proj's output."""
    rank, n = int(mixer.time_step_rank), mixer.ssm_state_size
    dt, b, c = torch.split(mixer.x_proj(u_BTE), [rank, n, n], dim=-1)
    if norms is not None:
        dt, b, c = (get_module(mixer, path)(x) for path, x in zip(norms, (dt, b, c)))
    dt = F.softplus((dt @ mixer.dt_proj.weight.T).float() + mixer.dt_proj.bias.float())
    return dt, -torch.exp(mixer.A_log.float()), b.float(), c.float()


def conv_pre(mixer, xa_BTE: torch.Tensor) -> torch.Tensor:
    """The causal depthwise convolution of x_a (B, T, E), before its SiLU: ``b + Σ_j w_j ⊙ x_a[t − K + 1 + j]``,
    written as K shifted products (on CPU much faster than a grouped conv1d, backward included)."""
    t, k = xa_BTE.shape[1], mixer.conv1d.kernel_size[0]
    w = mixer.conv1d.weight[:, 0, :]  # (E, K)
    x = F.pad(xa_BTE.to(w.dtype), (0, 0, k - 1, 0))  # k − 1 zeros before the first token
    out = sum(w[:, j] * x[:, j:j + t] for j in range(k))
    return out if mixer.conv1d.bias is None else out + mixer.conv1d.bias


def scan(decay_BTEN: torch.Tensor, inp_BTEN: torch.Tensor) -> torch.Tensor:
    """States h_t = decay_t ⊙ h_{t−1} + inp_t from h_{−1} = 0: (B, T, E, N)."""
    h = torch.zeros_like(inp_BTEN[:, 0])
    states = []
    for decay, inp in zip(decay_BTEN.unbind(1), inp_BTEN.unbind(1)):  # unbind: one backward, not one per step
        h = decay * h + inp
        states.append(h)
    return torch.stack(states, dim=1)


def propagate(decay_BTEN: torch.Tensor, delta_BTEN: torch.Tensor) -> torch.Tensor:
    """How a change ``delta`` to the states flows on through the recurrence (the same linear scan)."""
    return scan(decay_BTEN, delta_BTEN)


def explicit_mixer(session: HookSession, layer: int, mixer):
    """The mixer's forward for ``session``: native arithmetic, inner sites processed, knockouts applied."""

    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is not None:
            raise InputError("The inner state-space sites (ssm.*) and SSM knockout work on whole prompts, not "
                             "on cached generation steps; read or steer resid_pre/resid_post/ssm_out instead.")
        mask = None if attention_mask is None else attention_mask[:, :, None].to(hidden_states.dtype)
        x = hidden_states if mask is None else hidden_states * mask
        xa, g = mixer.in_proj(x).chunk(2, dim=-1)
        xa = session.process(Site("ssm.in", layer), xa)
        g = session.process(Site("ssm.gate", layer), g)
        pre = conv_pre(mixer, xa)
        u = F.silu(pre) if mask is None else F.silu(pre) * mask
        u = session.process(Site("ssm.conv", layer), u)
        dt, a, b, c = selective(mixer, u, session.model.adapter.block.mixer.selective_norms)
        decay = torch.exp(dt[..., None] * a)  # (B, T, E, N)
        states = scan(decay, (dt * u.float())[..., None] * b[:, :, None, :])
        states = _state_interventions(session, layer, states, decay)
        s = torch.einsum("bten,btn->bte", states, c) + mixer.D.float() * u.float()
        for rows, ko in session.knockouts.get(layer, ()):
            sel = slice(None) if rows is None else rows
            s[sel] = s[sel] - knockout_correction(ko, mixer.conv1d.weight[:, 0, :].float(), mixer.D.float(), xa[sel],
                                                  pre[sel], u[sel], dt[sel], a, b[sel], c[sel],
                                                  None if mask is None else mask[sel])
        s = session.process(Site("ssm.out", layer), s.to(hidden_states.dtype))
        y = session.process(Site("ssm.y", layer), s * F.silu(g))
        return mixer.out_proj(y.to(hidden_states.dtype))

    return forward


def _state_interventions(session: HookSession, layer: int, states: torch.Tensor, decay: torch.Tensor,
                        site: Site | None = None) -> torch.Tensor:
    """Apply the ``ssm.state`` interventions (or those of another state ``site`` with the same linear recurrence,
    RWKV's ``wkv.state``) position by position, each change flowing on to later states."""
    site = Site("ssm.state", layer) if site is None else site
    ivs = session.ivs.get(site)
    if ivs:
        t = states.shape[1]
        touched = sorted({p % t for _, iv in ivs for p in (range(t) if iv.positions is None else iv.positions)})
        for p in touched:
            delta = (session.apply(site, states) - states)[:, p]
            if delta.abs().max() > 0:
                step = torch.zeros_like(states[:, p:])
                step[:, 0] = delta
                states = torch.cat([states[:, :p], states[:, p:] + propagate(decay[:, p:], step)], dim=1)
    if site in session.cache_sites:
        session._store(site.name, states)
    return states


def knockout_pairs(ko: Knockout, t: int) -> dict[int, list[int]]:
    """Target position -> the source positions knocked out of it (sources before the target only)."""
    if ko.heads is not None:
        raise InputError("A state-space mixer has no heads: give an SSM Knockout without heads.")
    targets = range(t) if ko.from_positions is None else sorted({p % t for p in ko.from_positions})
    sources = range(t) if ko.to_positions is None else sorted({p % t for p in ko.to_positions})
    return {q: [s for s in sources if s < q] for q in targets if any(s < q for s in sources)}


def knockout_correction(ko: Knockout, w_EK, d_E, xa, pre, u, dt, a, b, c, mask) -> torch.Tensor:
    """What to subtract from the scan output s (B, T, E) to block ``ko``'s sources from its targets.

    ``w_EK``: the convolution weights of x_a's channels (w[:, j] multiplies x_a[r − (K − 1) + j]); ``d_E`` the skip
    D per channel; ``pre`` the conv pre-activations of x_a's channels, ``u`` their SiLU, Δ (B, T, E), A (E, N);
    B and C (B, T, N) shared by the channels (Mamba) or (B, T, E, N) per channel (Mamba-2's heads and groups).
    """
    bsz, t, e = u.shape
    k = w_EK.shape[1]
    w = w_EK
    if b.ndim == 3:
        b, c = b[:, :, None, :], c[:, :, None, :]
    cum = torch.cumsum(dt, dim=1)  # (B, T, E): Σ_{q ≤ r} Δ_q
    out = torch.zeros(bsz, t, e, dtype=torch.float32, device=u.device)
    for q, sources in knockout_pairs(ko, t).items():
        lo = min(sources)
        removed = pre[:, lo:q + 1].float().clone()  # conv pre-activations of r = lo..q as the target sees them
        for s in sources:
            for r in range(s, min(s + k, q + 1)):
                removed[:, r - lo] -= w[:, k - 1 - (r - s)] * xa[:, s].float()
        v = F.silu(removed)
        if mask is not None:
            v = v * mask[:, lo:q + 1].float()
        delta = u[:, lo:q + 1].float() - v  # how much each u_r (r = lo..q) loses for this target
        for s in sources:
            delta[:, s - lo] = u[:, s].float()  # a source's own term goes entirely
        decay = torch.exp((cum[:, q:q + 1] - cum[:, lo:q + 1])[..., None] * a)  # (B, q−lo+1, E, N)
        terms = decay * (dt[:, lo:q + 1] * delta)[..., None] * b[:, lo:q + 1]
        out[:, q] = (terms.sum(dim=1) * c[:, q]).sum(-1) + d_E * delta[:, -1]
    return out
