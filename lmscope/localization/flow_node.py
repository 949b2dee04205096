"""What one node of the contribution graph holds (the LLM Transparency Tool's side panels).

The graph of :mod:`lmscope.localization.flow` says how much each part feeds each residual state; this
spec opens one node of it at (layer, position):

* ``attn_heads`` (an attention edge into ``A{l}_i``): per head, its contribution map (the normalised
  importance of head h, source j into ``A{l}_j'`` for every j' — the same numbers as the graph, shape
  (H, T, T)), its attention pattern (``extras["pattern"]``, H × T × T), and the tokens its write at
  position i promotes and suppresses: the write read through the unembedding with the final norm's
  scale frozen at position i (``meta["promotes"]``/``["suppresses"]``, k per head). With ``head``, only
  that head's maps and tokens (the same numbers: the app asks for the head it shows, a tenth of the data).
* ``mlp_neurons`` (``M{l}_i``): the k neurons whose write ``a_n · W_out[n]`` (post-norm frozen where the
  block has one) is closest to the MLP's write in the graph's L1 proximity, normalised over all neurons;
  ``extras["activation"]``, and per neuron the tokens its write promotes and suppresses.
* ``resid_mid`` / ``resid_post`` / ``embed`` (``A{l}_i`` / ``I{l}_i`` / ``X0_i``): the logit lens of the
  state (final norm live, as the model reads its last state), top-k tokens with probabilities, and
  each one's rank in the state before it (``extras["rank_before"]``; resid_pre for A, A for I, the same
  state for the embedding), and the prompt's target, if given, in ``meta["target"]``.

Every node reads the graph's own forward (:func:`~lmscope.localization.flow.graph_run`: the same values as
the graph, and in the app no new forward); only the node's layer is decomposed, no T²·H·D tensor is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.localization.flow import EPS, flow_contributions, graph_run
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count, resolve_index, resolve_position

COMPONENTS = ("attn_heads", "mlp_neurons", "resid_mid", "resid_post", "embed")


@dataclass(frozen=True)
class FlowNodeConfig:
    """One node of the contribution graph: heads, neurons or the logit lens of a residual state."""

    component: str = specs.option("resid_post", "attn_heads | mlp_neurons | resid_mid | resid_post | embed",
                                  choices=COMPONENTS)
    layer: int = specs.option(0, "Layer of the node (ignored for embed).")
    position: int | None = specs.option(None, "Token position of the node (default: last).")
    k: int = specs.option(10, "Top tokens (and neurons) shown.")
    head: int | None = specs.option(None, "attn_heads: only this head's maps and tokens (default: every head).")

    def __post_init__(self):
        specs.check_config(self)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"k={self.k!r}: give a positive number of top tokens.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise InputError(f"layer={self.layer!r}: give a layer index.")
        if self.head is not None and (isinstance(self.head, bool) or not isinstance(self.head, int)):
            raise InputError(f"head={self.head!r}: give a head index (or leave it out for every head).")


def _top_bottom(model: Model, logits_ND: torch.Tensor, k: int) -> tuple[list, list]:
    """Per row: the k tokens with the largest and with the smallest logits, as [token, logit]."""
    k = min(k, logits_ND.shape[-1])
    up, down = logits_ND.topk(k, dim=-1), logits_ND.topk(k, dim=-1, largest=False)

    def rows(t):
        return [[[model.decode([i]), round(float(v), 4)] for i, v in zip(ids, vals)]
                for ids, vals in zip(t.indices.tolist(), t.values.tolist())]

    return rows(up), rows(down)


def _heads(model: Model, run, text: str, layer: int, pos: int, k: int, head: int | None) -> Result:
    c = flow_contributions(model, text, [layer], run=run)  # in the app: the graph's, kept with its forward
    pre = f"blocks.{layer}."
    n_heads = model.spec.n_heads
    heads = list(range(n_heads)) if head is None else [resolve_index(head, n_heads, "head", "the layer")]
    with torch.no_grad():
        writes = run[pre + "attn.head_out"][0, pos][heads].float()  # (H, D)
        scale = run["final.scale"][0, pos]
        # one read-out per head, so a head's tokens are the same to the bit whether asked alone or with the rest
        logits = torch.cat([model.unembed(w[None], scale=scale) for w in writes])
    promotes, suppresses = _top_bottom(model, logits, k)
    tokens = c.tokens
    maps = c.attn[0].permute(2, 0, 1)[heads].contiguous()  # (H, T_i, T_j)
    labels = tuple(f"{i}:{tok}" for i, tok in enumerate(tokens))
    axes = (Axis("head", tuple(str(h) for h in heads)), Axis("target", labels), Axis("source", labels))
    meta = {"tokens": tokens, "promotes": promotes, "suppresses": suppresses,
            "value": "importance of head h, source j into A{layer}_i (as in the graph)"}
    params = {"component": "attn_heads", "layer": layer, "position": pos, "k": k} | (
        {} if head is None else {"head": heads[0]})
    return Result(maps, axes, "flow-node", model.name, None, params,
                  {"pattern": run[pre + "attn.pattern"][0][heads].float()}, meta)


def _neurons(model: Model, run, layer: int, pos: int, k: int) -> Result:
    model.require(["mlp.post"], "flow-node mlp_neurons")
    pre = f"blocks.{layer}."
    with torch.no_grad():
        act = run[pre + "mlp.post"][0, pos].float()  # (F,)
        writes = act[:, None] * model.W_out(layer).detach().float()  # (F, D)
        factor = run.cache.get(f"aux.blocks.{layer}.mlp_write_factor")
        if factor is not None:  # post-norm frozen at its value here
            writes = writes * factor[0, pos].float()
        whole = writes.sum(0)
        bias = model.b_out(layer)
        if bias is not None:
            whole = whole + bias.detach().float() * (1.0 if factor is None else factor[0, pos].float())
        prox = (whole.abs().sum() - (whole - writes).abs().sum(-1)).clamp(min=EPS)
        imp = prox / prox.sum()
        k = resolve_count(min(k, imp.numel()), imp.numel(), "top neurons")
        top = imp.topk(k)
        logits = model.unembed(writes[top.indices], scale=run["final.scale"][0, pos])
    promotes, suppresses = _top_bottom(model, logits, k)
    tokens = run.batch.str_tokens[0]
    meta = {"tokens": tokens, "promotes": promotes, "suppresses": suppresses,
            "value": "L1 proximity of the neuron's write to the MLP's write, normalised over neurons"}
    return Result(top.values, (Axis("neuron", tuple(str(n) for n in top.indices.tolist())),), "flow-node",
                  model.name, None, {"component": "mlp_neurons", "layer": layer, "position": pos, "k": k},
                  {"activation": act[top.indices]}, meta)


def _state(model: Model, run, target, component: str, layer: int, pos: int, k: int) -> Result:
    pre = f"blocks.{layer}."
    with torch.no_grad():
        if component == "embed":
            states = [run["embed"][0, pos]] * 2
        else:  # the state after attention is resid_pre + attn_out (also for parallel blocks, as in the graph)
            mid = run[pre + "resid_pre"][0, pos] + run[pre + "attn_out"][0, pos]
            states = [run[pre + "resid_pre"][0, pos], mid] if component == "resid_mid" else [
                mid, run[pre + "resid_post"][0, pos]]
        probs = model.unembed(torch.stack(states).float()).softmax(-1)
    k = resolve_count(min(k, probs.shape[-1]), probs.shape[-1], "top tokens")
    top = probs[1].topk(k)
    rank_after = (probs[1][None, :] > probs[1][top.indices][:, None]).sum(-1) + 1
    rank_before = (probs[0][None, :] > probs[0][top.indices][:, None]).sum(-1) + 1
    meta = {"tokens": run.batch.str_tokens[0], "top_tokens": [model.decode([i]) for i in top.indices.tolist()]}
    target_doc = None
    if target is not None:
        tid = model.token_id(target)
        ranks = [int((p > p[tid]).sum()) + 1 for p in probs]
        target_doc = {"target": model.decode([tid]), "target_id": tid}
        meta["target"] = {"token": model.decode([tid]), "prob": float(probs[1, tid]), "rank": ranks[1],
                          "rank_before": ranks[0]}
    return Result(top.values, (Axis("rank", tuple(str(r) for r in rank_after.tolist())),), "flow-node", model.name,
                  target_doc, {"component": component, "layer": layer, "position": pos, "k": k},
                  {"rank_before": rank_before}, meta)


def run_flow_node(model: Model, prompt: specs.Prompt, config: FlowNodeConfig) -> Result:
    """One node of the contribution graph: its heads, its neurons or the logit lens of its state."""
    t = len(model.to_str_tokens(prompt.text))
    pos = resolve_position(config.position, t)
    layer = 0 if config.component == "embed" else resolve_index(config.layer, model.spec.n_layers, "layer",
                                                                   "the model")
    if config.component == "mlp_neurons":
        model.require(["mlp.post"], "flow-node mlp_neurons")
    run = graph_run(model, prompt.text, [layer])  # the graph's own forward, this layer's sites (reused in the app)
    if config.component == "attn_heads":
        return _heads(model, run, prompt.text, layer, pos, config.k, config.head)
    if config.component == "mlp_neurons":
        return _neurons(model, run, layer, pos, config.k)
    return _state(model, run, prompt.target, config.component, layer, pos, config.k)


specs.register(specs.MethodSpec("flow-node", "localization", "prompt", FlowNodeConfig, run_flow_node,
                                sites=("attn.head_out", "mlp_out", "resid_pre", "final.scale"),
                                cli_inputs=("text", "target")))
