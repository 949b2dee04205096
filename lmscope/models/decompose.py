"""Decomposition of the final residual stream into the writes of every component.

For a position t, the input of the final norm is
``x_t = embed_t + Σ_l [Σ_h head_write_{l,h,t} + b_O^l] + Σ_l mlp_write_{l,t}``
(with ``mlp_write`` optionally split into ``Σ_n post_{l,t,n} W_out[n] + b_out^l``); for a
state-space model (Mamba) ``x_t = embed_t + Σ_l ssm_write_{l,t}``; for RWKV
``x_t = embed_t + Σ_l [wkv_write_{l,t} + mlp_write_{l,t}]`` (``embed`` after block 0's norm of the embeddings,
and a neuron's term carries the channel mix's gate σ(r) at its value in the run). The parts add
up to ``x_t`` exactly for sequential and parallel blocks alike. A model without MLPs (an
attention-only model) has no MLP terms.

Post-norm models (Gemma 2/3) pass each block write through its own RMSNorm before adding it. The
per-head and per-neuron split is then defined with that norm's scale frozen at its value in the
run: ``head_write_h = (z_h W_O^h) · g / s`` where ``s`` is the RMS of the summed attention output
and ``g`` the norm's gain. With the scale frozen the norm is linear, so the heads' writes still sum
exactly to the block's write; what is approximated is only how a head's write would change if
other heads changed (the scale would move).

Through the final norm (scale frozen) and the unembedding the writes give the logits additively,
but only up to the unembedding's output z: a soft-capped model (Gemma 2) outputs c·tanh(z / c),
which no sum of per-component terms reproduces. :func:`readout_values` names what a decomposition
of the logits sums to (the logit, or the pre-soft-cap logit) and gives it beside the model's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmscope.sites import site_names

if TYPE_CHECKING:
    from lmscope.models.model import Batch, Model


@dataclass
class Decomposition:
    """Components at one position per prompt: ``vectors`` (B, C, D) with C labelled components."""

    labels: list[str]
    kinds: list[str]  # embed | head | attn_bias | ssm | wkv | mlp | neuron | mlp_bias
    layers: list[int | None]
    heads: list[int | None]  # head index, or neuron index for kind "neuron"
    vectors: torch.Tensor
    resid: torch.Tensor  # (B, D) the model's own input to the final norm
    scale: torch.Tensor  # (B, 1) the final norm's 1/s, frozen
    batch: Batch
    positions: torch.Tensor  # (B,) the decomposed position of each row


def decomposition_sites(model: Model, neurons: bool = False) -> list[str]:
    """The sites a decomposition reads (a model without MLPs has no MLP writes to read)."""
    n = model.spec.n_layers
    if neurons:
        model.require(["mlp.post"], "A per-neuron decomposition")
    sites = ["embed", "final.scale", f"blocks.{n - 1}.resid_post"]
    sites += site_names(_mixer_writes(model), n)
    if "mlp" in model.parts:
        sites += site_names("mlp.post" if neurons else "mlp_out", n)
    return sites


def _mixer_writes(model: Model) -> str:
    """The site kind a decomposition reads for each block's mixer: its heads' writes, or a recurrent mixer's write."""
    return "attn.head_out" if "attention" in model.parts else model.adapter.block.mixer.write_kind


def decompose(model: Model, inputs, position: int | None = None, *, neurons: bool = False) -> Decomposition:
    """Decompose the final residual at ``position`` (default: each prompt's last token)."""
    run = model.run(inputs, cache=decomposition_sites(model, neurons), logits="none")
    return decompose_cache(model, run.batch, run.cache, position, neurons=neurons)


def decompose_cache(model: Model, batch: Batch, cache: dict, position: int | None = None, *,
                    neurons: bool = False) -> Decomposition:
    s = model.spec
    if neurons:
        model.require(["mlp.post"], "A per-neuron decomposition")
    has_mlp = "mlp" in model.parts
    rows = torch.arange(batch.input_ids.shape[0])
    pos = batch.last_index if position is None else torch.full_like(rows, position)
    pos = torch.where(pos < 0, pos + batch.input_ids.shape[1], pos)

    def at(t: torch.Tensor) -> torch.Tensor:
        return t[rows, pos.to(t.device)].float()

    labels, kinds, layers, heads, vecs = ["embed"], ["embed"], [None], [None], [at(cache["embed"])]

    def add(label, kind, layer, idx, vec):
        labels.append(label), kinds.append(kind), layers.append(layer), heads.append(idx), vecs.append(vec)

    for layer in range(s.n_layers):
        if "ssm" in model.parts:  # a state-space block has one write, its mixer's
            add(f"L{layer}.ssm", "ssm", layer, None, at(cache[f"blocks.{layer}.ssm_out"]))
            continue
        if "wkv" in model.parts:  # RWKV's time mix writes once, then its channel mix (the MLP part)
            add(f"L{layer}.wkv", "wkv", layer, None, at(cache[f"blocks.{layer}.wkv_out"]))
        else:
            hw = at(cache[f"blocks.{layer}.attn.head_out"])  # (B, H, D)
            for h in range(s.n_heads):
                add(f"L{layer}H{h}", "head", layer, h, hw[:, h])
        b_o = model.b_O(layer) if "attention" in model.parts else None
        if b_o is not None:
            vec = b_o.detach().float().expand(len(rows), -1)
            if s.post_norms:
                vec = vec * at(cache[f"aux.blocks.{layer}.attn_write_factor"])
            add(f"L{layer}.attn_bias", "attn_bias", layer, None, vec)
        if not has_mlp:
            continue
        if not neurons:
            add(f"L{layer}.mlp", "mlp", layer, None, at(cache[f"blocks.{layer}.mlp_out"]))
            continue
        post = at(cache[f"blocks.{layer}.mlp.post"])  # (B, F)
        w_out = model.W_out(layer).detach().float()
        factor = cache.get(f"aux.blocks.{layer}.mlp_write_factor")  # a post-norm's frozen scale, or RWKV's gate
        factor = None if factor is None else at(factor)
        for n in range(s.d_mlp):
            vec = post[:, n:n + 1] * w_out[n]
            add(f"L{layer}N{n}", "neuron", layer, n, vec if factor is None else vec * factor)
        b_out = model.b_out(layer)
        if b_out is not None:
            vec = b_out.detach().float().expand(len(rows), -1)
            add(f"L{layer}.mlp_bias", "mlp_bias", layer, None, vec if factor is None else vec * factor)
    resid = at(cache[f"blocks.{s.n_layers - 1}.resid_post"])
    return Decomposition(labels, kinds, layers, heads, torch.stack(vecs, dim=1), resid,
                         at(cache["final.scale"]), batch, pos)


def readout_values(model: Model, logits: torch.Tensor, resid: torch.Tensor, target_id: int,
                   foil_id: int | None = None) -> dict:
    """What a decomposition of the logit (difference) at one position sums to, beside the model's output.

    ``logits`` (V,) are the model's output logits at the position and ``resid`` (D,) the final
    residual there. Returns ``metric`` ("logit" or "logit difference", "pre-soft-cap ..." where the
    model soft-caps its logits), ``metric_value`` (the model's own value of that metric),
    ``model_value`` (the logit (difference) the model outputs) and ``softcap`` (c or None).
    """

    def value(x: torch.Tensor) -> float:
        x = x.float().cpu()
        return float(x[target_id] - (x[foil_id] if foil_id is not None else 0.0))

    metric = "logit" if foil_id is None else "logit difference"
    own = value(logits)
    if model.logit_softcap is None:
        return {"metric": metric, "metric_value": own, "model_value": own, "softcap": None}
    return {"metric": f"pre-soft-cap {metric}", "metric_value": value(model.unembed(resid, softcap=False)),
            "model_value": own, "softcap": model.logit_softcap}
