"""Faithfulness evaluation of attribution methods on a tiny model: erasure curves against separate
forwards of every erased subset, the best possible ordering (brute force) against every method, the
random attribution against the exact expectation over orderings, and the sanity checks' randomised
model and targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from lmscope.attribution import EvaluateConfig, aopc, erasure_curves, evaluate_attributions
from lmscope.attribution.faithfulness import RANDOM, erasable_positions, method_scores
from lmscope.attribution.methods import METHODS
from lmscope.models import randomized_copy
from lmscope.models.parts import get_module

PROMPT = "when Mary and John went to the store"
TARGET, FOIL = "the", "a"


def test_aopc_closed_form():
    # a curve of drops 0, 1, 2, 3 (k = 0..3): area over the perturbation curve = mean = 1.5
    assert float(aopc(torch.tensor([0.0, 1.0, 2.0, 3.0]))) == 1.5
    torch.testing.assert_close(aopc(torch.tensor([[0.0, 2.0], [4.0, 0.0]])), torch.tensor([1.0, 2.0]))


@pytest.fixture(scope="module")
def table():
    """f(x with the tokens of S replaced by UNK) for every subset S of the erasable positions, from
    HF's own forward on hand-built input embeddings (independent of run_sets and Patch)."""
    model = make_tiny("llama")
    batch = model.encode(PROMPT)
    positions = erasable_positions(model, batch)
    assert positions == list(range(1, batch.input_ids.shape[1]))  # no BOS here: all but the first
    emb_mod = get_module(model.hf, model.adapter.embedding.tokens)
    t, f = model.token_id(TARGET), model.token_id(FOIL)
    with torch.no_grad():
        emb = emb_mod(batch.input_ids)[0]
        unk = emb_mod(torch.tensor([[model.tokenizer.unk_token_id]]))[0, 0]
        values = {}
        for r in range(len(positions) + 1):
            for subset in itertools.combinations(positions, r):
                e = emb.clone()
                e[list(subset)] = unk
                logits = model.hf(inputs_embeds=e[None], use_cache=False).logits[0, -1]
                values[frozenset(subset)] = float(logits[t] - logits[f])
    return model, positions, values


def _curves_from_table(order, positions, values):
    f0, n = values[frozenset()], len(positions)
    comp = [f0 - values[frozenset(order[:k])] for k in range(n + 1)]
    suff = [f0 - values[frozenset(order[k:])] for k in range(n + 1)]
    return torch.tensor(comp, dtype=torch.float64), torch.tensor(suff, dtype=torch.float64)


def test_erasure_curves_match_separate_forwards(table):
    model, positions, values = table
    t = len(positions) + 1
    scores = torch.stack([torch.arange(t, dtype=torch.float32), torch.randn(t, generator=torch.Generator().manual_seed(1))])
    cur = erasure_curves(model, PROMPT, TARGET, FOIL, scores)
    assert cur["f"] == pytest.approx(values[frozenset()], abs=1e-5)
    assert "<unk>" in cur["replacement"]
    for m in range(2):
        order = sorted(positions, key=lambda p: -float(scores[m, p]))
        comp, suff = _curves_from_table(order, positions, values)
        torch.testing.assert_close(cur["comprehensiveness"][m], comp, atol=1e-4, rtol=0)
        torch.testing.assert_close(cur["sufficiency"][m], suff, atol=1e-4, rtol=0)


def test_oracle_ordering_scores_best_and_random_meets_its_expectation(table):
    model, positions, values = table
    n, f0 = len(positions), values[frozenset()]

    def net(order):
        comp, suff = _curves_from_table(list(order), positions, values)
        return float(aopc(comp) - aopc(suff))

    best = max(itertools.permutations(positions), key=net)  # brute force over all 7! orderings
    oracle = torch.zeros(n + 1)
    oracle[list(best)] = torch.arange(n, 0, -1, dtype=torch.float32)
    scores, _ = method_scores(model, PROMPT, TARGET, FOIL, METHODS)
    cur = erasure_curves(model, PROMPT, TARGET, FOIL, torch.cat([oracle[None], scores]))
    nets = aopc(cur["comprehensiveness"]) - aopc(cur["sufficiency"])
    assert float(nets[0]) == pytest.approx(net(best), abs=1e-4)
    assert float(nets[0]) >= float(nets[1:].max()) - 1e-6  # no method beats the best ordering
    # a random ordering: E[f(x without k random tokens)] is the mean over all k-subsets, and its
    # comprehensiveness and sufficiency have the same expectation
    mean_k = [sum(v for s, v in values.items() if len(s) == k) / math.comb(n, k) for k in range(n + 1)]
    exact_comp = sum(f0 - mean_k[k] for k in range(n + 1)) / (n + 1)
    exact_suff = sum(f0 - mean_k[n - k] for k in range(n + 1)) / (n + 1)
    assert exact_comp == pytest.approx(exact_suff, abs=1e-9)
    rand = torch.rand(400, n + 1, generator=torch.Generator().manual_seed(0))
    cur = erasure_curves(model, PROMPT, TARGET, FOIL, rand)
    spread = float(aopc(cur["comprehensiveness"]).std()) / math.sqrt(400)
    assert float(aopc(cur["comprehensiveness"]).mean()) == pytest.approx(exact_comp, abs=4 * spread)
    assert float(aopc(cur["sufficiency"]).mean()) == pytest.approx(exact_comp, abs=4 * spread)
    assert float(nets[0]) > exact_comp - exact_suff + 10 * spread  # the oracle is far above random


def test_randomized_copy_changes_only_its_blocks(tiny_llama):
    copy = randomized_copy(tiny_llama, [2], seed=3)
    for layer in range(3):
        same = torch.equal(copy.W_O(layer), tiny_llama.W_O(layer))
        assert same == (layer != 2)
    assert torch.equal(copy.W_E, tiny_llama.W_E)
    assert float(copy.W_O(2).detach().std()) == pytest.approx(float(tiny_llama.W_O(2).detach().std()), rel=0.2)


def test_evaluation_table_and_sanity_checks(tiny_llama):
    methods = ("saliency", "occlusion", "attention")
    r = evaluate_attributions(tiny_llama, EvaluateConfig(tasks=("induction",), n=3, methods=methods, sanity=2))
    assert r.values.shape == (2, 4, 5) and r.axes[1].labels == (*methods, RANDOM)
    torch.testing.assert_close(r.values[0], r.values[1], equal_nan=True)  # one task: "all" is that task
    comp, suff = r.extras["induction.comprehensiveness"], r.extras["induction.sufficiency"]
    torch.testing.assert_close(r.values[0, :, 2], (comp - suff).mean(0).float())
    # target-free attention ignores the target: correlation 1 under target randomisation
    assert float(r.values[0, 2, 4]) == pytest.approx(1.0)
    assert float(r.values[0, 0, 4]) < 0.99 and float(r.values[0, 0, 3]) < 0.99  # saliency follows both
    assert torch.isnan(r.values[0, 3, 3:]).all()  # the random attribution has no sanity check
    assert r.meta["randomized_blocks"] == [2] and r.meta["tasks"]["induction"] == {"prompts": 3, "sanity_prompts": 2}


def test_cli_attribute_evaluate(tiny_llama, monkeypatch):
    from lmscope.cli import common
    from lmscope.cli.main import app

    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    args = ["--tasks", "induction", "--n", "2", "--methods", "saliency", "--methods", "rollout", "--sanity", "0"]
    for cmd in (["attribute", "--evaluate", *args], ["attribute", "evaluate", *args], ["attribute", *args[:2],
                                                                                      "--evaluate", *args[2:]]):
        res = CliRunner().invoke(app, cmd, terminal_width=200)
        assert res.exit_code == 0, res.output
        assert "attribution faithfulness" in res.output and "saliency" in res.output and RANDOM in res.output
    bad = CliRunner().invoke(app, ["attribute", "--evaluate", "--tasks", "sst2"])
    assert bad.exit_code != 0 and "ioi" in bad.output
