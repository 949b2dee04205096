"""Memorised versus in-context recall: which answer wins when the context states another fact, and where.

For each counterfactual fact (s, r, o → o*) the model knows, the **conflict** prompt states the new
fact in a context and then asks the question::

    In this story, the capital of France is Rome. The capital of France is

The memorised answer is o (" Paris"), the in-context one o* (" Rome"). The **consistent** prompt states
the true fact instead ("... is Paris. The capital of France is"). Measured:

* **who wins**: on the conflict prompt, the fraction where P(o*) > P(o) (mean per-token
  log-probabilities, as in CounterFact), and where the top next token is o*'s first token, o's, or
  another; the bare question and the consistent prompt are scored too;
* **attention knockout** (Geva, Bastings, Filippova, Globerson 2023): block attention from the last
  position to the query's subject tokens, to the whole context sentence, or to the context's object
  tokens, in a window of ``window`` layers centred on each layer, and read the relative change of the
  next-token probability of o*'s and o's first tokens (mean over facts). Where blocking the context
  removes o*, the last position reads the in-context answer there;
* **activation patching** at the last position, from the conflict run into the consistent run (the
  two differ only in the context's object): the residual stream entering each layer, each layer's
  attention and MLP output, and each head's output (``attn.z``). Recovery is
  mean(LD_patched − LD_consistent) / mean(LD_conflict − LD_consistent) with LD = logit(o*₁) − logit(o₁):
  1 where the patched state carries the whole in-context preference, 0 where it carries none.

Knockout and patching run on the first ``localise`` facts; they touch only the last position, so each set
recomputes one token from its lowest layer (:meth:`Model.run_sets` prefix reuse). Shapes: knockout
(target, layer, answer), patching by layer (component, layer), by head (layer, head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.editing.evaluate import object_scores
from lmscope.editing.facts import CounterFact
from lmscope.editing.rome import _encode, pad_left, target_ids
from lmscope.editing.workflow import select_facts
from lmscope.errors import InputError
from lmscope.interventions import Knockout, Patch
from lmscope.models import Batch, Model
from lmscope.results import Axis, Result, ResultSet

TARGETS = ("subject", "context", "context_object")
ANSWERS = ("in_context", "memorised")
SCORES = ("bare_true", "bare_new", "conflict_true", "conflict_new", "consistent_true", "consistent_new")
COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class RecallConfig:
    """Memorised vs in-context recall on counterfactual facts: who wins, attention knockout and patching."""

    n: int = specs.option(100, "Counterfactual facts (the first n the model knows whose two answers start with "
                              "different tokens).")
    localise: int = specs.option(20, "Facts (the first of the n) on which knockout and patching locate the "
                                     "takeover.")
    window: int = specs.option(5, "Layers knocked out together, centred on each layer.")
    heads: bool = specs.option(True, "Also patch every head's output at the last position.")
    known_only: bool = specs.option(True, "Keep only facts whose true object the model prefers on the bare "
                                          "question.")
    seed: int = specs.option(0, "Seed of the counterfactual objects.")
    question: str | None = specs.option(None, "One fact of your own instead of the GeoNames set: the question, e.g. "
                                              "'The capital of France is' (with --subject, --memorised, --in-context).")
    subject: str | None = specs.option(None, "The subject as written in --question, e.g. 'France'.")
    memorised: str | None = specs.option(None, "The answer the model knows, e.g. ' Paris'.")
    in_context: str | None = specs.option(None, "The answer the context states, e.g. ' Rome'.")

    def __post_init__(self):
        if self.n < 1 or self.window < 1 or self.localise < 1:
            raise InputError("--n, --localise and --window must be positive.")
        own = (self.question, self.subject, self.memorised, self.in_context)
        if any(x is not None for x in own) and not all(own):
            raise InputError("A fact of your own needs all of --question, --subject, --memorised and --in-context.")
        if self.question is not None and self.subject not in self.question:
            raise InputError(f"The subject {self.subject!r} must occur in the question {self.question!r}.")

    def facts(self, model: Model) -> list[CounterFact]:
        """The given fact, or the first n GeoNames facts (known, with answers that differ in their first token)."""
        if self.question is not None:
            return [CounterFact("custom", self.subject, self.memorised, self.in_context, self.question, (), (), ())]
        return select_facts(model, self.n, self.seed, self.known_only,
                            keep=lambda cf: _first(model, cf.new) != _first(model, cf.true))


def story(cf: CounterFact, obj: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """The prompt stating ``obj`` in context, then the question; character spans of the knockout targets."""
    q = cf.rewrite
    stated = q[0].lower() + q[1:] if q.startswith("The ") else q
    head = f"In this story, {stated}"
    context = f"{head}{obj}."
    text = f"{context} {q}"
    at = len(context) + 1 + q.find(cf.subject)
    return text, {"subject": (at, at + len(cf.subject)), "context": (0, len(context)),
                  "context_object": (len(head), len(head) + len(obj))}


def token_span(model: Model, text: str, start: int, end: int) -> list[int]:
    """Positions of the tokens of ``text`` that overlap characters ``start:end``."""
    _, offsets = _encode(model, text)
    pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not pos:
        raise InputError(f"{text[start:end]!r} covers no token of {text!r}.")
    return pos


def knockout_sets(n_layers: int, window: int, last: int, positions: Sequence[int]) -> list[list[Knockout]]:
    """One set per layer l: block ``last`` → ``positions`` in the layers of the window centred on l."""
    sets = []
    for layer in range(n_layers):
        lo, hi = max(0, layer - window // 2), min(n_layers - 1, layer + (window - 1) // 2)
        sets.append([Knockout(j, from_positions=[last], to_positions=list(positions)) for j in range(lo, hi + 1)])
    return sets


def _first(model: Model, obj: str) -> int:
    return target_ids(model, obj)[0]


def _knockout(model: Model, cf: CounterFact, window: int) -> torch.Tensor:
    """Relative change of P (target, layer, answer) on the conflict prompt."""
    text, spans = story(cf, cf.new)
    ids, _ = _encode(model, text)
    last, n_layers = len(ids) - 1, model.spec.n_layers
    ans = torch.tensor([_first(model, cf.new), _first(model, cf.true)])
    with torch.no_grad():
        base = torch.softmax(model.run(text, logits="last").logits[0].float(), -1)
        sets = [s for t in TARGETS for s in knockout_sets(n_layers, window, last, token_span(model, text, *spans[t]))]
        probs = torch.softmax(model.run_sets(text, sets, logits="last").logits[:, 0].float(), -1)
    p0 = base[ans]
    return ((probs[:, ans] - p0) / p0).reshape(len(TARGETS), n_layers, len(ANSWERS))


def _split(batch: Batch, i: int) -> Batch:
    return Batch(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.position_ids[i:i + 1],
                 [[]], batch.padding_side)


def _patching(model: Model, cf: CounterFact, heads: bool) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(LD (component, layer), LD (layer, head) or empty, LD conflict, LD consistent) at the last position."""
    rows = [list(_encode(model, story(cf, obj)[0])[0]) for obj in (cf.new, cf.true)]
    both = pad_left(model, rows)
    conflict, consistent = _split(both, 0), _split(both, 1)
    t, n_layers = both.input_ids.shape[1], model.spec.n_layers
    sites = [f"blocks.{layer}.{c}" for c in COMPONENTS for layer in range(n_layers)]
    head_sites = [f"blocks.{layer}.attn.z" for layer in range(n_layers)] if heads else []
    a, b = _first(model, cf.new), _first(model, cf.true)
    with torch.no_grad():
        src = model.run(conflict, cache=sites + head_sites, logits="last")
        ld_src = float(src.logits[0, a] - src.logits[0, b])
        base = model.run(consistent, logits="last").logits[0]
        ld_base = float(base[a] - base[b])
        sets = [[Patch(s, src[s], positions=[t - 1])] for s in sites]
        n_heads = model.spec.n_heads
        sets += [[Patch(s, src[s], positions=[t - 1], heads=[h])] for s in head_sites for h in range(n_heads)]
        lg = model.run_sets(consistent, sets, logits="last").logits[:, 0].float()
    ld = lg[:, a] - lg[:, b]
    by_layer = ld[:len(sites)].reshape(len(COMPONENTS), n_layers)
    by_head = ld[len(sites):].reshape(n_layers, n_heads) if heads else torch.zeros(0)
    return by_layer, by_head, ld_src, ld_base


def recall(model: Model, inputs, config: RecallConfig, facts: Sequence[CounterFact] | None = None) -> ResultSet:
    """Who wins (memorised or in-context), attention knockout by layer, patching by layer and head."""
    facts = config.facts(model) if facts is None else list(facts)
    if not facts or any(_first(model, cf.new) == _first(model, cf.true) for cf in facts):
        raise InputError("recall needs facts whose memorised and in-context answers start with different tokens.")
    pairs = [(p, o) for cf in facts for p in (cf.rewrite, story(cf, cf.new)[0], story(cf, cf.true)[0])
             for o in (cf.true, cf.new)]
    S = object_scores(model, pairs)[0].reshape(len(facts), len(SCORES))
    top, kos, lay, hd, src, base = [], [], [], [], [], []
    with torch.no_grad():
        for at in range(0, len(facts), 16):
            texts = [story(cf, cf.new)[0] for cf in facts[at:at + 16]]
            best = model.run(texts, logits="last").logits.argmax(-1).tolist()
            top += [0 if b == _first(model, cf.new) else 1 if b == _first(model, cf.true) else 2
                    for b, cf in zip(best, facts[at:at + 16])]
    located = facts[:config.localise]
    for cf in tqdm(located, desc="recall: knockout and patching"):
        kos.append(_knockout(model, cf, config.window))
        by_layer, by_head, ld_src, ld_base = _patching(model, cf, config.heads)
        lay.append(by_layer), hd.append(by_head), src.append(ld_src), base.append(ld_base)
    gap = sum(s - b for s, b in zip(src, base)) / len(src)
    recovery = (torch.stack(lay).mean(0) - sum(base) / len(base)) / gap
    n_layers = model.spec.n_layers
    layers = Axis("layer", range(n_layers))
    labels = tuple(f"{cf.subject} -> {cf.new.strip()}" for cf in facts)
    wins = float((S[:, 3] > S[:, 2]).float().mean())
    tops = torch.tensor(top)
    summary = {"facts": len(facts), "localised": len(located), "in_context_wins": wins, "memorised_wins": 1 - wins,
               "top1_in_context": float((tops == 0).float().mean()),
               "top1_memorised": float((tops == 1).float().mean()),
               "top1_other": float((tops == 2).float().mean()), "ld_conflict": sum(src) / len(src),
               "ld_consistent": sum(base) / len(base)}
    common = {"model": model.name, "params": {"n": config.n, "localise": len(located), "window": config.window,
                                              "seed": config.seed}}
    out = {"answers": Result(S, axes=(Axis("fact", labels), Axis("score", SCORES)), method="recall.answers",
                             meta={"summary": summary}, **common),
           "knockout": Result(torch.stack(kos).mean(0), axes=(Axis("target", TARGETS), layers, Axis("answer", ANSWERS)),
                              method="recall.knockout", **common),
           "patch_layers": Result(recovery, axes=(Axis("component", COMPONENTS), layers), method="recall.patch",
                                  **common)}
    if config.heads:
        out["patch_heads"] = Result((torch.stack(hd).mean(0) - sum(base) / len(base)) / gap,
                                    axes=(layers, Axis("head", range(model.spec.n_heads))),
                                    method="recall.patch_heads", **common)
    return ResultSet(out, "recall", model.name, meta=summary)


specs.register(specs.MethodSpec("recall", "editing", "none", RecallConfig, recall, "resultset",
                                sites=("attn.pattern", "attn.z", "attn_out", "mlp_out")))
