"""Is the thresholded contribution graph faithful? Keep its components, patch everything else.

The route of :func:`lmscope.localization.flow.flow` at threshold τ names, per layer and position, the
attention blocks (an attention edge into ``A{l}_i`` is kept) and MLPs (``M{l}_i`` is in the graph)
that carry the prediction. This spec runs three forwards in one batch: the clean prompt; the prompt with
every attention and MLP write *outside* the graph replaced; and the prompt with every write replaced.
The replacement is the write of a corrupted prompt of the same length (``corrupt``) or, without one, the
mean of that write over the prompt's positions after the first (mean ablation). The first position is left
out of the mean: it is the attention sink, whose writes are orders of magnitude larger than the others
("massive activations", Sun et al. 2024), so a plain mean over all positions is mostly the first position's
write, and pasting that everywhere sends the model off its distribution (with it, the graph alone scored
*below* nothing on IOI prompts). ``mean_skip_first=False`` restores the plain mean.

The metric m is read at the prediction position with the shared vocabulary (:mod:`lmscope.targets`):
by default the logit difference to the foil when one is given, else the target's log-probability (the target
defaults to the model's top prediction). A raw logit is not a default: ablating writes moves every logit
together, so the target's logit can rise while its probability collapses (mean ablation of every block gave
the IOI answer a logit of 16.5 against 11.0 clean). Then

    faithfulness = (m_graph − m_none) / (m_clean − m_none)

1 means the graph alone recovers the clean behaviour; 0 means it does no better than nothing. The
granularity is (layer, position) blocks, not single edges (an edge-level test is path patching).
With ``nodes`` the kept blocks are the ones named (the app's pinned nodes) instead of the graph's.
Values: [m_clean, m_graph, m_none, faithfulness] on axis ``quantity``; meta: the kept blocks, the metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.localization.flow import DEFAULT_THRESHOLD, _check_threshold, flow, flow_contributions
from lmscope.localization.metrics import Metric
from lmscope.targets import canonical_metric, default_metric
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_position

METRICS = ("logit_diff", "log_prob", "probability", "kl")


@dataclass(frozen=True)
class FlowVerifyConfig:
    """Faithfulness of the thresholded contribution graph by patching everything outside it."""

    threshold: float = specs.option(DEFAULT_THRESHOLD, "Importance threshold τ of the graph, in (0, 1).")
    position: int | None = specs.option(None, "Prediction position (default: last).")
    corrupt: str | None = specs.option(None, "A corrupted prompt of the same token length whose writes replace "
                                             "the others (default: each write's mean over positions).")
    metric: str | None = specs.option(None, "logit_diff | log_prob | probability | kl (default: logit_diff with a "
                                            "foil, else log_prob).", choices=METRICS)
    mean_skip_first: bool = specs.option(True, "Leave the first position (the attention sink) out of the mean "
                                               "that replaces the writes (mean ablation only).")
    nodes: str | None = specs.option(None, "Keep exactly these blocks instead of the graph's (threshold ignored): "
                                           "comma-separated A{layer}_{pos} (attention) and M{layer}_{pos} (MLP) "
                                           "node ids, e.g. A3_5,M2_4 (the app's pinned nodes).")

    def __post_init__(self):
        _check_threshold(self.threshold)
        if self.metric is not None:
            object.__setattr__(self, "metric", canonical_metric(self.metric, METRICS, "flow-verify"))
        if not isinstance(self.mean_skip_first, bool):
            raise InputError(f"mean_skip_first={self.mean_skip_first!r}: give true or false.")
        if self.nodes is not None:
            parse_nodes(self.nodes)
        if self.corrupt is not None and (not isinstance(self.corrupt, str) or not self.corrupt):
            raise InputError("corrupt must be a non-empty prompt (or left out for mean ablation).")


def parse_nodes(text: str) -> dict[str, list[list[int]]]:
    """``"A3_5,M2_4"`` -> ``{"attn": [[3, 5]], "mlp": [[2, 4]]}`` (sorted, without repeats)."""
    kept = {"attn": set(), "mlp": set()}
    for item in (text.split(",") if isinstance(text, str) else [None]):
        item = item.strip() if isinstance(item, str) else ""
        try:
            kind = {"A": "attn", "M": "mlp"}[item[:1]]
            layer, pos = (int(x) for x in item[1:].split("_"))
        except (KeyError, ValueError):
            raise InputError(f"nodes: {item!r} is not a block id; write A{{layer}}_{{pos}} (attention) or "
                             "M{layer}_{pos} (MLP), comma-separated, e.g. A3_5,M2_4.") from None
        kept[kind].add((layer, pos))
    return {k: [list(x) for x in sorted(v)] for k, v in kept.items()}


def kept_blocks(graph: Result) -> dict[str, list[list[int]]]:
    """``{"attn": [[layer, pos], ...], "mlp": [...]}``: the blocks the route keeps."""
    attn = sorted({(int(e["target"][1:].split("_")[0]), int(e["target"].split("_")[1]))
                   for e in graph.meta["edges"] if e["kind"] == "attn"})
    mlp = sorted({(n["layer"], n["position"]) for n in graph.meta["nodes"] if n["component"] == "mlp"})
    return {"attn": [list(x) for x in attn], "mlp": [list(x) for x in mlp]}


def run_flow_verify(model: Model, prompt: specs.Prompt, config: FlowVerifyConfig) -> Result:
    """Faithfulness of the thresholded contribution graph (patch everything outside it)."""
    s = model.spec
    has_mlp = "mlp" in model.parts
    kinds = ["attn_out"] + (["mlp_out"] if has_mlp else [])
    sites = [f"blocks.{l}.{k}" for l in range(s.n_layers) for k in kinds]
    tokens = model.to_str_tokens(prompt.text)
    t = len(tokens)
    if config.nodes is None:
        c = flow_contributions(model, prompt.text)
        graph = flow(model, prompt.text, position=config.position, threshold=config.threshold, contributions=c)
        pos, kept = graph.meta["position"], kept_blocks(graph)
    else:
        pos, kept = resolve_position(config.position, t), parse_nodes(config.nodes)
        bad = [x for x in kept["attn"] + kept["mlp"] if not (0 <= x[0] < s.n_layers and 0 <= x[1] < t)]
        if bad or (kept["mlp"] and not has_mlp):
            raise InputError(f"nodes: {bad or kept['mlp']} name no block of this model and prompt ({s.n_layers} "
                             f"layers, {t} tokens{'' if has_mlp else ', no MLPs'}).")
    with torch.no_grad():
        clean = model.run(prompt.text, cache=sites, logits="all")
        if config.corrupt is not None:
            other = model.run(config.corrupt, cache=sites, logits="none")
            if other.batch.input_ids.shape[1] != t:
                raise InputError(f"The corrupted prompt has {other.batch.input_ids.shape[1]} tokens and the prompt "
                                 f"{t}: give one of the same length (or leave corrupt out for mean ablation).")
            values = {k: other[k] for k in sites}
        else:
            first = 1 if config.mean_skip_first and t > 1 else 0
            values = {k: clean[k][:, first:].mean(dim=1, keepdim=True).expand_as(clean[k]) for k in sites}
    keep = {("attn_out", l, i) for l, i in kept["attn"]} | {("mlp_out", l, i) for l, i in kept["mlp"]}
    outside, everything = [], []
    for site in sites:
        layer, kind = int(site.split(".")[1]), site.split(".")[2]
        out_pos = [i for i in range(t) if (kind, layer, i) not in keep]
        everything.append(Patch(site, value=values[site]))
        if out_pos:
            outside.append(Patch(site, value=values[site], positions=out_pos))
    target = prompt.target if prompt.target is not None else int(clean.logits[0, pos].argmax())
    tid = model.token_id(target)
    fid = None if prompt.foil is None else model.token_id(prompt.foil)
    name = config.metric or default_metric(fid)
    if name == "logit_diff" and fid is None:
        raise InputError("metric logit_diff needs a foil token: give the prompt's foil (e.g. ' John').")
    with torch.no_grad():
        logits = model.run_sets(prompt.text, [[], outside, everything], logits="all").logits[:, 0, pos].float()
    metric = Metric(name, torch.tensor([tid]), None if fid is None else torch.tensor([fid]),
                    clean_logits=logits[:1])
    m = metric.per_prompt(logits[:, None])[:, 0]  # (3,): clean, graph, none
    denom = float(m[0] - m[2])
    faith = float("nan") if abs(denom) < 1e-9 else float(m[1] - m[2]) / denom
    vals = torch.tensor([float(m[0]), float(m[1]), float(m[2]), faith])
    n_blocks = s.n_layers * t * len(kinds)
    meta = {"kept": kept, "kept_fraction": len(keep) / n_blocks, "tokens": tokens, "position": pos,
            "ablation": "corrupt" if config.corrupt is not None else "mean",
            "metric": name, "mean_skip_first": config.mean_skip_first}
    target_doc = {"target": model.decode([tid]), "target_id": tid, "position": pos}
    if fid is not None:
        target_doc |= {"foil": model.decode([fid]), "foil_id": fid}
    return Result(vals, (Axis("quantity", ("clean", "graph", "none", "faithfulness")),), "flow-verify", model.name,
                  target_doc, {"threshold": config.threshold, "position": config.position, "corrupt": config.corrupt,
                               "metric": name, "mean_skip_first": config.mean_skip_first, "nodes": config.nodes},
                  meta=meta)


specs.register(specs.MethodSpec("flow-verify", "localization", "prompt", FlowVerifyConfig, run_flow_verify,
                                sites=("attn_out", "resid_pre"), cli_inputs=("text", "target", "foil")))
