"""Information-flow routes (Ferrando & Voita 2024): the contribution graph behind Meta's LLM
Transparency Tool, built from one forward pass with no contrastive prompt.

Nodes are residual states: the embedding ``X0_t``, the state after attention ``A{l}_t``
(resid_mid), the MLP ``M{l}_t`` and the state after the MLP ``I{l}_t`` (resid_post), per layer l and
position t. Each state is a sum of parts, and each part's importance is its ALTI-style proximity
to the whole (L1 norm), normalised over the parts:

    prox(z_k, y) = max(ε, ‖y‖₁ − ‖y − z_k‖₁),   imp(z_k) = prox(z_k, y) / Σ_k' prox(z_k', y),  ε = 1e-5

* into ``A{l}_i``: one part per source position j ≤ i and head h, ``A^{l,h}_{ij} (v_j^h W_O^h)``
  (v includes the value bias; grouped K/V heads are expanded per query head), and the incoming
  residual ``resid_pre_i``; the whole is resid_pre_i + attn_out_i (the output bias is in the whole
  but is no part). A token-to-token edge weighs the sum over its heads.
* into ``I{l}_i``: the MLP write and resid_mid_i; the whole is resid_post_i. ``M{l}_i`` has one
  incoming edge, from ``A{l}_i``, of weight 1.

Post-norm models use each head's write with the block's post-norm scale frozen; parallel blocks
(NeoX) use resid_pre + attn_out as the intermediate state. The route: starting from ``I{L-1}_p``
(default p = last position), keep incoming edges with importance > τ (default 0.04, the tool's),
renormalise the kept edges of each node to sum to 1 (the tool's default) and continue from their
sources, layer by layer down to the embeddings. Shapes: T tokens, L layers, H heads.

Memory: the per-head parts of the attention decomposition (T(T+1)/2 causal pairs × H × D) are formed in
blocks of at most ``CHUNK_FLOATS`` floats and reduced to their (T, T, H) importances at once, so the
T²·H·D tensor is never held. ``flow-graph`` returns the full graph (every edge above a floor, all
positions), from which :func:`route` gives the route into any position at any threshold without a new
forward (the app's slider).
"""

from __future__ import annotations

from lmscope import specs
from collections import deque
from dataclasses import dataclass

import torch

from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_layers, resolve_position

EPS = 1e-5
TOP_PREDICTIONS = 5  # next-token predictions kept per position (the graph view offers them)
CHUNK_FLOATS = 1 << 22  # floats of per-head parts held at once (16 MB in float32)
DEFAULT_THRESHOLD = 0.04
_LETTER = {"attn": "A", "mlp": "M", "resid": "I"}


@dataclass
class FlowContributions:
    """Normalised importances of every part, per layer (one prompt).

    attn (L, T, T, H): source j, head h into A{l}_i (zero for j > i); attn_resid (L, T): resid_pre_i
    into A{l}_i; mlp (L, T): the MLP into I{l}_i; mlp_resid (L, T): resid_mid_i into I{l}_i.
    For every node, its parts sum to 1.
    """

    attn: torch.Tensor
    attn_resid: torch.Tensor
    mlp: torch.Tensor
    mlp_resid: torch.Tensor
    tokens: list[str]
    top_ids: torch.Tensor | None = None  # (T, K) the model's top next-token predictions at each position
    top_probs: torch.Tensor | None = None  # (T, K) their probabilities


def _proximity(whole: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """whole (T, D), parts (T, K, D) -> (T, K) max(ε, ‖y‖₁ − ‖y − z_k‖₁)."""
    return (whole.abs().sum(-1, keepdim=True) - (whole.unsqueeze(1) - parts).abs().sum(-1)).clamp(min=EPS)


GRAPH_KINDS = ("attn.v", "attn.pattern", "resid_pre", "attn_out", "mlp_out", "resid_post")
NODE_KINDS = ("attn.head_out", "mlp.post")  # what the node panels (flow-node) read besides the graph's sites


def graph_run(model: Model, prompt: str, layers: list[int] | None = None):
    """The graph's forward: the graph's sites and the node panels' (head writes, neuron activations), the
    embedding, the final norm's scale and all logits, at every layer or only at ``layers`` — but always
    with every layer's attention pattern, so every layer takes the same (explicit) attention path and the
    values are those of the whole graph's forward to the last bit. ``flow-graph`` and every ``flow-node``
    read it; inside the app (a :class:`~lmscope.models.memo.RunMemo`) a node click reads the graph's stored
    forward and runs no new one."""
    model.require(["attn_out", "mlp_out"], "Information flow routes")
    n = model.spec.n_layers
    have = set(model.site_kinds)
    kinds = GRAPH_KINDS + tuple(k for k in NODE_KINDS if k in have)
    sites = [f"blocks.{l}.{k}" for l in resolve_layers(layers, n) for k in kinds]
    sites += [f"blocks.{l}.attn.pattern" for l in range(n)] + [k for k in ("embed", "final.scale") if k in have]
    with torch.no_grad():
        return model.run(prompt, cache=sites, logits="all" if layers is None else "none")


def _layer_importances(model: Model, run, layer: int, t: int, step: int) -> tuple[torch.Tensor, ...]:
    """One layer's importances from its sites in ``run``: (attn (T, T, H), attn_resid (T,), mlp (T,),
    mlp_resid (T,)), the attention parts formed ``step`` causal pairs at a time."""
    h_n = model.spec.n_heads
    ii, jj = torch.tril_indices(t, t)
    pre = f"blocks.{layer}."
    with torch.no_grad():
        factor = run.cache.get(f"aux.blocks.{layer}.attn_write_factor")
        vw = model.head_writes(layer, run[pre + "attn.v"].float(),
                               None if factor is None else factor.float())[0]  # (T_j, H, D)
        a = run[pre + "attn.pattern"][0].float()  # (H, T_i, T_j)
        x_pre = run[pre + "resid_pre"][0].float()
        mid = x_pre + run[pre + "attn_out"][0].float()
        mid_l1 = mid.abs().sum(-1)
        prox = torch.zeros(t, t, h_n)
        for lo in range(0, len(ii), step):
            pi, pj = ii[lo:lo + step], jj[lo:lo + step]
            parts = a[:, pi, pj].T.unsqueeze(-1) * vw[pj]  # (chunk, H, D)
            dist = (mid[pi].unsqueeze(1) - parts).abs().sum(-1)  # (chunk, H)
            prox[pi, pj] = (mid_l1[pi].unsqueeze(1) - dist).clamp(min=EPS)
        prox_res = _proximity(mid, x_pre.unsqueeze(1))[:, 0]
        total = prox.sum(dim=(1, 2)) + prox_res
        post = run[pre + "resid_post"][0].float()
        mparts = torch.stack([run[pre + "mlp_out"][0].float(), mid], dim=1)  # (T, 2, D)
        mprox = _proximity(post, mparts)
        mprox = mprox / mprox.sum(-1, keepdim=True)
    return prox / total[:, None, None], prox_res / total, mprox[:, 0], mprox[:, 1]


def flow_contributions(model: Model, prompt: str, layers: list[int] | None = None, run=None) -> FlowContributions:
    """Importances of every edge of the contribution graph for ``prompt`` (one forward pass); with
    ``layers``, only those layers (the leading axis of every tensor then follows ``layers``). ``run``: a
    forward of ``prompt`` that recorded those layers' sites (:func:`graph_run`) instead of a new one."""
    model.require(["attn_out", "mlp_out"], "Information flow routes")
    s = model.spec
    h_n = s.n_heads
    every = layers is None
    layers = resolve_layers(layers, s.n_layers)
    sites = [f"blocks.{l}.{k}" for l in layers for k in GRAPH_KINDS]
    if s.post_norms:
        sites += [f"blocks.{l}.attn.head_out" for l in layers]  # records the frozen post-norm factors
    if run is None:
        with torch.no_grad():
            run = model.run(prompt, cache=sites, logits="all" if every else "none")
    if run.batch.input_ids.shape[0] != 1:
        raise InputError("flow_contributions takes one prompt.")
    t = run.batch.input_ids.shape[1]
    # blockwise over the causal pairs (j <= i): at most CHUNK_FLOATS floats of (pairs, H, D) parts at a time,
    # so the T²·H·D decomposition is never held (only the (T, T, H) importances are kept per layer). A layer's
    # importances depend on its sites of this forward alone: inside the app they are kept with the forward
    # (Model.derived), so an attention-edge click reads the graph's instead of decomposing the layer again.
    step = max(1, CHUNK_FLOATS // (h_n * s.d_model))
    per_layer = [model.derived(run, ("flow_contributions", layer, step),
                               lambda layer=layer: _layer_importances(model, run, layer, t, step)) for layer in layers]
    attn, attn_res, mlp, mlp_res = (list(x) for x in zip(*per_layer))
    top_ids = top_probs = None
    if every:  # the model's own predictions come with the whole graph
        top_probs, top_ids = run.logits[0].float().softmax(-1).topk(min(TOP_PREDICTIONS, s.d_vocab), dim=-1)
    return FlowContributions(torch.stack(attn), torch.stack(attn_res), torch.stack(mlp), torch.stack(mlp_res),
                             run.batch.str_tokens[0], top_ids, top_probs)


def node_id(component: str, layer: int, pos: int) -> str:
    """``X0_t`` (embedding), ``A{l}_t`` (after attention), ``M{l}_t`` (MLP), ``I{l}_t`` (after the MLP)."""
    return f"X0_{pos}" if component == "embed" else f"{_LETTER[component]}{layer}_{pos}"


def graph_edges(c: FlowContributions, floor: float) -> list[dict]:
    """Every edge of the full contribution graph (all positions) with importance > ``floor``, unnormalised.

    Edges: ``{"source", "target", "weight", "kind"}`` with kind "attn" (a token-to-token edge into an
    ``A`` node, with ``heads``: the per-head importances, summing to the weight), "resid" (the residual
    into an ``A`` or ``I`` node) or "mlp" (``M{l}_i -> I{l}_i``). :func:`route` thresholds them.
    """
    n, t = c.attn.shape[0], c.attn.shape[1]
    edges: list[dict] = []
    for layer in range(n):
        src = "embed" if layer == 0 else "resid"
        per_src = c.attn[layer].sum(-1)  # (T_i, T_j)
        for i, j in (per_src > floor).nonzero().tolist():
            edges.append({"source": node_id(src, layer - 1, j), "target": node_id("attn", layer, i),
                          "weight": float(per_src[i, j]), "kind": "attn",
                          "heads": [round(float(x), 6) for x in c.attn[layer, i, j]]})
        for i in (c.attn_resid[layer] > floor).nonzero()[:, 0].tolist():
            edges.append({"source": node_id(src, layer - 1, i), "target": node_id("attn", layer, i),
                          "weight": float(c.attn_resid[layer, i]), "kind": "resid"})
        for i in (c.mlp[layer] > floor).nonzero()[:, 0].tolist():
            edges.append({"source": node_id("mlp", layer, i), "target": node_id("resid", layer, i),
                          "weight": float(c.mlp[layer, i]), "kind": "mlp"})
        for i in (c.mlp_resid[layer] > floor).nonzero()[:, 0].tolist():
            edges.append({"source": node_id("attn", layer, i), "target": node_id("resid", layer, i),
                          "weight": float(c.mlp_resid[layer, i]), "kind": "resid"})
    return edges


def _parse_node(nid: str) -> tuple[str, int, int]:
    comp = {"X": "embed", "A": "attn", "M": "mlp", "I": "resid"}[nid[0]]
    layer, pos = nid[1:].split("_")
    return comp, (-1 if comp == "embed" else int(layer)), int(pos)


def route(edges: list[dict], n_layers: int, position: int, threshold: float, renormalize: bool = True
          ) -> list[dict]:
    """The route into ``I{n_layers-1}_{position}``: from the top down, each reached node keeps its incoming
    edges with weight > ``threshold`` (renormalised to sum to 1), and their sources are reached in turn; a kept
    MLP edge brings the edge ``A{l}_i -> M{l}_i`` of weight 1. ``edges`` are :func:`graph_edges` with a floor
    at most ``threshold``. The app's graph view (``app/static/route.js``) runs the same steps in the browser.
    """
    incoming: dict[str, list[dict]] = {}
    for e in edges:
        incoming.setdefault(e["target"], []).append(e)
    start = node_id("resid", n_layers - 1, position)
    reached, frontier, out = {start}, deque([start]), []
    while frontier:  # breadth first from the top; what a node keeps does not depend on the order
        nid = frontier.popleft()
        comp, layer, pos = _parse_node(nid)
        if comp == "mlp":
            kept = [{"source": node_id("attn", layer, pos), "target": nid, "weight": 1.0, "kind": "mlp"}]
        else:
            kept = [dict(e) for e in incoming.get(nid, []) if e["weight"] > threshold]
            total = sum(e["weight"] for e in kept)
            for e in kept:
                w = e["weight"] / total if renormalize else e["weight"]
                if "heads" in e:
                    e["heads"] = [round(x * w / e["weight"], 6) for x in e["heads"]]
                e["weight"] = w
        for e in kept:
            out.append(e)
            if e["source"] not in reached:
                reached.add(e["source"])
                frontier.append(e["source"])
    return out


def _nodes(edges: list[dict], start: str, tokens: list[str]) -> list[dict]:
    ids = [start] + [x for e in edges for x in (e["target"], e["source"])]
    nodes = {}
    for nid in ids:
        if nid not in nodes:
            comp, layer, pos = _parse_node(nid)
            nodes[nid] = {"id": nid, "layer": layer, "position": pos,
                          "component": comp, "token": tokens[pos]}
    return list(nodes.values())


def _check_threshold(threshold: float, what: str = "threshold") -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InputError(f"{what}={threshold!r}: the importance threshold must lie strictly between 0 and 1 "
                         "(the tool's default is 0.04).")


def flow(model: Model, prompt: str, *, position: int | None = None, threshold: float = DEFAULT_THRESHOLD,
         renormalize: bool = True, contributions: FlowContributions | None = None) -> Result:
    """The information-flow route into ``position`` (default last) as a graph Result.

    Values: the weight of each kept edge (axis ``edge``, labels "source->target"); ``meta["nodes"]``
    lists nodes (id, layer, position, component, token) and ``meta["edges"]`` the weighted edges
    (source, target, weight, kind "attn"|"resid"|"mlp", and per-head weights for attention edges).
    """
    _check_threshold(threshold)
    c = contributions or flow_contributions(model, prompt)
    n, t = c.attn.shape[0], c.attn.shape[1]
    position = resolve_position(position, t)
    edges = route(graph_edges(c, threshold), n, position, threshold, renormalize)
    vals = torch.tensor([e["weight"] for e in edges], dtype=torch.float32)
    labels = tuple(f"{e['source']}->{e['target']}" + (f"({e['kind']})" if e["kind"] == "resid" else "")
                   for e in edges)
    meta = {"nodes": _nodes(edges, node_id("resid", n - 1, position), c.tokens), "edges": edges,
            "tokens": c.tokens, "position": position, "prompt": prompt}
    return Result(vals, (Axis("edge", labels),), "flow", model.name,
                  params={"threshold": threshold, "renormalize": renormalize, "position": position}, meta=meta)


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class FlowConfig:
    """Information-flow routes into one position."""

    position: int | None = specs.option(None, "Token position to explain (default: last).")
    threshold: float = specs.option(DEFAULT_THRESHOLD, "Importance threshold τ in (0, 1).")

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise InputError(f"--threshold {self.threshold}: the threshold must lie strictly between 0 and 1.")


def run_flow(model: Model, prompt: specs.Prompt, config: FlowConfig) -> Result:
    """Information-flow routes (Ferrando & Voita 2024): the contribution graph into one position."""
    return flow(model, prompt.text, position=config.position, threshold=config.threshold)


specs.register(specs.MethodSpec("flow", "localization", "prompt", FlowConfig, run_flow,
                                sites=("attn.head_out", "mlp_out", "resid_pre"), cli_inputs=("text",)))


@dataclass(frozen=True)
class FlowGraphConfig:
    """The full contribution graph of a prompt (every position), for the app's graph view."""

    floor: float = specs.option(0.01, "Keep edges with importance above this (the lowest threshold a view may use).")

    def __post_init__(self):
        _check_threshold(self.floor, "floor")


def run_flow_graph(model: Model, prompt: specs.Prompt, config: FlowGraphConfig) -> Result:
    """The full information-flow graph of a prompt: every edge above ``floor``, unnormalised, with each
    position's top next-token predictions. The route into any position at any threshold ≥ floor is
    :func:`route` of ``meta["edges"]`` (the app does it in the browser, without a new forward).

    Values: edge weights (axis ``edge``); meta: ``edges``, ``tokens``, ``n_layers``, ``n_heads``, ``floor``,
    ``predictions`` (per position, a list of [token, probability]).
    """
    c = flow_contributions(model, prompt.text, run=graph_run(model, prompt.text))
    edges = graph_edges(c, config.floor)
    vals = torch.tensor([e["weight"] for e in edges], dtype=torch.float32)
    labels = tuple(f"{e['source']}->{e['target']}({e['kind']})" for e in edges)
    preds = [[[model.decode([i]), round(float(p), 6)] for i, p in zip(ids, ps)]
             for ids, ps in zip(c.top_ids.tolist(), c.top_probs.tolist())]
    meta = {"edges": edges, "tokens": c.tokens, "n_layers": c.attn.shape[0], "n_heads": c.attn.shape[-1],
            "floor": config.floor, "predictions": preds, "prompt": prompt.text}
    return Result(vals, (Axis("edge", labels),), "flow-graph", model.name, params={"floor": config.floor}, meta=meta)


specs.register(specs.MethodSpec("flow-graph", "localization", "prompt", FlowGraphConfig, run_flow_graph,
                                sites=("attn.head_out", "mlp_out", "resid_pre"), cli_inputs=("text",)))
