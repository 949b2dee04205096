"""Directions and steering: the KV-cached generation loop against full recomputation (positions mean
absolute positions in the growing sequence), scale 0 = unsteered exactly, directions against manual
means, projection and erasure, bad input; a sentiment vector on the default model."""

from __future__ import annotations

import pytest
import torch

from lmscope import Add
from lmscope.decoding.probes import collect
from lmscope.decoding.steering import (Erase, actadd_vector, caa_vector, direction_from_labelled, direction_from_texts,
                                       erase, generate, mean_difference, project)
from lmscope.errors import InputError

PROMPTS = ["the cat sat on the", "when Mary and John went to the store John gave a"]


def recompute(model, prompt, vector, layer, scale, n, select):
    """Reference: greedy decoding by re-running the whole sequence each step, with the vector added at
    the absolute positions ``select(t, prompt_len)`` says, computed on the full sequence."""
    ids = model.encode(prompt).input_ids[0].tolist()
    p, out = len(ids), []
    for _ in range(n):
        t = len(ids)
        if vector.ndim == 1:
            delta = torch.stack([vector if select(i, p) else torch.zeros_like(vector) for i in range(t)])
        else:
            delta = torch.stack([vector[i] if i < len(vector) else torch.zeros_like(vector[0]) for i in range(t)])
        run = model.run(torch.tensor([ids]), interventions=[Add(f"blocks.{layer}.resid_pre", delta[None], scale=scale)],
                        logits="last")
        nxt = int(run.logits[0].argmax())
        out.append(run.logits[0].float().log_softmax(-1))
        ids.append(nxt)
    return ids[p:], torch.stack(out)


@pytest.mark.parametrize("how", ["all", "list", "from", "actadd"])
def test_cached_steering_equals_recomputation(tiny_llama, how):
    m = tiny_llama
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(m.spec.d_model, generator=g)
    kwargs, select = {}, (lambda i, p: True)
    if how == "list":
        kwargs, select = {"positions": [0, -1]}, (lambda i, p: i in (0, p - 1))
    elif how == "from":
        kwargs, select = {"from_position": -2}, (lambda i, p: i >= p - 2)
    elif how == "actadd":
        vec = torch.randn(3, m.spec.d_model, generator=g)
    gen = generate(m, PROMPTS, vec, 1, scale=2.0, max_new_tokens=5, **kwargs)  # left-padded batch of two
    for row, prompt in enumerate(PROMPTS):
        toks, lps = recompute(m, prompt, vec, 1, 2.0, 5, select)
        assert gen.tokens[row].tolist() == toks
        assert torch.allclose(gen.log_probs[row], lps, atol=1e-4)


def test_scale_zero_is_exactly_unsteered(tiny_llama):
    m = tiny_llama
    vec = torch.randn(m.spec.d_model)
    plain = generate(m, PROMPTS, max_new_tokens=6)
    zero = generate(m, PROMPTS, vec, [0, 2], scale=0.0, max_new_tokens=6)
    assert torch.equal(plain.tokens, zero.tokens) and torch.equal(plain.log_probs, zero.log_probs)
    steered = generate(m, PROMPTS, vec * 5, [0, 2], scale=1.0, max_new_tokens=6)
    assert not torch.equal(plain.log_probs, steered.log_probs)
    # the unsteered loop agrees with Hugging Face's own greedy generate
    enc = m.encode(PROMPTS[0])
    hf = m.hf.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=6, do_sample=False,
                       pad_token_id=1)
    assert hf[0, enc.input_ids.shape[1]:].tolist() == plain.tokens[0].tolist()


def test_directions_against_manual_means(tiny_llama):
    m = tiny_llama
    pos, neg = ["the cat sat", "a dog ran fast", "the sun"], ["the moon", "he was slow", "it is red and blue"]
    acts_p, _ = collect(m, pos, "resid_pre", [2])
    acts_n, _ = collect(m, neg, "resid_pre", [2])
    d = direction_from_texts(m, pos, neg, 2)
    assert torch.allclose(d, acts_p[2].mean(0) - acts_n[2].mean(0), atol=1e-6)
    assert torch.allclose(direction_from_labelled(m, pos + neg, [1, 1, 1, 0, 0, 0], 2), d, atol=1e-6)
    pairs = list(zip(pos, neg))
    caa = caa_vector(m, pairs, 2, position=-1)
    manual = torch.stack([m.run(p, cache=["blocks.2.resid_pre"])["blocks.2.resid_pre"][0, -1]
                          - m.run(n, cache=["blocks.2.resid_pre"])["blocks.2.resid_pre"][0, -1] for p, n in pairs]).mean(0)
    assert torch.allclose(caa, manual, atol=1e-5)
    act = actadd_vector(m, "the cat sat", "he", 1)
    ref_p = m.run("the cat sat", cache=["blocks.1.resid_pre"])["blocks.1.resid_pre"][0]
    assert act.shape == (3, m.spec.d_model)
    assert torch.allclose(act[0], ref_p[0] - m.run("he", cache=["blocks.1.resid_pre"])["blocks.1.resid_pre"][0, 0],
                          atol=1e-5)


def test_projection_and_erasure(tiny_llama):
    g = torch.Generator().manual_seed(0)
    acts, d = torch.randn(10, 32, generator=g), torch.randn(32, generator=g)
    u = d / d.norm()
    assert torch.allclose(project(acts, d), acts @ u, atol=1e-6)
    e = erase(acts, d)
    assert project(e, d).abs().max() < 1e-5
    assert torch.allclose(erase(e, d), e, atol=1e-6)  # idempotent
    assert torch.allclose(e + (acts @ u)[:, None] * u, acts, atol=1e-5)
    m = tiny_llama
    site = "blocks.1.resid_pre"
    run = m.run("the cat sat on the mat", cache=[site], interventions=[Erase(site, direction=d, positions=[1, 2])])
    proj = project(run[site][0], d)
    assert proj[1:3].abs().max() < 1e-4 and proj[0].abs() > 1e-3
    clean = m.run("the cat sat on the mat", logits="last").logits
    assert not torch.allclose(run.logits[0, -1], clean[0])


def test_bad_input(tiny_llama):
    m = tiny_llama
    with pytest.raises(InputError, match="width 7"):
        generate(m, "the cat", torch.randn(7), 1)
    with pytest.raises(InputError, match="out of range"):
        generate(m, "the cat", torch.randn(m.spec.d_model), 9)
    with pytest.raises(InputError, match="NaN"):
        generate(m, "the cat", torch.full((m.spec.d_model,), float("nan")), 1)
    with pytest.raises(InputError, match="width"):
        project(torch.randn(3, 8), torch.randn(5))
    with pytest.raises(InputError, match="non-zero"):
        erase(torch.randn(3, 8), torch.zeros(8))
    with pytest.raises(InputError, match="equal D"):
        mean_difference(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(InputError, match="binary"):
        direction_from_labelled(m, ["the cat", "a dog"], [1, 2], 0)
    with pytest.raises(InputError, match="do not also give positions"):
        generate(m, "the cat", torch.randn(2, m.spec.d_model), 1, positions=[0])


POSITIVE = [" great", " good", " wonderful", " excellent", " amazing", " beautiful", " perfect", " fantastic",
            " loved", " love", " best", " brilliant", " enjoyed", " happy"]
NEGATIVE = [" bad", " terrible", " awful", " boring", " horrible", " worst", " hated", " hate", " poor",
            " stupid", " disappointing", " waste", " sad", " annoying"]


def sentiment_score(model, gen):
    """Mean over generated steps of log P(positive words) − log P(negative words)."""
    pos = torch.tensor([model.token_id(w) for w in POSITIVE])
    neg = torch.tensor([model.token_id(w) for w in NEGATIVE])
    lp = gen.log_probs
    return (lp[..., pos].logsumexp(-1) - lp[..., neg].logsumexp(-1)).mean().item()


@pytest.mark.real
def test_sentiment_vector_shifts_generation(smollm):
    pos = ["This movie was wonderful, I loved it.", "A brilliant, delightful film.",
           "Great acting and a beautiful story.", "I really enjoyed this, it was excellent."]
    neg = ["This movie was terrible, I hated it.", "A boring, awful film.",
           "Bad acting and a stupid story.", "I really disliked this, it was horrible."]
    vec = direction_from_texts(smollm, pos, neg, 10, position="mean")
    prompts = ["I watched the movie yesterday and I thought it was", "My opinion of the restaurant is that it"]
    scores = {}
    for scale in (-4.0, 0.0, 4.0):
        gen = generate(smollm, prompts, vec, 10, scale=scale, max_new_tokens=12)
        scores[scale] = sentiment_score(smollm, gen)
        print(scale, scores[scale], gen.texts)
    assert scores[4.0] > scores[0.0] + 1.0
    assert scores[-4.0] < scores[0.0] - 1.0
