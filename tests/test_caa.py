"""CAA on A/B questions: the vectors against per-question runs read at the answer letter, the sweep against
independent steered forwards (vector added from the instruction's last token on, probability of the
matching letter over {A, B}), multiplier 0 = the plain model, the chat template and its steered span,
the datasets (letter balance, stratified split, the paper's file format) and bad input; on the default
model, the prompts tokenise as CAA needs."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope import Add
from lmscope.decoding.ab_data import LETTERS, ABItem, balanced, load_ab, split
from lmscope.decoding.caa import ab_prompts, caa_sweep, caa_vectors
from lmscope.errors import InputError

EXTRA = (":", "Answer", "Choices")


def with_vocab(model, words):
    """``model``'s weights with a word-level tokenizer of ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmscope.models import Model

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= model.spec.d_vocab
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<pad>")
    return Model(model.hf, fast, "tiny-ab")


@pytest.fixture(scope="module")
def ab_model(tiny_llama):
    """tiny_llama with a tokenizer that also knows ':' (to check the merge of ':(' in the prompt opening)."""
    from conftest import AB_TOKENS, WORDS

    return with_vocab(tiny_llama, (*WORDS, *AB_TOKENS, *EXTRA))


TRIPLES = [("the cat sat on the mat", "yes the cat", "no the dog"), ("when Mary went to the store", "she ran fast",
           "she was slow"), ("the sun is big", "it is red", "it is blue"), ("John gave a drink to Mary", "yes",
           "no"), ("the tree is green", "one two", "three four"), ("we went up the river", "left", "right"),
           ("they sat in the house", "it was big", "it was small"), ("the moon and the star", "one", "two")]


def _items(n=8, seed=0):
    return balanced(TRIPLES[:n], seed)


def _matching_prob(model, prompt, letter, interventions=()):
    logits = model.run(prompt, interventions=list(interventions), logits="last").logits[0].float()
    ab = logits[[model.token_id(x) for x in LETTERS]].softmax(-1)
    return float(ab[LETTERS.index(letter)])


def test_prompts_and_vectors_against_per_question_runs(ab_model):
    m = ab_model
    items = _items()
    p = ab_prompts(m, items)
    assert not p.chat and p.prompts[0].endswith("Answer: (") and p.steered == 2  # ':' then '('
    assert [m.decode([i]) for i in p.letter_ids] == ["A", "B"]
    vec, norms = caa_vectors(m, p, [0, 2])
    for row, layer in enumerate((0, 2)):
        site = f"blocks.{layer}.resid_post"
        diffs = []
        for prompt, item in zip(p.prompts, items):
            h = {x: m.run(prompt + x, cache=[site])[site][0, -1] for x in LETTERS}
            assert m.to_str_tokens(prompt + item.matching)[-1] == item.matching  # read at the letter token
            diffs.append(h[item.matching] - h[item.other])
        torch.testing.assert_close(vec[row], torch.stack(diffs).mean(0), atol=1e-5, rtol=1e-4)
    assert norms.shape == (2,) and (norms > 0).all()


def test_sweep_against_independent_steered_runs(ab_model):
    m = ab_model
    items = _items()
    res = caa_sweep(m, items, layers=[0, 1, 2], multipliers=(-2.0, 0.0, 3.0), test=4, seed=1)
    assert res.values.shape == (3, 3) and res.axes[1].labels == ("-2", "0", "3")
    train, held = split(items, 4, 1)
    vec, _ = caa_vectors(m, ab_prompts(m, train), [0, 1, 2])
    torch.testing.assert_close(res.extras["vectors"], vec)
    p = ab_prompts(m, held)
    for li, layer in enumerate((0, 1, 2)):
        for mi, mult in enumerate((-2.0, 0.0, 3.0)):
            for q, (prompt, item) in enumerate(zip(p.prompts, held)):
                t = len(m.to_str_tokens(prompt))
                add = Add(f"blocks.{layer}.resid_post", vec[li], scale=mult, positions=[t - 2, t - 1])
                want = _matching_prob(m, prompt, item.matching, [add])
                assert res.extras["per_question"][li, mi, q].item() == pytest.approx(want, abs=2e-5)
    # multiplier 0 is the plain model, and steering moves the probabilities
    plain = torch.tensor([_matching_prob(m, pr, it.matching) for pr, it in zip(p.prompts, held)])
    torch.testing.assert_close(res.extras["per_question"][:, 1], plain.expand(3, -1), atol=2e-5, rtol=0)
    assert (res.values[:, 0] - res.values[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(res.extras["shift"], res.values[:, 2] - res.values[:, 0])
    assert res.meta["n_train"] == 4 and res.meta["n_test"] == 4


def test_chat_template_sets_the_steered_span(ab_model):
    m = ab_model
    header = "{% for x in messages %}Choices {{ x['content'] }} {% endfor %}{% if add_generation_prompt %}Answer :"
    m.tokenizer.chat_template = header + " {% endif %}"
    try:
        p = ab_prompts(m, _items(2))
        assert p.chat and p.prompts[0].startswith("Choices the cat") and p.prompts[0].endswith("Answer : (")
        assert p.steered == 2
        m.tokenizer.chat_template = header + "{% endif %}"  # ':(' is one token of this tokenizer
        with pytest.raises(InputError, match="merges"):
            ab_prompts(m, _items(2))
        with pytest.raises(InputError, match="template"):
            ab_prompts(m, _items(2), template="other")
    finally:
        m.tokenizer.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        ab_prompts(m, _items(2), template="chat")


def test_datasets_and_splits(tmp_path):
    items = load_ab("myopic-reward")
    assert len(items) == 48 and sum(it.matching == "A" for it in items) == 24
    for it in items:  # the matching (myopic) answer sits under its letter
        a = it.question.split("\n (A) ")[1].split("\n (B) ")[0]
        b = it.question.split("\n (B) ")[1]
        assert len({a, b}) == 2
    assert load_ab("myopic-reward") == items and load_ab("myopic-reward", seed=1) != items
    train, test = split(items, 0.25, 0)
    assert len(test) == 12 and len(train) == 36 and not set(map(id, train)) & set(map(id, test))
    assert sum(it.matching == "A" for it in test) == 6  # stratified by letter
    rows = [{"question": "Q1 (A) x (B) y", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"},
            {"question": "Q2", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": "(B)"}]
    (tmp_path / "ab.json").write_text(json.dumps(rows))
    (tmp_path / "ab.jsonl").write_text("\n".join(map(json.dumps, rows)))
    want = [ABItem("Q1 (A) x (B) y", "B"), ABItem("Q2", "A")]
    assert load_ab(str(tmp_path / "ab.json")) == want == load_ab(str(tmp_path / "ab.jsonl"))
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "Q", "answer_matching_behavior": "(A)",
                                                    "answer_not_matching_behavior": "(A)"}] * 2))
    with pytest.raises(InputError, match=r"\(A\) and \(B\)"):
        load_ab(str(tmp_path / "bad.json"))
    with pytest.raises(InputError, match="neither a built-in"):
        load_ab("no-such-behaviour")
    with pytest.raises(InputError, match="each side"):
        split(items, 48, 0)


def test_bad_input(ab_model):
    m = ab_model
    with pytest.raises(InputError, match="only one answer letter"):
        caa_sweep(m, [ABItem(q, "A") for q, _, _ in TRIPLES], test=2)
    with pytest.raises(InputError, match="without repeats"):
        caa_sweep(m, _items(), multipliers=(1.0, 1.0))
    with pytest.raises(InputError, match="site"):
        caa_vectors(m, ab_prompts(m, _items(2)), site="mlp_out")
    from conftest import WORDS

    with pytest.raises(InputError, match="same token"):  # a tokenizer without the letters: both are <unk>
        ab_prompts(with_vocab(m, WORDS), _items(2))
    from lmscope.decoding.caa import CAAConfig

    with pytest.raises(InputError, match="limit"):
        CAAConfig(limit=1)
    with pytest.raises(InputError, match="not a choice"):
        CAAConfig(site="attn_out")


@pytest.mark.real
def test_default_model_prompts(smollm):
    items = load_ab("myopic-reward")[:4]
    p = ab_prompts(smollm, items)
    assert p.chat and p.prompts[0].endswith("<|im_start|>assistant\n(")
    assert p.steered == 2 and [smollm.decode([i]) for i in p.letter_ids] == ["A", "B"]
    caps = load_ab("capitals")
    assert len(caps) >= 100 and abs(sum(it.matching == "A" for it in caps) - len(caps) / 2) <= 0.5
    france = next(it for it in caps if "of France?" in it.question)
    assert f"({france.matching}) Paris\n" in france.question + "\n"


@pytest.mark.real
def test_myopic_reward_vector_shifts_the_answer(smollm):
    """On the default model the myopic-reward vectors of middle layers move P(myopic letter) with the sign
    of the multiplier (a small effect: SmolLM2-135M answers these A/B questions near chance)."""
    res = caa_sweep(smollm, load_ab("myopic-reward"), layers=[14, 17], multipliers=(-8.0, 0.0, 8.0))
    print(res.values)
    assert (res.values.diff(dim=1) > 0).all() and (res.extras["shift"] >= 0.015).all()
