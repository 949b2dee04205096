"""Sequential editing: many ROME edits that stay applied, one after another, with the damage tracked.

Each fact's edit is computed on the model as the earlier edits left it and then kept (Gupta et al. 2024,
"Rebuilding ROME": with the original code's inconsistent keys, models collapse after some tens of
sequential edits; r-ROME's consistent key, used here, is meant to prevent it). The key moment C is the
unedited model's (computed once, as a corpus statistic). Every ``every`` edits (and after the last), the
curve records:

* ``efficacy``: the fraction of the facts edited so far whose new object still beats the true one on
  its rewrite prompt (mean per-token log-probabilities, as in CounterFact), and ``margin``, the mean of
  log P(new) − log P(true) over them; ``first_efficacy`` restricts this to the first ``every`` edits;
* ``specificity``: over a fixed set of neighbourhood prompts (the first neighbour of each of the first
  ``SPECIFICITY_FACTS`` facts), the fraction where the neighbour's true object beats the edited new one;
* ``perplexity``: exp of the mean next-token NLL on held-out corpus contexts;
* ``delta_norm``: ‖ΣΔW‖ / ‖W‖ of the edited matrix (Frobenius).

Collapse (Gupta et al.) shows as perplexity shooting up and earlier edits' efficacy falling. The
model is left as it was (every edit undone in reverse order, also on an error).

Shapes: the curve is (checkpoints, metrics); ``extras["immediate"]`` (n,) is each edit's own efficacy
right after it, ``extras["delta"]`` (D, F) the summed update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.data.corpus import token_contexts
from lmscope.editing.evaluate import object_scores
from lmscope.editing.facts import CounterFact
from lmscope.editing.rome import RomeSettings, context_prefixes, rome
from lmscope.editing.second_moment import second_moment
from lmscope.editing.workflow import prefix_counts, select_facts, traced_layer
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result

CURVE = ("efficacy", "margin", "first_efficacy", "specificity", "perplexity", "delta_norm")
SPECIFICITY_FACTS = 20


@dataclass(frozen=True)
class SequentialConfig:
    """Sequential ROME: n edits kept one after another; earlier edits' efficacy and held-out perplexity tracked."""

    n: int = specs.option(100, "Facts to edit in sequence (the first n the model knows).")
    layer: int | None = specs.option(None, "Edit layer (default: the peak of the trace curve averaged over "
                                           "--trace-facts facts).")
    trace_facts: int = specs.option(5, "Facts whose causal traces choose the layer.")
    tokens: int = specs.option(1_000_000, "Corpus tokens for C (of the unedited model; cached).")
    corpus: str = specs.option("default", "Corpus for C and the held-out perplexity: 'default', a .txt file or "
                                          "a folder.")
    steps: int = specs.option(20, "Adam steps for v*.")
    prefixes: int = specs.option(20, "Generated prefixes for k* and v* (half of 5 tokens, half of 10).")
    every: int = specs.option(10, "Measure the curve every this many edits (and after the last).")
    ppl_tokens: int = specs.option(2048, "Held-out corpus tokens for the perplexity (contexts of up to 128).")
    known_only: bool = specs.option(True, "Keep only facts whose true object the unedited model prefers.")
    seed: int = specs.option(0, "Seed of the counterfactual objects and the prefixes.")

    def __post_init__(self):
        if min(self.n, self.trace_facts, self.tokens, self.every) < 1 or self.ppl_tokens < 2 or self.steps < 0 \
                or self.prefixes < 0:
            raise InputError("--n, --trace-facts, --tokens and --every must be positive, --ppl-tokens ≥ 2, --steps "
                             "and --prefixes ≥ 0.")


def perplexity(model: Model, contexts: torch.Tensor, chunk: int = 4) -> float:
    """exp(mean next-token NLL) over the rows of ``contexts`` (N, T) token ids."""
    total, count = 0.0, 0
    with torch.no_grad():
        for at in range(0, contexts.shape[0], chunk):
            ids = contexts[at:at + chunk]
            logp = torch.log_softmax(model.run(ids, logits="all").logits.float(), -1)[:, :-1]
            nll = -logp.gather(-1, ids[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1)
            total += float(nll.double().sum())
            count += nll.numel()
    return math.exp(total / count)


def _checkpoint(model: Model, facts: Sequence[CounterFact], k: int, every: int, held: torch.Tensor,
                W0: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    done = facts[:k]
    pairs = [(cf.rewrite, cf.new) for cf in done] + [(cf.rewrite, cf.true) for cf in done]
    nb = [cf.neighbours[0] for cf in facts[:SPECIFICITY_FACTS]]
    pairs += [(p, o) for p, o in nb] + [(p, cf.new) for (p, _), cf in zip(nb, facts)]
    lp, _ = object_scores(model, pairs)
    new, old = lp[:k], lp[k:2 * k]
    nb_true, nb_new = lp[2 * k:2 * k + len(nb)], lp[2 * k + len(nb):]
    nan = float("nan")
    return {"edits": k,
            "efficacy": float((new > old).float().mean()) if k else nan,
            "margin": float((new - old).mean()) if k else nan,
            "first_efficacy": float((new[:every] > old[:every]).float().mean()) if k else nan,
            "specificity": float((nb_true > nb_new).float().mean()),
            "perplexity": perplexity(model, held),
            "delta_norm": float(delta.norm() / W0.norm())}


def edit_sequence(model: Model, facts: Sequence[CounterFact], layer: int, C: torch.Tensor, settings: RomeSettings,
                  held: torch.Tensor, every: int, *, on_checkpoint: Callable[[dict], None] | None = None,
                  progress: bool = True) -> tuple[list[dict], list[float], torch.Tensor, list[dict]]:
    """(curve rows, immediate efficacies, summed ΔW (D, F), per-edit v* info); the model ends as it began."""
    mem = model.memory(layer)
    W0 = mem.weight().detach().float().cpu().clone()
    delta = torch.zeros_like(W0)
    prefixes = context_prefixes(model, settings.prefixes, settings.seed)
    handles, rows, immediate, infos = [], [], [], []

    def measure(k):
        row = _checkpoint(model, facts, k, every, held, W0, delta)
        rows.append(row)
        if on_checkpoint is not None:
            on_checkpoint(row)

    try:
        measure(0)
        for i, cf in enumerate(tqdm(facts, desc=f"sequential ROME at layer {layer}", disable=not progress)):
            edit = rome(model, cf.fact, layer, C, settings=settings, prefixes=prefixes)
            handles.append(model.edit(edit))
            delta += edit.deltas[mem.name].float().cpu()
            lp, _ = object_scores(model, [(cf.rewrite, cf.new), (cf.rewrite, cf.true)])
            immediate.append(float(lp[0] > lp[1]))
            infos.append({k: edit.meta[k] for k in ("steps", "delta_norm", "v_init_norm")})
            if (i + 1) % every == 0 or i + 1 == len(facts):
                measure(i + 1)
    finally:
        for h in reversed(handles):
            h.undo()
    return rows, immediate, delta, infos


def sequential_edits(model: Model, inputs, config: SequentialConfig) -> Result:
    """ROME on n known counterfactual facts in sequence (kept applied); the curve of the module docstring."""
    facts = select_facts(model, config.n, config.seed, config.known_only)
    layer, curve = config.layer, None
    if layer is None:
        layer, curve = traced_layer(model, facts, config.trace_facts)
    C = second_moment(model, layer, tokens=config.tokens, corpus=config.corpus)
    context = min(128, model.spec.n_ctx, config.ppl_tokens)
    held = token_contexts(model, config.corpus, context, "heldout", max_tokens=config.ppl_tokens)
    settings = RomeSettings(steps=config.steps, seed=config.seed, prefixes=prefix_counts(config.prefixes))
    rows, immediate, delta, infos = edit_sequence(model, facts, layer, C, settings, held, config.every)
    values = torch.tensor([[r[m] for m in CURVE] for r in rows])
    extras = {"immediate": torch.tensor(immediate), "delta": delta}
    if curve is not None:
        extras["indirect_effect"] = curve
    return Result(values, axes=(Axis("edits", tuple(r["edits"] for r in rows)), Axis("metric", CURVE)),
                  method="edit.sequential", model=model.name,
                  params={"n": config.n, "layer": layer, "tokens": config.tokens, "steps": config.steps,
                          "prefixes": config.prefixes, "every": config.every, "ppl_tokens": config.ppl_tokens,
                          "seed": config.seed},
                  extras=extras, meta={"layer": layer, "facts": [f"{cf.subject} -> {cf.new.strip()}" for cf in facts],
                                       "held_contexts": int(held.shape[0]), "v_steps": [i["steps"] for i in infos]})


# no site kinds required: the memory matrix comes from the model's parts (as `edit` and `edit eval`)
specs.register(specs.MethodSpec("edit-sequential", "editing", "none", SequentialConfig, sequential_edits,
                                cli=("edit", "sequential")))
