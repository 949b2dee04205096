"""Edge attribution patching: EAP (Syed, Rager, Conmy 2023) and EAP-IG (Hanna, Pezzelle, Belinkov 2024).

Every edge u → v of the component graph (heads and MLPs, each head's q/k/v input a separate
receiver; :mod:`lmscope.models.edges`) gets the first-order estimate of patching that edge alone
to its corrupted value:

    EAP:     s(u → v) = (z_u(x_corrupt) − z_u(x_clean)) · ∂M/∂in_v |_{x_clean}
    EAP-IG:  the gradient is averaged over m inputs whose embeddings interpolate from corrupted
             (k = 0) towards clean, excluding the clean end: e_r + (k/m)(e_c − e_r), k = 0..m−1.
    clean-corrupted: the gradient is the mean of the gradients at the two endpoints, the clean
             and the corrupted prompts (a variant in Hanna et al.'s code; two backward passes).

``in_v`` is the receiver's own copy of the residual stream, so one backward pass gives ∂M/∂in_v for
all receivers at once (m backward passes for EAP-IG). Scores are sums over positions and means over
prompts. Grouped-query attention is ungrouped: each query head has its own key and value input.
Use EAP to rank ~10⁵ edges in seconds, EAP-IG when faithfulness matters (it gives more faithful
circuits at equal size); check any circuit with :func:`lmscope.localization.circuits.faithfulness_curve`.
The endpoint gradients (EAP, clean-corrupted) can get the *sign* of a strongly nonlinear edge wrong:
on SmolLM2-135M and IOI, patching the single edge input → m0 to its corrupted value lowers the logit
difference by 5.26 (to the corrupted level), which EAP-IG estimates as −5.59, EAP as +0.64 and
clean-corrupted as +1.15. Circuits ranked by sign (``absolute=False`` in
:func:`~lmscope.localization.circuits.select`) therefore need EAP-IG scores.

Returns :class:`~lmscope.localization.circuits.EdgeScores` (U upstream × R receivers).
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.localization.circuits import EdgeScores, _batches, _metric
from lmscope.localization.metrics import metric_kind
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model, edge_forward, edge_graph, upstream_values

METHODS = ("eap", "eap-ig", "clean-corrupted")


def eap(model: Model, pairs: PromptPairs, *, method: str = "eap", ig_steps: int = 5, metric: str = "logit_diff",
        batch_size: int = 8) -> EdgeScores:
    """Edge scores by EAP (``method="eap"``), EAP-IG with ``ig_steps`` interpolation steps
    (``"eap-ig"``) or the mean of the clean and corrupted gradients (``"clean-corrupted"``)."""
    if method not in METHODS:
        raise InputError(f"method={method!r}: use one of {METHODS}.")
    if method == "eap-ig" and ig_steps < 1:
        raise InputError("ig_steps must be at least 1.")
    metric = metric_kind(metric, ("logit_diff", "prob", "logprob"), "EAP")
    pairs.check(model)
    graph = edge_graph(model)
    total = len(pairs)
    scores = torch.zeros(graph.valid.shape)
    clean_m = corrupt_m = 0.0
    for sub, clean, corrupt in _batches(model, pairs, batch_size):
        w = len(sub) / total
        m = _metric(model, sub, metric)
        up_clean, up_corrupt = upstream_values(model, clean), upstream_values(model, corrupt)
        # (endpoint name or None, batch, interventions) of each run whose receiver gradients are averaged
        if method == "eap":
            steps = [("clean", clean, ())]
        elif method == "clean-corrupted":
            steps = [("clean", clean, ()), ("corrupt", corrupt, ())]
        else:
            e_c, e_r = up_clean[0], up_corrupt[0]
            steps = [(None, clean, (Patch("embed", value=e_r + (k / ig_steps) * (e_c - e_r)),))
                     for k in range(ig_steps)]
        grads = None
        ends: dict[str, float] = {}  # metric of the unpatched clean/corrupted runs among the steps
        for end, batch, ivs in steps:
            run = edge_forward(model, batch, grad=True, interventions=ivs)
            value = m(run.logits)
            g = run.receiver_grads(value)
            grads = g if grads is None else grads + g
            if end:
                ends[end] = float(value.detach())
            del run
        grads = grads / len(steps)
        delta = (up_corrupt - up_clean).flatten(1)  # (U, B*T*D)
        scores += (delta @ grads.flatten(1).T) * w
        with torch.no_grad():
            for end, batch in (("clean", clean), ("corrupt", corrupt)):
                if end not in ends:
                    ends[end] = float(m(model.run(batch, logits="last").logits))
        clean_m += ends["clean"] * w
        corrupt_m += ends["corrupt"] * w
    scores = scores * graph.valid
    params = {"method": method, "metric": metric, "n_prompts": total}
    if method == "eap-ig":
        params["ig_steps"] = ig_steps
    meta = {"clean_metric": clean_m, "corrupt_metric": corrupt_m, "task": pairs.meta.get("task"),
            "prompt": pairs.clean[0], "corrupt_prompt": pairs.corrupt[0]}
    return EdgeScores(graph, scores, method, model.name, params, meta)
