"""MEMIT: many facts spread over several layers (Meng, Sen Sharma, Andonian, Belinkov, Bau; ICLR 2023).

For each fact a target shift δᵢ of the top edited layer's output at the last subject token is found
exactly as ROME's v* (:func:`lmscope.editing.rome.compute_value`), so ``zᵢ = hᵢ + δᵢ`` is the wanted
residual there. Then, layer by layer from the lowest, with the updates of lower layers already applied:

    Rᵢ = (zᵢ − hᵢ) / (layers left),   ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹

with K (F, n) the facts' keys at layer l (averaged over the same prefixed prompts), h the current
residual (``resid_post``) of the top layer and λ = ``mom2_weight``. With one layer and one fact this
is ROME's update up to the λ weighting. It reuses everything ROME needs; the cost is one C per layer.

On models with post-norms (Gemma) δ is found at the top matrix's output, which the post-norm then
rescales, so zᵢ is an approximation there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lmscope.editing.edit import Edit
from lmscope.editing.rome import (Fact, RomeSettings, _positions, _rows, compute_key, compute_value, pad_left,
                                  templates)
from lmscope.errors import InputError
from lmscope.models import Model


def memit_update(W_OI: torch.Tensor, C_II: torch.Tensor, K_IN: torch.Tensor, R_ON: torch.Tensor,
                 mom2_weight: float) -> torch.Tensor:
    """ΔW (D, F) = R Kᵀ (λ C + K Kᵀ)⁻¹ in float64: the least-squares update that moves keys K by R."""
    A = mom2_weight * C_II.double() + K_IN.double() @ K_IN.double().T
    return torch.linalg.solve(A, K_IN.double() @ R_ON.double().T).T.float()


def _top_residual(model: Model, fact: Fact, layer: int, tmpls: Sequence[str]) -> torch.Tensor:
    rows, idx = _rows(model, fact, tmpls)
    batch = pad_left(model, rows)
    site = f"blocks.{layer}.resid_post"
    with torch.no_grad():
        h = model.run(batch, cache=[site], logits="none")[site]
    pos = torch.tensor(_positions(batch, rows, idx))
    return h[torch.arange(len(rows)), pos.to(h.device)].float().mean(0).cpu()


def memit(model: Model, facts: Sequence[Fact], layers: Sequence[int], C: Mapping[int, torch.Tensor], *,
          mom2_weight: float = 1e4, settings: RomeSettings = RomeSettings(),
          prefixes: Sequence[str] | None = None) -> Edit:
    """One :class:`Edit` writing all ``facts`` into ``layers`` (C: {layer: (F, F)}); the model is left unchanged."""
    layers = sorted(set(int(x) for x in layers))
    if not facts or not layers:
        raise InputError("memit needs at least one fact and one layer.")
    missing = [x for x in layers if x not in C]
    if missing:
        raise InputError(f"C is missing for layer(s) {missing}; compute them with second_moment(model, layer).")
    tmpls = templates(model, settings, prefixes)
    top = layers[-1]
    targets = []
    for fact in facts:
        k = compute_key(model, fact, top, tmpls)
        v, _ = compute_value(model, fact, top, k, tmpls, settings)
        targets.append(_top_residual(model, fact, top, tmpls) + v - model.memory(top).weight() @ k)
    Z = torch.stack(targets, 1)  # (D, n)
    deltas, handles = {}, []
    try:
        for i, layer in enumerate(layers):
            K = torch.stack([compute_key(model, f, layer, tmpls) for f in facts], 1)
            H = torch.stack([_top_residual(model, f, top, tmpls) for f in facts], 1)
            R = (Z - H) / (len(layers) - i)
            mem = model.memory(layer)
            delta = memit_update(mem.weight(), C[layer], K, R, mom2_weight)
            deltas[mem.name] = delta
            handles.append(model.edit({mem.name: delta}))
    finally:
        for h in reversed(handles):
            h.undo()
    return Edit.for_model(model, deltas, facts=list(facts), meta={"method": "memit", "layers": layers,
                                                                  "mom2_weight": mom2_weight})
