"""Evaluation of edits on counterfactual facts, with CounterFact's metrics (Meng et al. 2022, §3.2 and §4.2).

For each fact (s, r, o → o*), after the edit and before undoing it:

* **efficacy**: on the rewrite prompt, P(o*) > P(o) (probability variant, CounterFact's "ES"); the
  accuracy variant asks every token of o* to be the argmax under teacher forcing;
* **paraphrase**: the same on the paraphrase prompts ("PS"), averaged over them;
* **specificity**: on neighbourhood prompts (other subjects, their own true objects o'), P(o') > P(o*)
  ("NS"); the accuracy variant asks the argmax tokens of o' to survive;
* **score**: the harmonic mean of the three probability variants ("S");
* **fluency**: the weighted bi- and tri-gram entropy of sampled generations from the generation
  prompts (ROME's "GE", weights 2/3 and 4/3 over whitespace words);
* **consistency**: the fraction of those generations that mention o* (and, as ``mentions_old``, o).
  CounterFact's "RS" compares generations to Wikipedia text about o*, which is not available offline.

P(o) of a multi-token object is the mean per-token log-probability (as in CounterFact). The unedited
model gets the same measurements (``pre_*``). Only facts the model knows are kept: the true object
beats the new one on the rewrite prompt before the edit, and there is at least one neighbour prompt.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch

from lmscope.editing.facts import CounterFact
from lmscope.editing.rome import pad_left, target_ids
from lmscope.models import Model


def object_scores(model: Model, pairs: Sequence[tuple[str, str]], chunk: int = 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-token log-prob (N,), all tokens argmax (N,) bool) of each (prompt, object), ``chunk`` rows
    per forward."""
    means, hits = [], []
    for at in range(0, len(pairs), chunk):
        rows, spans = [], []
        for prompt, obj in pairs[at:at + chunk]:
            p = list(model.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            o = target_ids(model, obj)
            rows.append(p + o[:-1])
            spans.append(o)
        batch = pad_left(model, rows)
        t = batch.input_ids.shape[1]
        with torch.no_grad():
            logits = model.run(batch, logits="all").logits.float()
        logp = torch.log_softmax(logits, -1)
        for i, o in enumerate(spans):
            pos = torch.arange(t - len(o), t)  # the last prompt token predicts o[0]
            ids = torch.tensor(o)
            means.append(float(logp[i, pos, ids].mean()))
            hits.append(bool((logp[i, pos].argmax(-1).cpu() == ids).all()))
    return torch.tensor(means), torch.tensor(hits)


def ngram_entropy(texts: Sequence[str]) -> float:
    """ROME's generation entropy: weighted (2/3, 4/3) mean of bi- and tri-gram entropies (bits), over texts."""
    vals = []
    for text in texts:
        words = text.lower().split()
        ent = []
        for n in (2, 3):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            total = sum(grams.values())
            ent.append(-sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
        vals.append((2 / 3 * ent[0] + 4 / 3 * ent[1]) / 2)
    return sum(vals) / max(1, len(vals))


def generations(model: Model, prompts: Sequence[str], tokens: int, seed: int = 0) -> list[str]:
    """Top-5 sampled continuations (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ids = model.sample(list(prompts), tokens, do_sample=True, top_k=5)
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in ids]


METRICS = ("efficacy", "efficacy_acc", "paraphrase", "paraphrase_acc", "specificity", "specificity_acc",
           "fluency", "consistency", "mentions_old")


def fact_metrics(model: Model, cf: CounterFact, gen_tokens: int = 30, seed: int = 0) -> dict[str, float]:
    """The metrics of the module docstring on the model as it is now (edited or not)."""
    prompts = [cf.rewrite, *cf.paraphrases]
    pairs = [(p, cf.new) for p in prompts] + [(p, cf.true) for p in prompts] + \
        [(p, o) for p, o in cf.neighbours] + [(p, cf.new) for p, _ in cf.neighbours]
    lp, hit = object_scores(model, pairs)
    k, m = len(prompts), len(cf.neighbours)
    new, old = lp[:k], lp[k:2 * k]
    nb_true, nb_new = lp[2 * k:2 * k + m], lp[2 * k + m:]
    out = {"efficacy": float(new[0] > old[0]), "efficacy_acc": float(hit[0]),
           "paraphrase": float((new[1:] > old[1:]).float().mean()), "paraphrase_acc": float(hit[1:k].float().mean()),
           "specificity": float((nb_true > nb_new).float().mean()),
           "specificity_acc": float(hit[2 * k:2 * k + m].float().mean())}
    if gen_tokens > 0:
        texts = generations(model, cf.generation, gen_tokens, seed)
        out["fluency"] = ngram_entropy(texts)
        out["consistency"] = sum(cf.new.strip() in t for t in texts) / len(texts)
        out["mentions_old"] = sum(cf.true.strip() in t for t in texts) / len(texts)
    return out


def known(model: Model, cf: CounterFact) -> bool:
    """The unedited model prefers the true object to the new one on the rewrite prompt, and has neighbours."""
    if not cf.neighbours:
        return False
    lp, _ = object_scores(model, [(cf.rewrite, cf.true), (cf.rewrite, cf.new)])
    return bool(lp[0] > lp[1])


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)
