"""Attention-output SAEs (Kissane, Krzyzanowski, Bloom, Conmy, Nanda 2024): SAEs on ``blocks.{l}.attn.z``.

The input is every head's output before W_O, concatenated: ``z ∈ R^{H·dh}`` (head-major). Because the
decoder row of a latent splits into per-head blocks, and z is linear in the values once the pattern is
fixed, features can be attributed to heads:

* :func:`head_attribution` (weight-based): the share of latent i's decoder row in head h,
  ``‖W_dec[i, h, :]‖ / Σ_h' ‖W_dec[i, h', :]‖``. Static; rows sum to 1.
* :func:`direct_feature_attribution` (DFA): at a destination position, the encoder pre-activation
  ``w_i · z_dest + c_i`` splits exactly into ``Σ_h Σ_src A^h[dest, src] (w_i^{(h)} · v^h[src])`` plus the
  constant ``c_i = b_enc,i − w_i · b_dec`` (``b_gate`` for Gated SAEs). Summing over sources gives the
  per-head DFA, over heads the per-source DFA. It explains the pre-activation (for an active latent, the
  activation minus the constant; for JumpReLU/TopK/Gated the gate pre-activation).
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.results import Axis, Result
from lmscope.sae.base import SAE
from lmscope.sae.io import check_fits


def _z_site(sae: SAE, model=None):
    if model is not None:
        site = check_fits(sae, model)
        if site.kind != "attn.z":
            raise InputError(f"Head attribution needs an SAE on blocks.<l>.attn.z; this one reads {site.name}.")
        return site, model.spec.n_heads
    if not sae.cfg.d_head:
        raise InputError("This SAE does not record d_head; pass the model (head_attribution(sae, model)).")
    return None, sae.cfg.d_in // sae.cfg.d_head


@torch.no_grad()
def head_attribution(sae: SAE, model=None) -> Result:
    """Weight-based head attribution: (latent, head) shares of each decoder row's norm, rows summing to 1."""
    _, n_heads = _z_site(sae, model)
    W = sae.W_dec.detach().reshape(sae.cfg.d_sae, n_heads, -1)
    norms = W.norm(dim=-1)
    shares = norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)
    return Result(shares, (Axis("latent", [str(i) for i in range(sae.cfg.d_sae)]),
                           Axis("head", [f"H{h}" for h in range(n_heads)])),
                  method="sae_head_attribution", model=model.name if model is not None else sae.cfg.model,
                  params={"site": sae.cfg.site})


def _encoder_terms(sae: SAE, latent: int) -> tuple[torch.Tensor, float]:
    """The effective weight (D,) on raw z and the constant of latent ``latent``'s (gate) pre-activation."""
    w = sae.W_enc[:, latent].detach() * sae.scale
    bias = sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc
    const = float(bias[latent])
    if sae.apply_b_dec_to_input:
        const -= float(sae.b_dec.detach() @ sae.W_enc[:, latent].detach())
    return w, const


@torch.no_grad()
def direct_feature_attribution(sae: SAE, model, prompt, latent: int, position: int = -1) -> Result:
    """DFA of ``latent`` at ``position`` of ``prompt``: a (head, source position) result.

    ``meta`` holds the constant, the pre-activation computed from the cached z (the DFA plus the constant equals
    it) and the latent's activation.
    """
    site, n_heads = _z_site(sae, model)
    if not 0 <= latent < sae.cfg.d_sae:
        raise InputError(f"latent {latent} is out of range 0..{sae.cfg.d_sae - 1}.")
    layer = site.layer
    names = [f"blocks.{layer}.attn.pattern", f"blocks.{layer}.attn.v", site.name]
    run = model.run(prompt, cache=names, logits="none")
    if run.batch.input_ids.shape[0] != 1:
        raise InputError("direct_feature_attribution takes one prompt.")
    T = run.batch.input_ids.shape[1]
    pos = position + T if position < 0 else position
    if not 0 <= pos < T:
        raise InputError(f"position {position} is outside the prompt's {T} tokens.")
    A = run[names[0]][0, :, pos, :].float()                      # (H, src)
    v = run[names[1]][0].float()                                  # (src, H, dh)
    w, const = _encoder_terms(sae, latent)
    w_h = w.reshape(n_heads, -1)                                  # (H, dh)
    dfa = A * torch.einsum("shd,hd->hs", v, w_h)                  # (H, src)
    z = run[site.name][0, pos].reshape(-1).float()
    pre = float(z @ w) + const
    act = float(sae.encode(z[None])[0, latent])
    tokens = run.batch.str_tokens[0]
    return Result(dfa, (Axis("head", [f"H{h}" for h in range(n_heads)]),
                        Axis("source", [f"{i}:{t}" for i, t in enumerate(tokens)])),
                  method="sae_dfa", model=model.name, target={"latent": latent, "position": pos},
                  params={"site": site.name},
                  meta={"constant": const, "pre_activation": pre, "activation": act, "tokens": tokens,
                        "by_head": dfa.sum(1).tolist(), "by_source": dfa.sum(0).tolist()})
