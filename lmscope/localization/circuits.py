"""Circuits as graph results: edge scores over the component graph, circuits picked from them, and
faithfulness checked by actually patching the complement.

The component graph (:mod:`lmscope.models.edges`) has upstream nodes ``input``, ``a{l}.h{h}`` and
``m{l}`` and receivers ``a{l}.h{h}.q|k|v``, ``m{l}`` and ``logits``. :class:`EdgeScores` holds one
score per edge (EAP, EAP-IG); :func:`extract` picks a circuit of at most n edges (:func:`select`:
the top n by |score|, or the top edges with dangling ones pruned — an edge counts only if it lies on
a path from the input to the logits inside the circuit, otherwise patching the complement makes it
a no-op — or Hanna et al.'s greedy growth from the logits); a :class:`Circuit` is a set of edges.

Edges are ranked by |score| (``absolute=True``, the default) or by *support* (``absolute=False``):
how much the edge's clean value pushes the metric towards its clean value, ``−score`` when the
clean metric is the larger. |score| finds the edges that matter either way, negative components
(negative name movers, copy suppression) included, and aims at F ≈ 1; support leaves those out
and aims at recovering as much of the metric as possible, so F can exceed 1 (the two criteria of
the MIB circuit benchmark, Mueller et al. 2025: circuit–model distance and circuit performance).
Faithfulness of a circuit (METHODS.md §5.6):

    F = (M(circuit) − M(corrupt)) / (M(clean) − M(corrupt))

where M(circuit) is the metric of the clean run with every edge *outside* the circuit carrying
its corrupted value (:func:`lmscope.models.edges.edge_forward`). :func:`faithfulness_curve` gives F
against the number of edges. Both graph objects convert to a :class:`Result` (``to_result``), so
they save as lmscope JSON, with the nodes and weighted edges listed under ``meta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from lmscope.errors import InputError
from lmscope.localization.metrics import Metric
from lmscope.localization.tasks import PromptPairs
from lmscope.models import EdgeGraph, Model, edge_forward, edge_graph, upstream_values
from lmscope.results import Axis, Result


def _node_doc(name: str) -> dict:
    """{"id", "kind", "layer", "head", "input"} of a graph node name."""
    if name in ("input", "logits"):
        return {"id": name, "kind": name, "layer": None, "head": None}
    parts = name.split(".")
    layer = int(parts[0][1:])
    if parts[0][0] == "m":
        return {"id": name, "kind": "mlp", "layer": layer, "head": None}
    doc = {"id": name, "kind": "head", "layer": layer, "head": int(parts[1][1:])}
    if len(parts) == 3:
        doc["input"] = parts[2]
    return doc


@dataclass
class EdgeScores:
    """One score per edge of ``graph`` (``scores`` (U, R), 0 where no edge exists).

    ``rank_keys``, when given, are the (U, R) keys edges are ranked by, (by |score|, by support), in
    place of ``|scores|`` and :meth:`support`: scores derived from node scores
    (:func:`lmscope.localization.node_circuits.edge_scores_from_nodes`) rank edges by their weaker end.
    """

    graph: EdgeGraph
    scores: torch.Tensor
    method: str
    model: str
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    rank_keys: tuple[torch.Tensor, torch.Tensor] | None = None

    def ranked(self) -> list[tuple[str, str, float]]:
        """Every edge as (upstream, receiver, score), largest |score| first."""
        idx = self.graph.valid.nonzero()
        vals = self.scores[idx[:, 0], idx[:, 1]]
        order = vals.abs().argsort(descending=True, stable=True)
        return [(self.graph.upstream[int(idx[i, 0])], self.graph.receivers[int(idx[i, 1])], float(vals[i]))
                for i in order.tolist()]

    def support(self) -> torch.Tensor:
        """(U, R) how much each edge's clean value supports the clean behaviour: the scores estimate
        M(edge corrupted) − M(clean), so support is −score when M(clean) ≥ M(corrupt) (as for a logit
        difference) and +score otherwise. Taken from ``meta``'s clean and corrupted metrics."""
        if self.rank_keys is not None:
            return self.rank_keys[1].clone()
        clean, corrupt = self.meta.get("clean_metric"), self.meta.get("corrupt_metric")
        if clean is None or corrupt is None:
            raise InputError("Ranking by support needs the clean and corrupted metrics (meta 'clean_metric' and "
                             "'corrupt_metric', set by eap()); rank by |score| (absolute=True) instead.")
        return -self.scores if clean >= corrupt else self.scores.clone()

    def rank_key(self, absolute: bool = True) -> torch.Tensor:
        """(U, R) the key edges are ranked by (|score| or :meth:`support`), −inf where no edge exists."""
        if absolute:
            key = self.scores.abs() if self.rank_keys is None else self.rank_keys[0]
        else:
            key = self.support()
        return torch.where(self.graph.valid, key, torch.tensor(float("-inf")))

    def top_mask(self, n: int, absolute: bool = True) -> torch.Tensor:
        """(U, R) bool: the n edges of largest |score| (or largest :meth:`support`)."""
        n_edges = self.graph.n_edges
        if not 0 <= n <= n_edges:
            raise InputError(f"A circuit of {n} edges is impossible: the graph has {n_edges} edges.")
        flat = self.rank_key(absolute).flatten()
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[flat.argsort(descending=True, stable=True)[:n]] = True
        return mask.view_as(self.graph.valid) & self.graph.valid

    def node_scores(self) -> dict[str, float]:
        """Sum of |edge score| into and out of each component (heads merge their q/k/v inputs)."""
        out: dict[str, float] = {}
        a = self.scores.abs() * self.graph.valid
        for i, name in enumerate(self.graph.upstream):
            out[name] = out.get(name, 0.0) + float(a[i].sum())
        for j, name in enumerate(self.graph.receivers):
            key = ".".join(name.split(".")[:2])
            out[key] = out.get(key, 0.0) + float(a[:, j].sum())
        return out

    def to_result(self) -> Result:
        """(upstream × receiver) Result; cells without an edge are NaN (None in JSON)."""
        vals = torch.where(self.graph.valid, self.scores.float(), torch.tensor(float("nan")))
        return Result(vals, (Axis("upstream", self.graph.upstream), Axis("receiver", self.graph.receivers)),
                      self.method, self.model, params=self.params, meta={**self.meta, "n_edges": self.graph.n_edges})


@dataclass
class Circuit:
    """A set of edges (``mask`` (U, R)) of the component graph, with their scores."""

    graph: EdgeGraph
    mask: torch.Tensor
    scores: torch.Tensor
    method: str
    model: str
    params: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def edges(self) -> list[dict]:
        idx = self.mask.nonzero()
        out = [{"source": self.graph.upstream[int(u)], "target": self.graph.receivers[int(r)],
                "score": float(self.scores[u, r])} for u, r in idx.tolist()]
        return sorted(out, key=lambda e: -abs(e["score"]))

    def nodes(self) -> list[dict]:
        names = dict.fromkeys(n for e in self.edges() for n in (e["source"], e["target"]))
        return [_node_doc(n) for n in names]

    def to_result(self) -> Result:
        """A Result over the circuit's edges (labels "source->target"), nodes and edges in ``meta``."""
        edges = self.edges()
        labels = tuple(f"{e['source']}->{e['target']}" for e in edges)
        vals = torch.tensor([e["score"] for e in edges], dtype=torch.float32)
        meta = {**self.meta, "nodes": self.nodes(), "edges": edges, "graph_edges": self.graph.n_edges}
        return Result(vals, (Axis("edge", labels),), self.method, self.model, params=self.params, meta=meta)

    def save_json(self, path):
        return self.to_result().save_json(path)

    @classmethod
    def from_result(cls, result: Result, model: Model) -> Circuit:
        """Rebuild a circuit from :meth:`to_result` (e.g. read back with ``Result.load``)."""
        graph = edge_graph(model)
        mask = torch.zeros_like(graph.valid)
        scores = torch.zeros(graph.valid.shape)
        up = {n: i for i, n in enumerate(graph.upstream)}
        rec = {n: i for i, n in enumerate(graph.receivers)}
        for e in result.meta["edges"]:
            u, r = up[e["source"]], rec[e["target"]]
            mask[u, r] = True
            scores[u, r] = e["score"]
        meta = {k: v for k, v in result.meta.items() if k not in ("nodes", "edges", "graph_edges")}
        return cls(graph, mask, scores, result.method, result.model, result.params, meta)


SELECTIONS = ("top", "pruned", "greedy")


def receiver_nodes(graph: EdgeGraph) -> torch.Tensor:
    """(R,) the upstream index of the node each receiver feeds (a head for its q/k/v inputs, an MLP
    for its input); −1 for the logits."""
    up = {n: i for i, n in enumerate(graph.upstream)}
    return torch.tensor([up[".".join(r.split(".")[:2])] if r != "logits" else -1 for r in graph.receivers])


def prune(graph: EdgeGraph, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` without its dangling edges: keep u → v only if u is reached from the input and v
    reaches the logits through edges of ``mask``.

    A dropped edge changes nothing when the complement is patched: a node none of whose inputs is
    in the circuit computes exactly its corrupted output, so its edges carry corrupted values
    anyway; a node none of whose outputs is in the circuit only writes into patched edges.
    """
    mask = mask & graph.valid
    rnode = receiver_nodes(graph)
    n_up = len(graph.upstream)
    cols = [[] for _ in range(n_up)]
    for r, u in enumerate(rnode.tolist()):
        if u >= 0:
            cols[u].append(r)
    alive = torch.zeros(n_up, dtype=torch.bool)  # reached from the input
    alive[0] = True
    for u in range(1, n_up):  # upstream order is topological
        alive[u] = bool((mask[:, cols[u]] & alive[:, None]).any())
    reaches = torch.zeros(n_up, dtype=torch.bool)  # reaches the logits
    to_logits = rnode < 0
    for u in range(n_up - 1, -1, -1):
        ok = to_logits.clone()
        ok[~to_logits] = reaches[rnode[~to_logits]]
        reaches[u] = bool((mask[u] & ok).any())
    target_ok = to_logits.clone()
    target_ok[~to_logits] = reaches[rnode[~to_logits]]
    return mask & alive[:, None] & target_ok[None, :]


def select(scores: EdgeScores, n_edges: int, how: str = "pruned", absolute: bool = True) -> torch.Tensor:
    """(U, R) bool mask of a circuit of at most ``n_edges`` edges chosen from ``scores``.

    ``how``: "top", the ``n_edges`` edges of largest |score|; "pruned", the top-k edges with
    dangling ones removed (:func:`prune`), k the largest for which at most ``n_edges`` remain;
    "greedy", grown from the logits by |score| (Hanna et al. 2024), then pruned the same way, the
    largest such circuit with at most ``n_edges`` edges. ``absolute=False`` ranks by
    :meth:`EdgeScores.support` instead of |score| (module docstring).
    """
    if how not in SELECTIONS:
        raise InputError(f"how={how!r}: use one of {SELECTIONS}.")
    graph = scores.graph
    if not 0 <= n_edges <= graph.n_edges:
        raise InputError(f"A circuit of {n_edges} edges is impossible: the graph has {graph.n_edges} edges.")
    if how == "top":
        return scores.top_mask(n_edges, absolute)
    if how == "pruned":
        def build(k: int) -> torch.Tensor:
            return scores.top_mask(k, absolute)
    else:
        if n_edges == 0:
            return torch.zeros_like(graph.valid)
        rank = _greedy_order(scores, absolute)

        def build(k: int) -> torch.Tensor:
            return rank < k

    lo, hi = n_edges, graph.n_edges  # pruned size is monotone in k: find the largest k with size <= n
    best = prune(graph, build(lo))  # pruning only removes edges: k = n_edges always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        m = prune(graph, build(mid))
        if int(m.sum()) <= n_edges:
            lo, best = mid, m
        else:
            hi = mid - 1
    return best


def _greedy_order(scores: EdgeScores, absolute: bool = True) -> torch.Tensor:
    """(U, R) long: the step at which greedy growth adds each edge (edges never added: a large value)."""
    import heapq

    graph = scores.graph
    rnode = receiver_nodes(graph)
    by_node: dict[int, list[int]] = {}
    for r, u in enumerate(rnode.tolist()):
        by_node.setdefault(u, []).append(r)
    a = scores.rank_key(absolute)
    rank = torch.full(graph.valid.shape, graph.valid.numel(), dtype=torch.long)
    heap: list = []
    seen: set[int] = set()

    def add_node(u: int) -> None:
        seen.add(u)
        for r in by_node.get(u, ()):
            col = a[:, r]
            idx = torch.isfinite(col).nonzero().flatten()
            for w, v in zip(idx.tolist(), col[idx].tolist()):
                heapq.heappush(heap, (-v, w, r))

    add_node(-1)
    step = 0
    while heap:
        _, w, r = heapq.heappop(heap)
        rank[w, r] = step
        step += 1
        if w not in seen and w != 0:
            add_node(w)
    return rank


def extract(scores: EdgeScores, n_edges: int, how: str = "top", absolute: bool = True) -> Circuit:
    """The circuit of at most ``n_edges`` edges chosen by ``how`` (:func:`select`; "top": the
    ``n_edges`` edges with the largest |score|, or the largest support if ``absolute=False``)."""
    mask = select(scores, n_edges, how, absolute)
    return Circuit(scores.graph, mask, scores.scores, scores.method, scores.model,
                   {**scores.params, "n_edges": n_edges, "selection": how,
                    "rank": "abs" if absolute else "support"}, dict(scores.meta))


def _batches(model: Model, pairs: PromptPairs, batch_size: int):
    from lmscope.localization.atp import encode_pairs

    for start in range(0, len(pairs), batch_size):
        sub = pairs.subset(range(start, min(len(pairs), start + batch_size)))
        clean, corrupt = encode_pairs(model, sub)
        yield sub, clean, corrupt


def _metric(model: Model, sub: PromptPairs, kind: str, clean_logits=None) -> Metric:
    targets, foils = sub.token_ids(model)
    return Metric(kind, targets, foils if kind == "logit_diff" else None, clean_logits)


def evaluate_masks(model: Model, pairs: PromptPairs, masks: Sequence[torch.Tensor], *,
                   metric: str = "logit_diff", batch_size: int = 16) -> dict:
    """Metric of the clean run with each circuit's complement patched, plus the clean and corrupted
    metrics: {"circuit": (N,), "clean": float, "corrupt": float}. ``masks``: (U, R) bool each."""
    graph = edge_graph(model)
    total = len(pairs)
    vals = torch.zeros(len(masks))
    clean_m = corrupt_m = 0.0
    with torch.no_grad():
        for sub, clean, corrupt in _batches(model, pairs, batch_size):
            w = len(sub) / total
            clean_logits = model.run(clean, logits="last").logits
            corrupt_logits = model.run(corrupt, logits="last").logits
            m = _metric(model, sub, metric, clean_logits)
            clean_m += float(m(clean_logits)) * w
            corrupt_m += float(m(corrupt_logits)) * w
            up = upstream_values(model, corrupt)
            for i, mask in enumerate(masks):
                run = edge_forward(model, clean, patch=graph.valid & ~mask, corrupt=up)
                vals[i] += float(m(run.logits)) * w
    return {"circuit": vals, "clean": clean_m, "corrupt": corrupt_m}


def exact_top(model: Model, pairs: PromptPairs, scores: EdgeScores, k: int, *, metric: str = "logit_diff",
              batch_size: int = 16) -> EdgeScores:
    """``scores`` with its ``k`` edges of largest |score| re-scored exactly: M(that edge alone corrupted) −
    M(clean), the quantity the first-order scores estimate, by one patched forward per edge
    (:func:`evaluate_masks`). Ranking by support trusts each score's sign, and EAP's one-gradient estimate
    can get it wrong on a strongly nonlinear edge: on SmolLM2's IOI prompts input → m0 carries the whole
    effect while EAP often scores it with the wrong sign, so no support-ranked circuit takes it (README,
    Circuit scores). Checking the top edges exactly puts such an edge back where it belongs."""
    if scores.rank_keys is not None:
        raise InputError("exact_top re-scores edges; these scores rank edges by node keys (AtP node circuits). "
                         "Use EAP or EAP-IG scores.")
    if k < 1:
        raise InputError(f"exact_top needs k ≥ 1 edges to re-score, got {k}.")
    graph = scores.graph
    key = torch.where(graph.valid, scores.scores.abs(), torch.tensor(float("-inf"))).flatten()
    idx = key.argsort(descending=True, stable=True)[:min(k, graph.n_edges)]
    masks = []
    for i in idx.tolist():
        mask = graph.valid.clone()
        mask.view(-1)[i] = False
        masks.append(mask)
    ev = evaluate_masks(model, pairs, masks, metric=metric, batch_size=batch_size)
    new = scores.scores.clone()
    new.view(-1)[idx] = (ev["circuit"] - ev["clean"]).to(new.dtype)
    return replace(scores, scores=new, params={**scores.params, "exact_top": len(idx)},
                   meta={**scores.meta, "exact_edges": [[graph.upstream[int(i) // graph.valid.shape[1]],
                                                         graph.receivers[int(i) % graph.valid.shape[1]]]
                                                        for i in idx.tolist()]})


def faithfulness_curve(model: Model, pairs: PromptPairs, scores: EdgeScores, sizes: Sequence[int] | None = None,
                       *, how: str = "top", absolute: bool = True, metric: str = "logit_diff",
                       batch_size: int = 16) -> Result:
    """Faithfulness of the circuits of at most n edges chosen by ``how`` and ``absolute``
    (:func:`select`) for each n in ``sizes`` (default: a log-spaced grid from 0.1% to 100% of the
    edges), each checked by patching every other edge to its corrupted value. Values: normalised F;
    extras ``metric`` (raw M(circuit)), ``fraction`` (n over all edges) and ``kept`` (edges actually
    in each circuit, ≤ n when dangling edges were pruned)."""
    n_all = scores.graph.n_edges
    if sizes is None:
        fracs = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
        sizes = sorted({max(1, round(f * n_all)) for f in fracs})
    sizes = [int(n) for n in sizes]
    masks = [select(scores, n, how, absolute) for n in sizes]
    ev = evaluate_masks(model, pairs, masks, metric=metric, batch_size=batch_size)
    gap = ev["clean"] - ev["corrupt"]
    if abs(gap) < 1e-6:
        raise InputError("Clean and corrupted prompts give the same metric; faithfulness is undefined.")
    faith = (ev["circuit"] - ev["corrupt"]) / gap
    return Result(faith, (Axis("n_edges", tuple(sizes)),), "faithfulness", model.name,
                  params={"scores": scores.method, "metric": metric, "n_prompts": len(pairs), "selection": how,
                          "rank": "abs" if absolute else "support", **scores.params},
                  extras={"metric": ev["circuit"], "fraction": torch.tensor(sizes, dtype=torch.float32) / n_all,
                          "kept": torch.tensor([int(m.sum()) for m in masks], dtype=torch.float32)},
                  meta={"clean_metric": ev["clean"], "corrupt_metric": ev["corrupt"], "graph_edges": n_all})
