"""Logit lens (nostalgebraist, 2020): decode the residual stream after every layer.

The residual before block 0 ("embed") and after each block is passed through the model's own
final norm and unembedding, as if the model stopped there. At one position the result gives, per
layer, the top-k tokens with their probabilities and, for a target token, its rank and
probability. The final row equals the model's own prediction.

Shapes: values (layers + 1, k) probabilities; extras ``target_prob``/``target_rank`` (layers + 1,).
"""

from __future__ import annotations

import torch

from lmscope.models import Model
from lmscope.models.adapters import get_module
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count, resolve_position, site_names


def residual_logits(model: Model, resid: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors (..., D) through the final norm and unembedding."""
    unembed = get_module(model.hf, model.adapter.unembed)
    with torch.no_grad():
        x = resid.to(model.device).to(model.final_norm.weight.dtype)
        logits = unembed(model.final_norm(x)).float()
        softcap = getattr(model.hf.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
    return logits.cpu()


def logit_lens(model: Model, prompt: str, target: str | int | None = None, *, k: int = 5,
               position: int | None = None) -> Result:
    """Top-k tokens and the target's rank and probability after every layer at ``position``."""
    n = model.spec.n_layers
    run = model.run(prompt, cache=["blocks.0.resid_pre", *site_names("resid_post", n)], logits="all")
    k = resolve_count(k, model.spec.d_vocab, "top tokens per layer")
    pos = resolve_position(position, run.batch.input_ids.shape[1])
    resid = torch.stack([run["blocks.0.resid_pre"][0, pos]] + [run[f"blocks.{l}.resid_post"][0, pos]
                                                              for l in range(n)])
    probs = residual_logits(model, resid).softmax(dim=-1)  # (n + 1, V)
    top = probs.topk(k, dim=-1)
    layer_labels = ("embed", *(str(l) for l in range(n)))
    meta = {"top_tokens": [[model.decode([i]) for i in row] for row in top.indices.tolist()],
            "position": pos, "tokens": run.batch.str_tokens[0]}
    extras, target_doc = {}, None
    if target is not None:
        t = model.token_id(target)
        target_prob = probs[:, t]
        extras["target_prob"] = target_prob
        extras["target_rank"] = (probs > target_prob[:, None]).sum(dim=-1) + 1
        target_doc = {"target": model.decode([t]), "target_id": t, "position": pos}
    return Result(top.values, (Axis("layer", layer_labels), Axis("rank", tuple(str(r + 1) for r in range(k)))),
                  "logit_lens", model.name, target_doc, {"k": k, "position": position}, extras, meta)
