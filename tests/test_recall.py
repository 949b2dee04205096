"""The factual-recall task on GeoNames facts: the known-fact filter against the model's own greedy
decoding (plain HF forwards), corruptions and foils, positions, and the GeoNames triples themselves."""

from __future__ import annotations

import pytest
import torch

from conftest import WORDS
from lmscope.data import facts as world
from lmscope.errors import InputError, TokenError
from lmscope.localization import recall, tasks
from lmscope.localization.recall import known_facts


def _greedy(model, prompt: str, k: int) -> list[int]:
    """k greedy tokens after ``prompt`` from the HF model's own forwards, one token at a time."""
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(k):
            nxt = int(model.hf(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.fixture
def tiny_facts(tiny_llama, monkeypatch):
    """Facts over the tiny vocabulary: a right two-word object (the model's greedy continuation) for
    half of the subjects, a wrong second word for the others."""
    m, words = tiny_llama, set(WORDS)
    right, wrong = [], []
    for subject in WORDS:
        prompt = world.TEMPLATES["country_capital"].format(subject)
        toks = [m.decode([i]).strip() for i in _greedy(m, prompt, 2)]
        if not set(toks) <= words:
            continue
        if len(right) <= len(wrong):
            right.append(world.Triple("country_capital", subject, " " + " ".join(toks)))
        else:
            other = next(w for w in WORDS if w != toks[1])
            wrong.append(world.Triple("country_capital", subject, f" {toks[0]} {other}"))
    assert len(right) >= 4 and len(wrong) >= 4
    monkeypatch.setattr(recall, "world_facts", lambda relations: tuple(right + wrong))
    return m, right, wrong


def test_known_facts_keep_what_the_model_recalls(tiny_facts):
    m, right, wrong = tiny_facts
    pairs = known_facts(m, relations=("country_capital",))
    assert sorted(pairs.clean) == sorted(f.prompt for f in right)
    by_prompt = {f.prompt: f for f in right + wrong}
    for c, r, t, f, pos in zip(pairs.clean, pairs.corrupt, pairs.targets, pairs.foils, pairs.positions):
        fact, other = by_prompt[c], by_prompt[r]
        assert t.strip() == fact.object.split()[0] and f.strip() == other.object.split()[0] and t != f
        assert m.decode([_greedy(m, c, 1)[0]]) == t  # the target is the model's own top prediction
        toks = m.to_str_tokens(c)
        assert "".join(toks[pos["SUBJ_FIRST"]:pos["SUBJ_LAST"] + 1]).strip() == fact.subject
        assert pos["END"] == len(toks) - 1 == len(m.to_str_tokens(r)) - 1
    assert pairs.meta["relations"]["country_capital"] == {"checked": len(right) + len(wrong), "kept": len(right)}
    assert known_facts(m, 2, relations=("country_capital",)).clean == pairs.clean[:2]  # a prefix of the whole set
    everything = known_facts(m, relations=("country_capital",), known=False)
    assert len(everything) == len(right) + len(wrong)
    assert tasks.task_pairs(m, "recall", 3).clean == known_facts(m, 3).clean


def test_known_facts_errors(tiny_llama, monkeypatch):
    with pytest.raises(InputError, match="country_capital"):
        known_facts(tiny_llama, relations=("country_anthem",))
    monkeypatch.setattr(recall, "world_facts",
                        lambda relations: (world.Triple("country_capital", "cat", " zebra the"),
                                           world.Triple("country_capital", "dog", " quokka a")))
    with pytest.raises(TokenError, match="recalls none"):
        known_facts(tiny_llama)  # unknown words: nothing to keep


def test_world_facts():
    facts = world.world_facts()
    by = {(f.relation, f.subject): f.object for f in facts}
    assert by[("country_capital", "France")] == " Paris" and by[("city_country", "Osaka")] == " Japan"
    assert by[("country_continent", "Kenya")] == " Africa"
    assert all(world.ascii_name(f.subject) and world.ascii_name(f.object.strip()) for f in facts)
    cities = [f.subject for f in facts if f.relation == "city_country"]
    assert len(cities) == len(set(cities)) >= 300
    assert world.Triple("city_country", "Osaka", " Japan").prompt == "Osaka is a city in the country of"


@pytest.mark.real
def test_known_facts_real_model(smollm):
    pairs = known_facts(smollm, 12, seed=1)
    assert len(pairs) == 12 and len({c for c in pairs.clean}) == 12
    assert len({k for k, v in pairs.meta["relations"].items() if v["kept"]}) >= 2
    with torch.no_grad():
        for c, t, f in zip(pairs.clean, pairs.targets, pairs.foils):
            logits = smollm.hf(smollm.tokenizer(c, return_tensors="pt")["input_ids"]).logits[0, -1]
            assert int(logits.argmax()) == smollm.token_id(t) and t != f
