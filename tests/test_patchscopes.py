"""Patchscopes: patching a state into itself changes nothing, a layer-0 patch equals substituting the
token, the batched sweep equals single runs, generation patches once; token identity on the default
model; bad input."""

from __future__ import annotations

import random

import pytest
import torch

from lmscope.decoding.patchscopes import (TargetPrompt, patchscope, patchscope_sweep, placeholder_position,
                                          source_states, token_identity)
from lmscope.errors import InputError

TARGET = TargetPrompt("cat sat on the mat ; dog ran ; it", "it")


def test_self_patch_is_the_unpatched_model(tiny_llama):
    m = tiny_llama
    # source = target prompt, same layer and position: the next-token distribution is the model's own
    r = patchscope(m, TARGET.text, 1, position=-1, target=TARGET, k=5)
    probs = m.run(TARGET.text, logits="last").logits[0].float().softmax(-1)
    top = probs.topk(5)
    assert torch.allclose(r.values, top.values, atol=1e-5)
    assert r.meta["top_ids"] == top.indices.tolist()


def test_layer0_patch_equals_substituting_the_token(tiny):
    m = tiny
    if m.adapter.embedding.positions is not None:
        pytest.skip("GPT-2's resid_pre 0 includes the source position's embedding, so the two differ by design")
    r = patchscope(m, "John went to the store", 0, position=0, target=TARGET, k=5)
    substituted = m.run("cat sat on the mat ; dog ran ; John", logits="last").logits[0].float().softmax(-1)
    assert torch.allclose(r.values, substituted.topk(5).values, atol=1e-5)


def test_sweep_equals_single_patchscopes(tiny_llama):
    m = tiny_llama
    sweep = patchscope_sweep(m, "when Mary and John went", position=-2, layers=[0, 1, 2], target_layers=[0, 2],
                             target=TARGET)
    assert sweep.values.shape == (3, 2)
    eid = sweep.target["expected_id"]
    assert m.decode([eid]) == "John"
    for i, ls in enumerate([0, 1, 2]):
        for j, lt in enumerate([0, 2]):
            single = patchscope(m, "when Mary and John went", ls, position=-2, target=TARGET, target_layer=lt,
                                k=m.spec.d_vocab)
            p = single.values[single.meta["top_ids"].index(eid)]
            assert torch.allclose(sweep.values[i, j], p, atol=1e-5)
            assert sweep.meta["top_tokens"][i][j] == single.meta["top_tokens"][0]


def test_generation_patches_the_first_forward_only(tiny_llama):
    m = tiny_llama
    r = patchscope(m, "Mary and John", 1, target=TARGET, max_new_tokens=4, k=3)
    # reference: re-run the growing sequence, patching the placeholder every time (same as once + KV cache)
    from lmscope import Patch

    h = source_states(m, "Mary and John", [1])[0]
    pos, _ = placeholder_position(m, TARGET)
    ids = m.encode(TARGET.text).input_ids[0].tolist()
    out = []
    for _ in range(4):
        lg = m.run(torch.tensor([ids]), interventions=[Patch("blocks.1.resid_pre", value=h[:, None], positions=[pos])],
                   logits="last").logits[0]
        out.append(int(lg.argmax()))
        ids.append(out[-1])
    assert r.meta["generated"] == m.decode(out)
    assert r.meta["top_ids"][0] == out[0]


def test_bad_input(tiny_llama):
    m = tiny_llama
    with pytest.raises(InputError, match="out of range"):
        patchscope(m, "the cat", 5, target=TARGET)
    with pytest.raises(InputError, match="out of range"):
        patchscope(m, "the cat", 0, target=TARGET, target_layer=-9)
    with pytest.raises(InputError, match="no token"):
        patchscope(m, "the cat", 0, target=TargetPrompt("the cat sat", "?"))
    with pytest.raises(InputError, match="Source position"):
        patchscope(m, "the cat", 0, position=5, target=TARGET)
    with pytest.raises(InputError, match="site"):
        patchscope(m, "the cat", 0, target=TARGET, site="mlp_out")


def random_words(model, n=100, seed=0):
    vocab = model.tokenizer.get_vocab()
    cands = sorted(t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) >= 5)
    return [model.tokenizer.convert_tokens_to_string([t]) for t in random.Random(seed).sample(cands, n)]


@pytest.mark.real
def test_identity_patchscope_decodes_the_source_token(smollm):
    words = random_words(smollm)
    assert all(len(smollm.encode(w).input_ids[0]) == 1 for w in words)
    r = token_identity(smollm, words, layers=[0])
    assert r.values[0] >= 0.9, r.values
