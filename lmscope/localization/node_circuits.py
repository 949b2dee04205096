"""Circuits from node scores: AtP's per-head and per-MLP estimates as a ranking of the graph's edges.

AtP (:mod:`lmscope.localization.atp`) scores nodes (each head's output, each MLP's), not edges. A
circuit built from node scores is a set of nodes, and its edges are the edges of the component graph
(:mod:`lmscope.models.edges`) between nodes of the set, the input and the logits always included. To
compare such circuits with edge circuits of the same size (faithfulness curves, the MIB areas of
:mod:`lmscope.localization.circuit_scores`), each edge is ranked by its weaker end:

    key(u → v) = min(key(u), key(node(v))),   key(input) = key(logits) = +∞

where node(v) is the head a q/k/v input belongs to (or the MLP) and key is |score| or the node's
*support* (−score when the clean metric is the larger: the scores estimate M(node corrupted) −
M(clean), as edge scores do). Every edge among the k top-ranked nodes then ranks above every edge
that touches a node ranked lower, so the top-n edges are the circuit of the top nodes grown one node
at a time and cut at exactly n edges (the last node with only part of its edges).

The edge's own score (shown in circuits and tables) is the score of its weaker end by |score|.
AtP runs in the noising direction here (corrupted values into the clean run, the edges' convention).
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.localization.circuits import EdgeScores, receiver_nodes
from lmscope.localization.tasks import PromptPairs
from lmscope.models import EdgeGraph, Model, edge_graph


def edge_scores_from_nodes(graph: EdgeGraph, node_scores: dict[str, float], method: str, model: str, *,
                           clean_metric: float, corrupt_metric: float, params: dict | None = None,
                           meta: dict | None = None) -> EdgeScores:
    """Edge scores ranked by their weaker end (module docstring) from one score per upstream node
    (``node_scores``: "a{l}.h{h}" and "m{l}" → score; the input needs none)."""
    missing = [u for u in graph.upstream[1:] if u not in node_scores]
    if missing:
        raise InputError(f"No node score for {missing[:3]}{' ...' if len(missing) > 3 else ''}: give one score per "
                         "head ('a{l}.h{h}') and MLP ('m{l}') of the graph.")
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    s_up = torch.tensor([0.0] + [float(node_scores[u]) for u in graph.upstream[1:]], dtype=torch.float64)
    sign = -1.0 if clean_metric >= corrupt_metric else 1.0
    rnode = receiver_nodes(graph)
    is_logits = rnode < 0
    idx = rnode.clamp_min(0)

    def ends(key_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key_up = torch.cat([inf, key_up[1:]])  # the input is in every circuit
        key_rec = torch.where(is_logits, inf, key_up[idx])  # so are the logits
        return key_up[:, None], key_rec[None, :]

    up_abs, rec_abs = ends(s_up.abs())
    up_sup, rec_sup = ends(sign * s_up)
    s_rec = torch.where(is_logits, torch.zeros(()), s_up[idx])[None, :]
    signed = torch.where(up_abs <= rec_abs, s_up[:, None].expand(-1, len(rnode)), s_rec.expand(len(s_up), -1))
    signed = torch.where(torch.isinf(torch.minimum(up_abs, rec_abs)), 0.0, signed)  # input → logits: no node
    valid = graph.valid
    keys = (torch.minimum(up_abs, rec_abs).float(), torch.minimum(up_sup, rec_sup).float())  # inf: input → logits
    return EdgeScores(graph, signed.float() * valid, method, model, dict(params or {}),
                      {**(meta or {}), "clean_metric": clean_metric, "corrupt_metric": corrupt_metric,
                       "node_scores": {k: float(v) for k, v in node_scores.items()}},
                      rank_keys=keys)


def atp_edge_scores(model: Model, pairs: PromptPairs, *, metric: str = "logit_diff",
                    batch_size: int = 16) -> EdgeScores:
    """AtP node scores (noising: heads' ``attn.z``, MLPs' ``mlp_out``) as edge scores ranked by their
    weaker end (module docstring)."""
    from lmscope.localization.atp import atp

    graph = edge_graph(model)
    nodes = ("head", "mlp") if graph.has_mlp else ("head",)
    res = atp(model, pairs, nodes=nodes, direction="noise", metric=metric, normalise=False, batch_size=batch_size)
    heads = res["head"].values
    scores = {f"a{l}.h{h}": float(heads[l, h]) for l in range(graph.n_layers) for h in range(graph.n_heads)}
    if graph.has_mlp:
        scores.update({f"m{l}": float(v) for l, v in enumerate(res["mlp"].values.tolist())})
    meta = res["head"].meta
    return edge_scores_from_nodes(graph, scores, "atp", model.name, clean_metric=meta["clean_metric"],
                                  corrupt_metric=meta["corrupt_metric"],
                                  params={"method": "atp", "metric": res["head"].params["metric"],
                                          "n_prompts": len(pairs)},
                                  meta={"task": pairs.meta.get("task"), "prompt": pairs.clean[0],
                                        "corrupt_prompt": pairs.corrupt[0]})
