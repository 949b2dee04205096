"""ACDC: automatic circuit discovery by exact, greedy edge pruning (Conmy et al., NeurIPS 2023).

Start from the full component graph (heads with separate q/k/v inputs, MLPs, logits;
:mod:`lmscope.models.edges`). Visit receivers in reverse topological order (logits first, then
later layers before earlier ones, higher-indexed heads first) and, for each, its parents from the
latest to the earliest. Tentatively patch the edge to its corrupted value; if the damage grows by
less than τ, keep it removed:

    D(H_new) − D(H) < τ   with D = mean KL(p_clean ‖ p_H) at the answer position (default)

(or the absolute change of the logit difference with ``metric="logit_diff"``; a task metric can be
over-optimised, which is why KL is the default). Every test is one exact patched forward, so the
cost is one forward per edge: use it on small models (a guard refuses graphs with more than
``max_edges`` edges; use EAP / EAP-IG there).

Returns a :class:`~lmscope.localization.circuits.Circuit` whose scores are each edge's measured
damage increase when it was tested.
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.localization.circuits import Circuit, _batches, _metric
from lmscope.localization.metrics import metric_kind
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model, edge_forward, edge_graph, upstream_values


def receiver_order(graph) -> list[int]:
    """Receiver columns in ACDC order: logits, then per layer (last first) the MLP, then heads
    from the highest index down, each head's q, k, v."""
    order = [len(graph.receivers) - 1]
    for layer in range(graph.n_layers - 1, -1, -1):
        if graph.has_mlp:
            order.append(graph.receiver_index(layer, "mlp"))
        for h in range(graph.n_heads - 1, -1, -1):
            order += [graph.receiver_index(layer, w, h) for w in ("q", "k", "v")]
    return order


def acdc(model: Model, pairs: PromptPairs, *, threshold: float = 0.1, metric: str = "kl", batch_size: int = 32,
         max_edges: int = 3000) -> Circuit:
    """Greedy exact pruning of the edge graph at threshold τ (see the module docstring)."""
    if threshold <= 0:
        raise InputError(f"threshold={threshold}: ACDC's τ must be positive (the paper sweeps 0.01 … 250).")
    metric = metric_kind(metric, ("kl", "logit_diff"), "ACDC")
    graph = edge_graph(model)
    if graph.n_edges > max_edges:
        raise InputError(
            f"{model.name} has {graph.n_edges} edges; exact ACDC costs one forward per edge and is meant for "
            f"small models (max_edges={max_edges}). Use EAP or EAP-IG (lmscope circuit --method eap-ig), "
            "or raise max_edges.")
    pairs.check(model)
    total = len(pairs)
    data = []
    with torch.no_grad():
        for sub, clean, corrupt in _batches(model, pairs, batch_size):
            clean_logits = model.run(clean, logits="last").logits
            data.append((len(sub) / total, clean, upstream_values(model, corrupt),
                         _metric(model, sub, metric, clean_logits)))

    def damage(patch: torch.Tensor) -> float:
        val = 0.0
        with torch.no_grad():
            for w, clean, up, m in data:
                val += float(m(edge_forward(model, clean, patch=patch, corrupt=up).logits)) * w
        return val

    patch = torch.zeros_like(graph.valid)
    base = damage(patch)
    current = base
    scores = torch.zeros(graph.valid.shape)
    n_tests = 0
    for r in receiver_order(graph):
        for u in range(len(graph.upstream) - 1, -1, -1):
            if not graph.valid[u, r]:
                continue
            patch[u, r] = True
            new = damage(patch)
            n_tests += 1
            change = new - current if metric == "kl" else abs(new - current)
            scores[u, r] = change
            if change < threshold:
                current = new
            else:
                patch[u, r] = False
    mask = graph.valid & ~patch
    meta = {"full_graph_metric": base, "circuit_metric": current, "n_tests": n_tests,
            "task": pairs.meta.get("task"), "prompt": pairs.clean[0]}
    return Circuit(graph, mask, scores, "acdc", model.name,
                   {"threshold": threshold, "metric": metric, "n_prompts": total}, meta)
