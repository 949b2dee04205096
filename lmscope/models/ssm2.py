"""The explicit path of Mamba-2's state-space mixer (SSD; Dao and Gu 2024): its inner sites and state
interventions, as :mod:`lmscope.models.ssm` does for Mamba.

Mamba-2 differs from Mamba in four ways: the convolution runs over ``[x_a, B, C]`` (so B and C are
convolved too, and come from the input projection, not from the conv output); Δ and A are one scalar
per head of P = E / H channels; B and C are shared by the heads of a group (G groups); and the
``out_proj`` input is a gated, grouped RMS norm ``y = norm(s ⊙ SiLU(g))`` with a weight. With
``[g | x_a, B, C | Δ_raw] = in_proj(x)``::

    [u, B, C]_t = SiLU(conv([x_a, B, C])_t)                 (depthwise causal conv, width K)
    Δ_t = clamp(softplus(Δ_raw_t + dt_bias)),  A = −exp(A_log)            (one per head)
    h_t = exp(Δ_t A) h_{t−1} + Δ_t u_t B_tᵀ                 (per head: P × N)
    s_t = C_t · h_t + D ⊙ u_t,   y_t = norm(s_t ⊙ SiLU(g_t)),   o_t = out_proj(y_t)

Sites (shapes as for Mamba, E = H·P): ``ssm.in`` is the x_a part of the conv input (B and C's
inputs are not a site), ``ssm.gate`` g, ``ssm.conv`` u (the x part of the conv output), ``ssm.state``
h with the heads' P channels laid side by side (B T E N), ``ssm.out`` s, ``ssm.y`` the norm's output
(the ``out_proj`` input). State interventions flow on through the recurrence as on Mamba. SSM
knockout is Mamba's (:mod:`lmscope.models.ssm`): the sources' terms leave the target's state sum and
their x_a leaves the conv windows the target reads, with Δ, B, C and the gate kept as they were in the
run (here B and C are convolved too, so through them a source still reaches the next three tokens'
selective parameters, as through Δ on Mamba).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lmscope.errors import InputError
from lmscope.models.parts import get_module
from lmscope.models.ssm import _state_interventions, conv_pre, knockout_correction, scan
from lmscope.sites import Site

if TYPE_CHECKING:
    from lmscope.models.hooks import HookSession
    from lmscope.models.model import Model


def explicit_mixer2(session: HookSession, layer: int, mixer):
    """Mamba-2's mixer forward for ``session``: native arithmetic, inner sites processed."""
    norm = get_module(session.model.block(layer), session.model.adapter.block.mixer.norm)

    def forward(hidden_states, cache=None, attention_mask=None, **kwargs):
        if cache is not None:
            raise InputError("The inner state-space sites (ssm.*) work on whole prompts, not on cached generation "
                             "steps; read or steer resid_pre/resid_post/ssm_out instead.")
        bsz, t, _ = hidden_states.shape
        e, h, p, n, grp = (mixer.intermediate_size, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size,
                           mixer.n_groups)
        mask = None if attention_mask is None else attention_mask[:, :, None].to(hidden_states.dtype)
        x = hidden_states if mask is None else hidden_states * mask
        g, xbc, dt_raw = mixer.in_proj(x).split([e, mixer.conv_dim, h], dim=-1)
        xa, bc_in = xbc.split([e, 2 * grp * n], dim=-1)
        xa = session.process(Site("ssm.in", layer), xa)
        g = session.process(Site("ssm.gate", layer), g)
        pre = conv_pre(mixer, torch.cat([xa, bc_in], dim=-1))
        act = mixer.act(pre)
        if mask is not None:
            act = act * mask
        u, b, c = act.split([e, grp * n, grp * n], dim=-1)
        u = session.process(Site("ssm.conv", layer), u)
        lo, hi = mixer.time_step_limit
        dt = F.softplus(dt_raw.float() + mixer.dt_bias.float()).clamp(min=lo, max=hi)  # (B, T, H)
        a = -torch.exp(mixer.A_log.float())  # (H,)
        b = b.float().view(bsz, t, grp, n).repeat_interleave(h // grp, dim=2)  # (B, T, H, N)
        c = c.float().view(bsz, t, grp, n).repeat_interleave(h // grp, dim=2)
        decay = torch.exp(dt * a).repeat_interleave(p, dim=-1)[..., None].expand(bsz, t, e, n)  # (B, T, E, N)
        inp = (dt[..., None] * u.float().view(bsz, t, h, p))[..., None] * b[:, :, :, None, :]  # (B, T, H, P, N)
        states = scan(decay, inp.reshape(bsz, t, e, n))
        states = _state_interventions(session, layer, states, decay)
        s = torch.einsum("bthpn,bthn->bthp", states.view(bsz, t, h, p, n), c).reshape(bsz, t, e)
        d = mixer.D.float().repeat_interleave(p)
        s = s + d * u.float()
        knockouts = session.knockouts.get(layer, ())
        if knockouts and mixer.activation not in ("silu", "swish"):
            raise InputError(f"SSM knockout assumes a SiLU convolution activation; this Mamba-2 uses "
                             f"{mixer.activation!r}.")
        if knockouts:  # the heads' Δ, A, B and C laid out per channel, as knockout_correction takes them
            dt_e = dt.repeat_interleave(p, dim=-1)
            a_e = a.repeat_interleave(p)[:, None].expand(e, n)
            b_e, c_e = (x.repeat_interleave(p, dim=2) for x in (b, c))
        for rows, ko in knockouts:
            sel = slice(None) if rows is None else rows
            s[sel] = s[sel] - knockout_correction(ko, mixer.conv1d.weight[:e, 0, :].float(), d, xa[sel],
                                                  pre[sel][..., :e], u[sel], dt_e[sel], a_e, b_e[sel], c_e[sel],
                                                  None if mask is None else mask[sel])
        s = session.process(Site("ssm.out", layer), s.to(hidden_states.dtype))
        y = session.process(Site("ssm.y", layer), norm(s, g))
        return mixer.out_proj(y.to(hidden_states.dtype))

    return forward


def out_proj_input(model: Model, layer: int, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The ``out_proj`` input from the scan output s and the gate g: ``s ⊙ SiLU(g)`` (Mamba), or Mamba-2's gated
    norm of it."""
    part = model.adapter.block.mixer
    if part.scan == "mamba2":
        return get_module(model.block(layer), part.norm)(s, g)
    return s * F.silu(g)
