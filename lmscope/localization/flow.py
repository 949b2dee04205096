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
"""

from __future__ import annotations

from lmscope import specs
from dataclasses import dataclass

import torch

from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_position

EPS = 1e-5
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


def _proximity(whole: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """whole (T, D), parts (T, K, D) -> (T, K) max(ε, ‖y‖₁ − ‖y − z_k‖₁)."""
    return (whole.abs().sum(-1, keepdim=True) - (whole.unsqueeze(1) - parts).abs().sum(-1)).clamp(min=EPS)


def flow_contributions(model: Model, prompt: str) -> FlowContributions:
    """Importances of every edge of the contribution graph for ``prompt`` (one forward pass)."""
    model.require(["attn_out", "mlp_out"], "Information flow routes")
    s = model.spec
    n, h_n = s.n_layers, s.n_heads
    sites = [f"blocks.{l}.{k}" for l in range(n) for k in
             ("attn.v", "attn.pattern", "resid_pre", "attn_out", "mlp_out", "resid_post")]
    if s.post_norms:
        sites += [f"blocks.{l}.attn.head_out" for l in range(n)]  # records the frozen post-norm factors
    with torch.no_grad():
        run = model.run(prompt, cache=sites, logits="none")
    if run.batch.input_ids.shape[0] != 1:
        raise InputError("flow_contributions takes one prompt.")
    t = run.batch.input_ids.shape[1]
    ii, jj = torch.tril_indices(t, t)
    attn, attn_res, mlp, mlp_res = [], [], [], []
    with torch.no_grad():
        for layer in range(n):
            pre = f"blocks.{layer}."
            factor = run.cache.get(f"aux.blocks.{layer}.attn_write_factor")
            vw = model.head_writes(layer, run[pre + "attn.v"].float(),
                                   None if factor is None else factor.float())[0]  # (T_j, H, D)
            a = run[pre + "attn.pattern"][0].float()  # (H, T_i, T_j)
            x_pre = run[pre + "resid_pre"][0].float()
            mid = x_pre + run[pre + "attn_out"][0].float()
            # only the causal pairs j <= i: (P, H, D) parts for P = T(T+1)/2 pairs
            parts = a[:, ii, jj].T.unsqueeze(-1) * vw[jj]
            dist = (mid[ii].unsqueeze(1) - parts).abs().sum(-1)  # (P, H)
            prox_p = (mid.abs().sum(-1)[ii].unsqueeze(1) - dist).clamp(min=EPS)
            prox = torch.zeros(t, t, h_n)
            prox[ii, jj] = prox_p
            prox_res = _proximity(mid, x_pre.unsqueeze(1))[:, 0]
            total = prox.sum(dim=(1, 2)) + prox_res
            attn.append(prox / total[:, None, None])
            attn_res.append(prox_res / total)
            post = run[pre + "resid_post"][0].float()
            mparts = torch.stack([run[pre + "mlp_out"][0].float(), mid], dim=1)  # (T, 2, D)
            mprox = _proximity(post, mparts)
            mprox = mprox / mprox.sum(-1, keepdim=True)
            mlp.append(mprox[:, 0])
            mlp_res.append(mprox[:, 1])
    return FlowContributions(torch.stack(attn), torch.stack(attn_res), torch.stack(mlp), torch.stack(mlp_res),
                             run.batch.str_tokens[0])


def flow(model: Model, prompt: str, *, position: int | None = None, threshold: float = DEFAULT_THRESHOLD,
         renormalize: bool = True, contributions: FlowContributions | None = None) -> Result:
    """The information-flow route into ``position`` (default last) as a graph Result.

    Values: the weight of each kept edge (axis ``edge``, labels "source->target"); ``meta["nodes"]``
    lists nodes (id, layer, position, component, token) and ``meta["edges"]`` the weighted edges
    (source, target, weight, kind "attn"|"resid"|"mlp", and per-head weights for attention edges).
    """
    if not 0 < threshold < 1:
        raise InputError(f"threshold={threshold}: the importance threshold must lie strictly between 0 and 1 "
                         "(the tool's default is 0.04).")
    c = contributions or flow_contributions(model, prompt)
    n, t = c.attn.shape[0], c.attn.shape[1]
    position = resolve_position(position, t)
    nodes: dict[str, dict] = {}
    edges: list[dict] = []

    def node(comp: str, layer: int, pos: int) -> str:
        nid = f"X0_{pos}" if comp == "embed" else f"{_LETTER[comp]}{layer}_{pos}"
        if nid not in nodes:
            nodes[nid] = {"id": nid, "layer": layer, "position": pos, "component": comp, "token": c.tokens[pos]}
        return nid

    def keep(weights: dict) -> dict:
        kept = {k: w for k, w in weights.items() if w > threshold}
        if renormalize and kept:
            total = sum(kept.values())
            kept = {k: w / total for k, w in kept.items()}
        return kept

    frontier = {position}
    node("resid", n - 1, position)
    for layer in range(n - 1, -1, -1):
        a_front = set()
        for i in sorted(frontier):
            target = node("resid", layer, i)
            kept = keep({"mlp": float(c.mlp[layer, i]), "resid": float(c.mlp_resid[layer, i])})
            if "mlp" in kept:
                m = node("mlp", layer, i)
                edges.append({"source": m, "target": target, "weight": kept["mlp"], "kind": "mlp"})
                edges.append({"source": node("attn", layer, i), "target": m, "weight": 1.0, "kind": "mlp"})
            if "resid" in kept:
                edges.append({"source": node("attn", layer, i), "target": target, "weight": kept["resid"],
                              "kind": "resid"})
            if kept:
                a_front.add(i)
        frontier = set()
        src_comp = "embed" if layer == 0 else "resid"
        for i in sorted(a_front):
            target = node("attn", layer, i)
            per_src = c.attn[layer, i].sum(-1)  # (T,)
            weights = {("attn", j): float(per_src[j]) for j in range(i + 1)}
            weights[("resid", i)] = float(c.attn_resid[layer, i])
            kept = keep(weights)
            for (kind, j), w in kept.items():
                e = {"source": node(src_comp, layer - 1, j), "target": target, "weight": w, "kind": kind}
                if kind == "attn":
                    heads = c.attn[layer, i, j]
                    scale = w / float(per_src[j]) if float(per_src[j]) > 0 else 0.0
                    e["heads"] = [round(float(x) * scale, 6) for x in heads]
                edges.append(e)
                frontier.add(j)
    vals = torch.tensor([e["weight"] for e in edges], dtype=torch.float32)
    labels = tuple(f"{e['source']}->{e['target']}" + (f"({e['kind']})" if e["kind"] == "resid" else "")
                   for e in edges)
    meta = {"nodes": list(nodes.values()), "edges": edges, "tokens": c.tokens, "position": position,
            "prompt": prompt}
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
