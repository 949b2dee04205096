"""AtP checked against exact patching, head by head: where the first-order estimate holds and where it fails.

For every head the exact effect of patching its ``attn.z`` at every position (:func:`exact_head_effects`,
L·H batched patched runs) is set beside AtP's estimate of the same quantity and beside AtP*'s GradDrop
magnitude (Kramár et al. 2024: the backward pass repeated with each layer's writes cut out of the
gradient, absolute estimates averaged), so a user can see on their own task how far to trust the fast
ranking. Kramár et al. name two failure modes: attention saturation (the QK fix; it concerns query and
key nodes, not a head's output, which AtP already takes exactly) and cancellation between a node's
direct and indirect effects, which flips or shrinks AtP's estimate and which GradDrop targets.

Result: values (L·H, 3), rows the heads ("L16.H0"), columns ``exact``, ``atp`` (both signed, in metric
units) and ``graddrop`` (≥ 0). ``meta`` holds the rank correlations (Spearman) of AtP with exact
patching (signed, and |AtP| with |exact|), of GradDrop with |exact|, the heads whose AtP sign is wrong
among those with a large exact effect (≥ ``big`` × the largest), and for each such head its rank by
|exact|, by |AtP| and by GradDrop.
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.localization.atp import DIRECTIONS, atp, exact_head_effects, spearman
from lmscope.localization.metrics import metric_kind
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.targets import default_metric


def _rank_of(values: torch.Tensor) -> torch.Tensor:
    """(N,) 1-based rank of each entry, largest first."""
    order = values.argsort(descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(values) + 1)
    return rank


def head_check(model: Model, pairs: PromptPairs, *, direction: str = "noise", metric: str | None = None,
               batch_size: int = 16, big: float = 0.1, graddrop: bool = True) -> Result:
    """Exact head patching, AtP and AtP*'s GradDrop for every head on ``pairs`` (module docstring).
    ``metric`` as for :func:`atp` (default: logit difference with foils, else log-probability)."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction={direction!r}: use 'noise' or 'denoise'.")
    if not 0 < big <= 1:
        raise InputError(f"big={big}: give a fraction of the largest exact effect in (0, 1].")
    metric = metric_kind(metric or default_metric(pairs.foils[0]), ("logit_diff", "prob", "logprob"), "AtP")
    s = model.spec
    exact = exact_head_effects(model, pairs, direction=direction, metric=metric, batch_size=batch_size)
    plain = atp(model, pairs, nodes=("head",), direction=direction, metric=metric, normalise=False,
                batch_size=batch_size)["head"]
    ex, ap = exact.values.flatten().float(), plain.values.flatten().float()
    cols = [ex, ap]
    if graddrop:
        gd = atp(model, pairs, nodes=("head",), direction=direction, metric=metric, normalise=False,
                 batch_size=batch_size, graddrop=True)["head"].values.flatten().float()
        cols.append(gd)
    labels = tuple(f"L{l}.H{h}" for l in range(s.n_layers) for h in range(s.n_heads))
    r_exact, r_atp = _rank_of(ex.abs()), _rank_of(ap.abs())
    r_gd = _rank_of(cols[2]) if graddrop else None
    large = ex.abs() >= big * float(ex.abs().max())
    wrong = (large & (torch.sign(ap) != torch.sign(ex))).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: int(r_exact[i]))

    def row(i: int) -> dict:
        out = {"head": labels[i], "exact": float(ex[i]), "atp": float(ap[i]), "rank_exact": int(r_exact[i]),
               "rank_atp": int(r_atp[i])}
        if graddrop:
            out.update(graddrop=float(cols[2][i]), rank_graddrop=int(r_gd[i]))
        return out

    meta = {"spearman": spearman(ap, ex), "spearman_abs": spearman(ap.abs(), ex.abs()),
            "clean_metric": plain.meta["clean_metric"], "corrupt_metric": plain.meta["corrupt_metric"],
            "n_large": int(large.sum()), "wrong_sign": [row(i) for i in wrong],
            "top_exact": [row(i) for i in r_exact.argsort()[:10].tolist()], "task": pairs.meta.get("task")}
    if graddrop:
        meta["spearman_graddrop_abs"] = spearman(cols[2], ex.abs())
    names = ("exact", "atp", "graddrop")[:len(cols)]
    return Result(torch.stack(cols, 1), (Axis("head", labels), Axis("estimate", names)), "atp_check", model.name,
                  {"target": pairs.targets[0], "foil": pairs.foils[0]},
                  {"direction": direction, "metric": metric, "n_prompts": len(pairs), "big": big}, meta=meta)
