"""Patchscopes: patching a state into itself changes nothing, a layer-0 patch equals substituting the
token, the batched sweep equals single runs, generation patches once; accuracy over many sources (next
token or generated text, ℓ* = ℓ or a source × target layer grid) against single Patchscopes; the tasks
and their direct reading; cross-model Patchscopes (affine maps against least squares, the mapped state is
what is patched, the spec's second model); token identity on the default model; bad input."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from lmscope.decoding.patchscope_eval import PatchscopeTask, direct_reading, evaluate_task, random_words, task
from lmscope.decoding.patchscopes import (TargetPrompt, contains_any, patchscope, patchscope_accuracy, patchscope_sweep,
                                          placeholder_position, source_states, token_identity)
from lmscope.decoding.probes import collect
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


SOURCES = ["when Mary and John went", "the cat sat on the mat", "a dog ran", "he gave a drink to"]


def test_accuracy_grid_equals_single_patchscopes(tiny_llama):
    m = tiny_llama
    top = [patchscope(m, s, 0, target=TARGET, target_layer=1, k=1).meta["top_ids"][0] for s in SOURCES]
    res = patchscope_accuracy(m, SOURCES, top, layers=[0, 2], target_layers=[1, 2], target=TARGET)
    assert res.values.shape == (2, 2) and res.axis_names == ("source_layer", "target_layer")
    assert res.values[0, 0] == 1.0  # the expected tokens are that cell's own predictions
    for i, ls in enumerate([0, 2]):
        for j, lt in enumerate([1, 2]):
            for b, (src, eid) in enumerate(zip(SOURCES, top)):
                single = patchscope(m, src, ls, target=TARGET, target_layer=lt, k=m.spec.d_vocab)
                assert int(res.extras["correct"][i, j, b]) == int(single.meta["top_ids"][0] == eid)
                p = single.values[single.meta["top_ids"].index(eid)]
                assert abs(float(res.extras["expected_prob"][i, j, b]) - float(p)) < 1e-5
            assert res.values[i, j] == res.extras["correct"][i, j].float().mean()
    diag = patchscope_accuracy(m, SOURCES, top, layers=[1, 2], target=TARGET)
    assert diag.values.shape == (2,)
    torch.testing.assert_close(diag.extras["expected_prob"][1], res.extras["expected_prob"][1, 1])
    ident = token_identity(m, SOURCES, layers=[1, 2], target=TARGET)
    own = [m.encode(s).input_ids[0, -1].item() for s in SOURCES]
    torch.testing.assert_close(ident.values, patchscope_accuracy(m, SOURCES, own, layers=[1, 2], target=TARGET).values)


def test_accuracy_by_generation_equals_patchscope_continuations(tiny_llama):
    m = tiny_llama
    gens = [patchscope(m, s, 1, target=TARGET, target_layer=2, max_new_tokens=4, k=1).meta["generated"]
            for s in SOURCES]
    expected = [[gens[0].split()[0]], "zebra", ["zebra", gens[2].split()[-1].upper()], "zebra"]
    res = patchscope_accuracy(m, SOURCES, expected, layers=[1], target_layers=[2], target=TARGET, generate=4)
    assert res.meta["generated"][0] == gens
    assert res.extras["correct"][0, 0].tolist() == [1, 0, 1, int("zebra" in gens[3].lower())]
    cut = patchscope_accuracy(m, SOURCES, expected, layers=[1], target_layers=[2], target=TARGET, generate=4,
                              stop=gens[0].split()[0])  # nothing of source 0's continuation is left before the stop
    assert cut.extras["correct"][0, 0, 0] == 0 and cut.params["stop"] == gens[0].split()[0]
    assert contains_any("Country in East Asia, Malaysia", ["Asia"], ",") and not contains_any("in Malaysia", "Asia")
    with pytest.raises(InputError, match="one expected text"):
        patchscope_accuracy(m, SOURCES, None, layers=[1], target=TARGET, generate=4)


def test_tasks_and_direct_reading(tiny_llama):
    m = tiny_llama
    caps = task(m, "capitals", n=500)
    assert caps.target.placeholder == "x" and caps.generate == 0
    assert not {" Italy", " Egypt", " Peru", " Kenya"} & set(caps.subjects) and " France" in caps.subjects
    assert caps.sources[caps.subjects.index(" France")] == "I read about France"  # read in context
    desc = task(m, "description", n=5, seed=1)
    assert desc.generate == 12 and desc.stop == "," and all(isinstance(e, list) and e for e in desc.expected)
    t = PatchscopeTask("custom", SOURCES, ["no", "no", "yes", "yes"], TARGET)
    direct = direct_reading(m, t)
    for b, (s, e) in enumerate(zip(SOURCES, t.expected)):  # the placeholder 'it' replaced by the source text
        logits = m.run(TARGET.text.rsplit("it", 1)[0] + s, logits="last").logits[0]
        assert bool(direct[b]) == (int(logits.argmax()) == m.token_id(e))
    assert direct.any() and not direct.all()  # the expected tokens were chosen to give both outcomes
    res = evaluate_task(m, t, layers=[0, 1])
    assert res.meta["direct"] == direct.float().mean().item() and res.method == "patchscope_eval"
    with pytest.raises(InputError, match="task"):
        task(m, "colours")


@pytest.mark.real
def test_identity_patchscope_decodes_the_source_token(smollm):
    words = random_words(smollm, 100)
    assert all(len(smollm.encode(w).input_ids[0]) == 1 for w in words)
    r = token_identity(smollm, words, layers=[0])
    assert r.values[0] >= 0.9, r.values


def _texts(n, seed=0):
    from conftest import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n)]


def test_affine_maps_against_least_squares(tiny_llama):
    from conftest import make_tiny

    from lmscope.decoding.patchscope_models import fit_affine_maps, ridge_fit

    m, other = tiny_llama, make_tiny("gemma3", seed=1)
    texts = _texts(200)
    same = fit_affine_maps(m, m, texts, [(1, 1)], ridge=0.0)  # a model onto itself: the identity map
    torch.testing.assert_close(same.W[1, 1], torch.eye(m.spec.d_model), atol=1e-3, rtol=0)
    assert same.b[1, 1].abs().max() < 1e-3 and same.r2[1, 1] > 0.999
    maps = fit_affine_maps(m, other, texts, [(2, 1), (-1, 0)], ridge=0.0, heldout=0.25)
    assert set(maps.W) == {(2, 1), (2, 0)}  # -1 is layer 2 of the 3
    X, _ = collect(m, texts, "resid_pre", [2], position="last")
    Y, _ = collect(other, texts, "resid_pre", [1], position="last")
    train = torch.tensor(sorted(set(range(200)) - set(random_test_rows(200, 0.25))))
    ones = torch.ones(len(train), 1, dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([X[2][train].double(), ones], 1), Y[1][train].double()).solution
    torch.testing.assert_close(maps.W[2, 1], sol[:-1].float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(maps.b[2, 1], sol[-1].float(), atol=1e-3, rtol=1e-3)
    W, _ = ridge_fit(X[2], Y[1], 10.0)  # ridge shrinks the map
    assert W.norm() < ridge_fit(X[2], Y[1], 0.0)[0].norm()
    with pytest.raises(InputError, match="No map"):
        maps(torch.zeros(1, 32), 0, 0)
    with pytest.raises(InputError, match="too few"):
        fit_affine_maps(m, other, texts[:5], [(0, 0)])


def random_test_rows(n, heldout, seed=0):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:max(1, int(n * heldout))]


def test_cross_model_patchscope(tiny_llama):
    from conftest import make_tiny

    from lmscope.decoding.patchscope_models import AffineMaps

    m, other = tiny_llama, make_tiny("gemma3", seed=1)
    eye = AffineMaps({(1, 2): torch.eye(32)}, {(1, 2): torch.zeros(32)}, {(1, 2): 1.0}, m.name, m.name)
    own = patchscope_accuracy(m, SOURCES, None, layers=[1], target_layers=[2], target=TARGET)
    cross = patchscope_accuracy(m, SOURCES, None, layers=[1], target_layers=[2], target=TARGET, source_model=m,
                                mapping=eye)
    torch.testing.assert_close(cross.extras["expected_prob"], own.extras["expected_prob"])
    # another target model: the mapped source state is what gets patched
    g = torch.Generator().manual_seed(0)
    amap = AffineMaps({(1, 0): torch.randn(32, 32, generator=g) / 6}, {(1, 0): torch.randn(32, generator=g)}, {},
                      m.name, other.name)
    res = patchscope_accuracy(other, SOURCES, ["no"] * 4, layers=[1], target_layers=[0], target=TARGET,
                              source_model=m, mapping=amap)
    h = source_states(m, SOURCES, [1])[0]
    pos, _ = placeholder_position(other, TARGET)
    for b in range(len(SOURCES)):
        from lmscope import Patch

        v = (h[b].float() @ amap.W[1, 0] + amap.b[1, 0])[None, None]
        probs = other.run(TARGET.text, interventions=[Patch("blocks.0.resid_pre", value=v, positions=[pos])],
                          logits="last").logits[0].float().softmax(-1)
        assert abs(float(res.extras["expected_prob"][0, 0, b]) - float(probs[other.token_id("no")])) < 1e-5
    with pytest.raises(InputError, match="together"):
        patchscope_accuracy(other, SOURCES, layers=[1], target=TARGET, source_model=m, mapping=amap)


def test_cross_model_spec(tiny_llama, monkeypatch):
    """`patchscope eval --source-model`: the other model loaded, maps fitted per layer pair, the task's words
    single tokens of both models."""
    from conftest import make_tiny

    import lmscope.models
    from lmscope import specs
    from lmscope.decoding import patchscope_eval
    from lmscope.decoding.patchscope_models import fit_affine_maps

    other = make_tiny("gemma3", seed=1)
    monkeypatch.setattr(lmscope.models, "load", lambda name: other)
    monkeypatch.setattr(patchscope_eval, "fit_texts", lambda n, seed=0: _texts(n, seed))
    cfg = specs.get("patchscope-eval").config(task="identity", n=40, layers="1,2", target_layers="0", source_model="o",
                                              fit_texts=150, target_prompt=TARGET.text, target_position=-1)
    res = specs.run(tiny_llama, "patchscope-eval", None, cfg)
    maps = fit_affine_maps(other, tiny_llama, _texts(150), [(1, 0), (2, 0)])
    t = task(tiny_llama, "identity", 40, source_model=other)
    want = evaluate_task(tiny_llama, replace(t, target=TARGET, target_position=-1), layers=[1, 2], target_layers=[0],
                         source_model=other, mapping=maps)
    torch.testing.assert_close(res.extras["expected_prob"], want.extras["expected_prob"])
    assert res.params["source_model"] == other.name and res.extras["map_r2"].shape == (2, 1)
    assert res.extras["map_r2"][:, 0].tolist() == pytest.approx([maps.r2[1, 0], maps.r2[2, 0]])
    with pytest.raises(InputError, match="target-layers"):
        specs.get("patchscope-eval").config(source_model="o")


@pytest.mark.real
def test_attribute_extraction_on_the_default_model(smollm):
    """A country's state, read in context at an early-middle layer, yields its capital from the few-shot
    'country: capital' prompt for most of the facts the model knows; from a late layer (ℓ* = ℓ) it does not."""
    t = task(smollm, "capitals", n=30)
    res = evaluate_task(smollm, t, layers=[4, 25])
    assert res.meta["direct"] >= 0.3
    known = res.extras["known_accuracy"]
    assert known[0] >= 0.6 and known[1] <= 0.2, known
