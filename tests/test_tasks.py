"""Task generators: IOI, induction, factual recall (names single-token, lengths aligned, positions right)."""

from __future__ import annotations

import pytest

from lmscope.errors import InputError, TokenError
from lmscope.localization import tasks


@pytest.mark.parametrize("corruption", ["ABC", "swap_io_s", "s2_io"])
def test_ioi_real_model(smollm, corruption):
    pairs = tasks.ioi(smollm, 60, corruption=corruption, seed=3)
    assert len(pairs) == 60
    lengths = set(pairs.lengths(smollm)) | {len(smollm.to_str_tokens(c)) for c in pairs.corrupt}
    assert len(lengths) == 1  # every prompt, clean and corrupt, has one token length
    for i in range(len(pairs)):
        toks = smollm.to_str_tokens(pairs.clean[i])
        pos = pairs.positions[i]
        assert toks[pos["IO"]] == pairs.targets[i] and toks[pos["S1"]] == pairs.foils[i]
        assert toks[pos["S2"]] == pairs.foils[i] and pos["S2"] > pos["S1"] and pos["END"] == len(toks) - 1
        assert pairs.targets[i] != pairs.foils[i]
        ctoks = smollm.to_str_tokens(pairs.corrupt[i])
        if corruption == "ABC":
            assert not {ctoks[pos["IO"]], ctoks[pos["S1"]], ctoks[pos["S2"]]} & {pairs.targets[i], pairs.foils[i]}
            assert len({ctoks[pos["IO"]], ctoks[pos["S1"]], ctoks[pos["S2"]]}) == 3
        elif corruption == "swap_io_s":
            assert ctoks[pos["IO"]] == pairs.foils[i] and ctoks[pos["S2"]] == pairs.targets[i]
        else:
            assert ctoks[pos["S2"]] == pairs.targets[i] and ctoks[pos["S1"]] == pairs.foils[i]
    orders = {"ABBA" if p["IO"] < p["S1"] else "BABA" for p in pairs.positions}
    assert orders == {"ABBA", "BABA"}
    assert all(p["IO"] < p["S1"] for p in tasks.ioi(smollm, 6, order="ABBA").positions)
    assert all(p["IO"] > p["S1"] for p in tasks.ioi(smollm, 6, order="BABA").positions)


def test_single_token_names_filter(smollm, tiny_llama):
    names = tasks.single_token_names(smollm)
    assert " Mary" in names and len(names) >= 50
    assert all(len(smollm.tokenizer.encode(n, add_special_tokens=False)) == 1 for n in names)
    assert set(tasks.single_token_names(tiny_llama)) == {" Mary", " John"}  # unknown words are not names
    with pytest.raises(TokenError, match="too few single-token names"):
        tasks.ioi(tiny_llama, 4)


def test_induction(smollm, tiny_llama):
    for m in (smollm, tiny_llama):
        pairs = tasks.induction(m, 4, seq_len=6, seed=1)
        for c, r, t, f in zip(pairs.clean, pairs.corrupt, pairs.targets, pairs.foils):
            ids = m.tokenizer.encode(c, add_special_tokens=False)
            rids = m.tokenizer.encode(r, add_special_tokens=False)
            assert len(ids) == len(rids) == 11
            assert ids[6:] == ids[:5] and rids[6:] == ids[:5] and rids[:6] != ids[:6]
            assert m.token_id(t) == ids[5] and m.token_id(f) == rids[5]
    with pytest.raises(InputError, match="seq_len"):
        tasks.induction(tiny_llama, 2, seq_len=1)


def test_factual(smollm):
    pairs = tasks.factual(smollm, 10)
    assert len(pairs) == 10
    i = pairs.clean.index("The capital of France is") if "The capital of France is" in pairs.clean else None
    for c, r, t, f, pos in zip(pairs.clean, pairs.corrupt, pairs.targets, pairs.foils, pairs.positions):
        toks = smollm.to_str_tokens(c)
        assert len(toks) == len(smollm.to_str_tokens(r)) and t != f
        assert "".join(toks[pos["SUBJ_FIRST"]:pos["SUBJ_LAST"] + 1]).strip() in c
    assert i is None or pairs.targets[i] == " Paris"


def test_pairs_validation(smollm):
    with pytest.raises(InputError, match="corrupt has 1 entries"):
        tasks.PromptPairs(["a", "b"], ["a"], ["x", "y"], ["z", "w"])
    bad = tasks.pair("The capital of France is", "The capital of the United Kingdom is", " Paris", " London")
    with pytest.raises(InputError, match="first differ at token 3"):
        bad.check(smollm)
    with pytest.raises(TokenError, match="not a single token"):
        tasks.pair("The capital of France is", "The capital of Italy is", " Parisians are", " Rome").check(smollm)


def test_pairs_from_json_induction_length(tiny_llama):
    pairs = tasks.pairs_from_json(tiny_llama, {"task": "induction", "n": 2, "seq_len": 4})
    assert all(len(tiny_llama.tokenizer.encode(c, add_special_tokens=False)) == 7 for c in pairs.clean)
    with pytest.raises(InputError, match="seq_len"):
        tasks.pairs_from_json(tiny_llama, {"task": "ioi", "n": 2, "seq_len": 4})
    with pytest.raises(InputError, match="unknown key"):
        tasks.pairs_from_json(tiny_llama, {"task": "induction", "length": 4})
