"""The editing workflows behind ``lmscope edit`` and ``lmscope edit eval`` (registered method specs).

* :func:`edit_fact`: choose the layer by causal tracing (unless given), get C for it (cached), compute
  the ROME edit, measure the target's probability before and after, optionally save the edit.
* :func:`evaluate_edits`: ROME on ``n`` counterfactual facts the model knows, one at a time (each edit
  undone before the next), with CounterFact's metrics before and after (:mod:`lmscope.editing.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.editing.evaluate import METRICS, fact_metrics, harmonic_mean, known, object_scores
from lmscope.editing.facts import CounterFact, counterfactual_facts
from lmscope.editing.layer import NOISE, trace_curve
from lmscope.editing.rome import Fact, RomeSettings, context_prefixes, rome
from lmscope.editing.second_moment import second_moment
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result


@dataclass(frozen=True)
class EditConfig:
    """ROME: write a new fact into the model (the prompt names the subject; --target is the new object)."""

    subject: str = specs.option(help="Subject as written in the prompt, e.g. 'The Eiffel Tower'.")
    layer: int | None = specs.option(None, "Edit layer (default: where causal tracing of the MLP outputs (Mamba: "
                                           "out_proj writes) at the last subject token peaks).")
    tokens: int = specs.option(1_000_000, "Corpus tokens for the key second moment C (cached per model and layer).")
    corpus: str = specs.option("default", "Corpus for C: 'default', a .txt file or a folder.")
    steps: int = specs.option(20, "Adam steps for v*.")
    lr: float = specs.option(0.5, "Adam learning rate for v*.")
    save: str | None = specs.option(None, "Write the edit to this .safetensors file.")

    def __post_init__(self):
        if self.tokens < 1 or self.steps < 0 or self.lr <= 0:
            raise InputError("--tokens must be positive, --steps ≥ 0 and --lr > 0.")


def edit_fact(model: Model, prompt: specs.Prompt, config: EditConfig) -> Result:
    """ROME edit (r-ROME consistent key): P(new object) before and after, the trace curve, the saved file."""
    if prompt.target is None or isinstance(prompt.target, int):
        raise InputError("Give the new object as text with --target, e.g. --target ' Rome'.")
    fact = Fact(prompt.text, config.subject, str(prompt.target))
    curve = None
    layer = config.layer
    if layer is None:
        curve = trace_curve(model, fact, noise=NOISE)
        layer = int(curve.meta["layer"])
    settings = RomeSettings(steps=config.steps, lr=config.lr)
    C = second_moment(model, layer, tokens=config.tokens, corpus=config.corpus)
    edit = rome(model, fact, layer, C, settings=settings)
    with torch.no_grad():
        top = int(model.run(prompt.text, logits="last").logits[0].argmax())
    old = model.decode([top])
    pairs = [(fact.prompt, fact.target), (fact.prompt, old)]
    before = object_scores(model, pairs)[0].exp()
    with model.edit(edit):
        after = object_scores(model, pairs)[0].exp()
    saved = str(edit.save(config.save)) if config.save else None
    extras = {} if curve is None else {"indirect_effect": curve.values}
    return Result(torch.stack([before, after]), axes=(Axis("model", ("before", "after")),
                                                      Axis("object", (fact.target, old))),
                  method="edit.rome", model=model.name, target={"target": fact.target, "subject": fact.subject},
                  params={"layer": layer, "tokens": config.tokens, "steps": config.steps, "lr": config.lr},
                  extras=extras, meta={"layer": layer, "traced": curve is not None, "saved": saved,
                                       "v_steps": edit.meta["steps"], "delta_norm": edit.meta["delta_norm"]})


@dataclass(frozen=True)
class EditEvalConfig:
    """Evaluate ROME on offline counterfactual facts (GeoNames): efficacy, paraphrase, specificity, fluency."""

    n: int = specs.option(100, "Facts to edit (the first n the model knows).")
    layer: int | None = specs.option(None, "Edit layer (default: the peak of the trace curve averaged over "
                                           "--trace-facts facts).")
    trace_facts: int = specs.option(5, "Facts whose causal traces choose the layer.")
    tokens: int = specs.option(1_000_000, "Corpus tokens for C.")
    corpus: str = specs.option("default", "Corpus for C: 'default', a .txt file or a folder.")
    known_only: bool = specs.option(True, "Keep only facts whose true object the unedited model prefers.")
    steps: int = specs.option(20, "Adam steps for v*.")
    prefixes: int = specs.option(20, "Generated prefixes for k* and v* (half of 5 tokens, half of 10; ROME uses 20).")
    gen_tokens: int = specs.option(30, "Tokens per generation for fluency and consistency (0: skip).")
    seed: int = specs.option(0, "Seed of the counterfactual objects and the prefixes.")

    def __post_init__(self):
        if self.n < 1 or self.trace_facts < 1 or self.tokens < 1 or self.steps < 0 or self.gen_tokens < 0 \
                or self.prefixes < 0:
            raise InputError("--n, --trace-facts and --tokens must be positive; --steps, --prefixes and "
                             "--gen-tokens ≥ 0.")


def prefix_counts(prefixes: int) -> tuple[tuple[int, int], ...]:
    """``prefixes`` generated prefixes as ROME's (count, tokens) groups: half of 5 tokens, half of 10."""
    return ((prefixes - prefixes // 2, 5), (prefixes // 2, 10))


def select_facts(model: Model, n: int, seed: int = 0, known_only: bool = True,
                 keep: Callable[[CounterFact], bool] | None = None) -> list[CounterFact]:
    """The first ``n`` counterfactual facts with neighbours (and, with ``known_only``, that the model knows;
    with ``keep``, for which it is true)."""
    facts = []
    for cf in counterfactual_facts(None, seed=seed):
        if cf.neighbours and (keep is None or keep(cf)) and (not known_only or known(model, cf)):
            facts.append(cf)
        if len(facts) >= n:
            break
    if not facts:
        raise InputError(f"{model.name} prefers the true object on none of the counterfactual facts.")
    return facts


def traced_layer(model: Model, facts: Sequence[CounterFact], trace_facts: int) -> tuple[int, torch.Tensor]:
    """(layer, mean curve (L,)): the peak of the trace curves of the first ``trace_facts`` facts, averaged."""
    curves = [trace_curve(model, cf.fact, noise=NOISE) for cf in facts[:trace_facts]]
    curve = torch.stack([c.values for c in curves]).mean(0)
    return int(curves[0].axes[0].labels[int(curve.argmax())]), curve


def edit_rows(model: Model, facts: Sequence[CounterFact], layer: int, C: torch.Tensor, settings: RomeSettings,
              gen_tokens: int, seed: int, progress: bool = True) -> Iterator[list[float]]:
    """For each fact: its METRICS after its ROME edit, then before (``pre_``); each edit is undone after."""
    prefixes = context_prefixes(model, settings.prefixes, settings.seed)
    for cf in tqdm(facts, desc=f"ROME at layer {layer}", disable=not progress):
        pre = fact_metrics(model, cf, gen_tokens, seed)
        edit = rome(model, cf.fact, layer, C, settings=settings, prefixes=prefixes)
        with model.edit(edit):
            post = fact_metrics(model, cf, gen_tokens, seed)
        yield [post.get(m, float("nan")) for m in METRICS] + [pre.get(m, float("nan")) for m in METRICS]


def summarise(values: torch.Tensor) -> dict[str, float]:
    """Mean of each metric over facts (rows of :func:`edit_rows`), with the harmonic-mean ``score``."""
    mean = values.nanmean(0)
    summary = {name: float(v) for name, v in zip([*METRICS, *(f"pre_{m}" for m in METRICS)], mean)}
    summary["score"] = harmonic_mean([summary["efficacy"], summary["paraphrase"], summary["specificity"]])
    summary["pre_score"] = harmonic_mean([summary["pre_efficacy"], summary["pre_paraphrase"],
                                          summary["pre_specificity"]])
    return summary


def evaluate_edits(model: Model, inputs, config: EditEvalConfig) -> Result:
    """ROME on n known counterfactual facts: per-fact metrics after (and before) each edit, undone after."""
    facts = select_facts(model, config.n, config.seed, config.known_only)
    curve = None
    layer = config.layer
    if layer is None:
        layer, curve = traced_layer(model, facts, config.trace_facts)
    C = second_moment(model, layer, tokens=config.tokens, corpus=config.corpus)
    settings = RomeSettings(steps=config.steps, seed=config.seed, prefixes=prefix_counts(config.prefixes))
    values = torch.tensor(list(edit_rows(model, facts, layer, C, settings, config.gen_tokens, config.seed)))
    summary = summarise(values)
    extras = {} if curve is None else {"indirect_effect": curve}
    return Result(values, axes=(Axis("fact", tuple(f"{cf.subject} -> {cf.new.strip()}" for cf in facts)),
                                Axis("metric", (*METRICS, *(f"pre_{m}" for m in METRICS)))),
                  method="edit.eval", model=model.name,
                  params={"n": config.n, "layer": layer, "tokens": config.tokens, "steps": config.steps,
                          "prefixes": config.prefixes, "seed": config.seed, "gen_tokens": config.gen_tokens},
                  extras=extras, meta={"layer": layer, "facts": len(facts), "summary": summary})


# no site kinds required: the memory matrix (MLP down projection, or a state-space block's out_proj) comes from the
# model's parts, and a model with none is refused by Model.memory with the fix
specs.register(specs.MethodSpec("edit", "editing", "prompt", EditConfig, edit_fact, cli_inputs=("text", "target")))
specs.register(specs.MethodSpec("edit-eval", "editing", "none", EditEvalConfig, evaluate_edits, cli=("edit", "eval")))
