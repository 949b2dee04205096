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
from lmscope.attribution import EvaluateConfig, aopc, erasure_curves, evaluate_attributions, merge_evaluations
from lmscope.attribution.faithfulness import RANDOM, erasable_positions, method_scores
from lmscope.attribution.methods import METHODS
from lmscope.errors import InputError
from lmscope.localization import tasks
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
    assert r.meta["randomized_blocks"] == [2] and r.meta["subsets"] == {}
    info, f = r.meta["tasks"]["induction"], r.extras["induction.f"]
    assert (info["prompts"], info["sanity_prompts"]) == (3, 2)
    pairs = tasks.induction(tiny_llama, 3, seq_len=10, seed=0)  # the prompts the evaluation explained
    for i, (text, target, foil) in enumerate(zip(pairs.clean, pairs.targets, pairs.foils)):
        with torch.no_grad():
            logits = tiny_llama.hf(tiny_llama.encode(text).input_ids).logits[0, -1]
        assert float(f[i]) == pytest.approx(float(logits[tiny_llama.token_id(target)] - logits[tiny_llama.token_id(foil)]),
                                            abs=1e-4)
    assert info["accuracy"] == pytest.approx(float((f > 0).double().mean()))


def test_expensive_method_on_a_subset(tiny_llama):
    methods = ("saliency", "integrated-gradients")
    r = evaluate_attributions(tiny_llama, EvaluateConfig(tasks=("induction",), n=3, methods=methods, sanity=2,
                                                         ig_prompts=1))
    full = evaluate_attributions(tiny_llama, EvaluateConfig(tasks=("induction",), n=3, methods=methods, sanity=2))
    comp, suff = r.extras["induction.comprehensiveness"], r.extras["induction.sufficiency"]
    assert torch.isnan(comp[1:, 1]).all() and not torch.isnan(comp[:, [0, 2]]).any()
    # the prompts it ran on give what the full run gives; the others are left out of its means
    torch.testing.assert_close(comp[0], full.extras["induction.comprehensiveness"][0])
    torch.testing.assert_close(comp[:, [0, 2]], full.extras["induction.comprehensiveness"][:, [0, 2]])
    assert float(r.values[0, 1, 2]) == pytest.approx(float(comp[0, 1] - suff[0, 1]), abs=1e-5)
    torch.testing.assert_close(r.values[:, [0, 2]], full.values[:, [0, 2]], equal_nan=True)
    assert r.meta["subsets"] == {"integrated-gradients": {"prompts": 1, "random_comp_suff":
                                                          pytest.approx(float(comp[0, 2] - suff[0, 2]))}}
    with pytest.raises(InputError, match="ig-prompts"):
        EvaluateConfig(ig_prompts=0)


def test_identical_erasures_run_once(tiny_llama):
    t = len(tiny_llama.to_str_tokens(PROMPT))
    row = torch.arange(t, dtype=torch.float32)
    one = erasure_curves(tiny_llama, PROMPT, TARGET, FOIL, row[None])
    two = erasure_curves(tiny_llama, PROMPT, TARGET, FOIL, torch.stack([row, row]))
    n = len(one["positions"])
    assert one["forwards"] == two["forwards"] == 2 * n  # clean, n − 1 partial erasures each way, "erase all"
    torch.testing.assert_close(two["comprehensiveness"][1], one["comprehensiveness"][0])


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


def test_merged_runs_equal_one_run(tiny_llama):
    from lmscope.attribution.evaluate import task_prompts

    prompts = task_prompts(tiny_llama, "induction", 3, 0, induction_length=4)
    assert all(len(tiny_llama.tokenizer.encode(p[0], add_special_tokens=False)) == 2 * 4 - 1 for p in prompts)
    config = EvaluateConfig(methods=("saliency", "attention"), sanity=1)
    joint = evaluate_attributions(tiny_llama, config, {"a": prompts[:2], "b": prompts[2:]})
    parts = [evaluate_attributions(tiny_llama, config, {"a": prompts[:2]}),
             evaluate_attributions(tiny_llama, config, {"b": prompts[2:]})]
    merged = merge_evaluations(parts)
    torch.testing.assert_close(merged.values, joint.values, equal_nan=True)
    assert merged.axes == joint.axes and merged.meta["tasks"] == joint.meta["tasks"]
    assert all(torch.equal(merged.extras[k], joint.extras[k]) for k in joint.extras)
    with pytest.raises(InputError, match="appears twice"):
        merge_evaluations([parts[0], parts[0]])
    with pytest.raises(InputError, match="induction-length"):
        EvaluateConfig(induction_length=1)
