"""ROME on the self-trained Mamba (``out_proj``, Sen Sharma et al. 2024) and, side by side, on the Transformer of
the same budget (the MLP down projection): efficacy, paraphrase and specificity on the models' own facts.

The facts are the training set's (``lmscope.models.trained.facts``: invented people living in real cities). Each
fact the model knows (the true city is its top token after ``"{person} lives in"``) gets a counterfactual city
(seeded, another city of the set) and CounterFact's measurements (``lmscope.editing.evaluate.fact_metrics``):

* rewrite prompt ``"{person} lives in"``; paraphrases ``"{person} was born in the city of"`` and
  ``"The home town of {person} is"`` (phrasings the model was trained on, so they test that the edit
  reaches the person's other facts, not new wording);
* neighbourhood: up to 5 other known people living in the true city (their city must survive the edit).

The edit layer is where causal tracing of the memory's writes at the last subject token peaks (the mean curve
of ``--trace-facts`` facts, as ``lmscope edit eval`` does); ``--all-layers`` also edits at every layer. The key
moment C comes from ``--tokens`` corpus tokens (cached). Each edit is undone before the next. Prints one JSON
line per model and layer.

    python bench/mamba_rome.py [--facts 48] [--tokens 100000] [--all-layers] [--models mamba-facts llama-facts]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from tqdm.auto import tqdm

import lmscope
from lmscope.editing import RomeSettings, rome, second_moment, trace_curve
from lmscope.editing.evaluate import fact_metrics, harmonic_mean
from lmscope.editing.facts import CounterFact
from lmscope.editing.rome import context_prefixes
from lmscope.models.trained import CITIES, QUERY, TEMPLATES, TRAINED, facts

PARAPHRASES = ("{s} was born in the city of", "The home town of {s} is")
GENERATION = ("Everyone knows that {s}",)


def counterfacts(model, n: int, seed: int = 0) -> list[CounterFact]:
    """The first ``n`` training facts ``model`` knows, each with a new city and its neighbours."""
    rows = facts(TRAINED[model.name].n_facts)
    prompts = [QUERY.format(s=s) for s, _ in rows]
    logits = torch.cat([model.run(prompts[i:i + 32], logits="last").logits for i in range(0, len(prompts), 32)])
    knows = [int(logits[i].argmax()) == model.token_id(" " + c) for i, (_, c) in enumerate(rows)]
    rng = random.Random(seed)
    out = []
    for i, (s, c) in enumerate(rows):
        if not knows[i]:
            continue
        new = rng.choice([x for x in CITIES if x != c])
        nb = tuple((QUERY.format(s=s2), " " + c) for j, (s2, c2) in enumerate(rows) if j != i and c2 == c and knows[j])
        if nb and len(out) < n:
            out.append(CounterFact("lives_in", s, " " + c, " " + new, QUERY.format(s=s),
                                   tuple(p.format(s=s) for p in PARAPHRASES), nb[:5],
                                   tuple(g.format(s=s) for g in GENERATION)))
    return out


def evaluate(model, cfs, layer: int, tokens: int, gen_tokens: int, seed: int) -> dict:
    C = second_moment(model, layer, tokens=tokens, context=64)
    settings = RomeSettings(seed=seed)
    prefixes = context_prefixes(model, settings.prefixes, settings.seed)
    rows = []
    for cf in tqdm(cfs, desc=f"{model.name}: ROME at layer {layer}"):
        pre = fact_metrics(model, cf, gen_tokens, seed)
        edit = rome(model, cf.fact, layer, C, settings=settings, prefixes=prefixes)
        with model.edit(edit):
            post = fact_metrics(model, cf, gen_tokens, seed)
        rows.append({**post, **{f"pre_{k}": v for k, v in pre.items()}})
    summary = {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in rows[0]}
    summary["score"] = round(harmonic_mean([summary["efficacy"], summary["paraphrase"], summary["specificity"]]), 3)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=48)
    ap.add_argument("--trace-facts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--gen-tokens", type=int, default=0)
    ap.add_argument("--all-layers", action="store_true")
    ap.add_argument("--models", nargs="+", default=["mamba-facts", "llama-facts"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        t0 = time.time()
        model = lmscope.load(name, progress=False)
        cfs = counterfacts(model, args.facts, args.seed)
        curves = torch.stack([trace_curve(model, cf.fact).values for cf in cfs[:args.trace_facts]])
        curve = curves.mean(0)
        traced = int(curve.argmax())
        memory = model.memory(traced)
        head = {"model": name, "memory": memory.kind, "facts": len(cfs), "trace_curve": [round(float(x), 3)
                                                                                         for x in curve],
                "traced_layer": traced}
        for layer in range(model.spec.n_layers) if args.all_layers else [traced]:
            out = evaluate(model, cfs, layer, args.tokens, args.gen_tokens, args.seed)
            print(json.dumps({**head, "layer": layer, **out, "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
