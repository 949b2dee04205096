"""Attribution patching: AtP against the first-order Taylor term measured by finite differences of
real patched forwards, the QK fix against patterns from a really patched run, GradDrop against
hand-computed gradients, and on the real model the rank correlation with exact head patching."""

from __future__ import annotations

import pytest
import torch

from lmscope import Patch
from lmscope.errors import InputError
from lmscope.localization.atp import atp, atp_star, encode_pairs, exact_head_effects, spearman
from lmscope.localization.metrics import Metric
from lmscope.localization.tasks import PromptPairs

PAIRS = PromptPairs(
    ["when Mary and John went to the store John gave a drink to", "the cat sat on the mat and the dog ran to the"],
    ["when Mary and John went to the store Mary gave a drink to", "the dog sat on the mat and the cat ran to the"],
    ["Mary", "dog"], ["John", "cat"])
SITE = {"head": "attn.z", "mlp": "mlp_out", "neuron": "mlp.post", "resid": "resid_pre"}


def _setup(model, pairs=PAIRS, direction="noise"):
    clean, corrupt = encode_pairs(model, pairs)
    t, f = pairs.token_ids(model)
    metric = Metric("logit_diff", t, f)
    return (clean, corrupt) if direction == "noise" else (corrupt, clean), metric


def _directional_derivative(model, base_b, other_b, metric, site, select, eps=1e-2):
    """(M(a + εΔ) − M(a − εΔ)) / 2ε with Δ restricted by ``select`` (a mask over the site)."""
    a = model.run(base_b, cache=[site]).cache[site]
    d = (model.run(other_b, cache=[site]).cache[site] - a) * select
    vals = []
    for sign in (1, -1):
        run = model.run(base_b, interventions=[Patch(site, value=a + sign * eps * d)], logits="last")
        vals.append(metric(run.logits))
    return float((vals[0] - vals[1]) / (2 * eps))


@pytest.mark.parametrize("family_direction", [("llama", "noise"), ("llama", "denoise"), ("gemma2", "noise"),
                                              ("gemma3", "noise"), ("neox", "noise")])
def test_atp_is_the_first_order_taylor_term(family_direction):
    from conftest import make_tiny

    family, direction = family_direction
    model = make_tiny(family)
    res = atp(model, PAIRS.subset([0]), direction=direction, normalise=False)
    (base_b, other_b), metric = _setup(model, PAIRS.subset([0]), direction)
    t = base_b.input_ids.shape[1]
    checks = 0
    for kind, layer, index in [("head", 1, 2), ("head", 0, 3), ("mlp", 1, None), ("neuron", 2, 5),
                               ("resid", 1, 4), ("resid", 2, t - 1)]:
        site = f"blocks.{layer}.{SITE[kind]}"
        shape = model.run(base_b, cache=[site]).cache[site].shape
        select = torch.zeros(shape)
        if kind == "head":
            select[:, :, index] = 1
        elif kind == "neuron":
            select[..., index] = 1
        elif kind == "resid":
            select[:, index] = 1
        else:
            select[:] = 1
        by_hand = _directional_derivative(model, base_b, other_b, metric, site, select)
        got = res[kind].values[layer, index] if index is not None else res[kind].values[layer]
        assert float(got) == pytest.approx(by_hand, abs=2e-3, rel=2e-3), (kind, layer, index)
        checks += abs(by_hand) > 1e-3
    assert checks >= 3  # the comparison is not between zeros


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # Gemma 2 soft-caps its attention scores
def test_qk_fix_matches_a_really_patched_pattern(family):
    from conftest import make_tiny

    model = make_tiny(family)
    res = atp(model, PAIRS, nodes=("head",), qk_fix=True, direction="noise", normalise=False)
    (clean, corrupt), metric = _setup(model)
    layer, head = 1, 1
    pre = f"blocks.{layer}."
    sites = [pre + "attn.q", pre + "attn.k", pre + "attn.pattern"]
    other = model.run(corrupt, cache=sites).cache
    run = model.run(clean, cache=[pre + "attn.pattern"], grad=True, logits="last")
    value = metric(run.logits)
    (g_a,) = torch.autograd.grad(value, [run.cache[pre + "attn.pattern"]])
    a = run.cache[pre + "attn.pattern"].detach()
    for which, col in (("q", "head_q"), ("k", "head_k")):
        site = pre + f"attn.{which}"
        patched = model.run(clean, cache=[pre + "attn.pattern"],
                            interventions=[Patch(site, value=other[site], heads=[head])]).cache[pre + "attn.pattern"]
        by_hand = float(((patched - a) * g_a).sum())
        assert float(res[col].values[layer, head]) == pytest.approx(by_hand, abs=1e-5, rel=1e-4)
    # value nodes are plain AtP
    assert res["head_v"].values.abs().sum() > 0


def test_graddrop_by_hand(tiny_llama):
    model = tiny_llama
    n = model.spec.n_layers
    plain = atp(model, PAIRS, nodes=("head", "mlp"), direction="noise", normalise=False)
    star = atp(model, PAIRS, nodes=("head", "mlp"), graddrop=True, direction="noise", normalise=False)
    # the last layer's nodes: dropping any earlier layer leaves their gradient unchanged
    torch.testing.assert_close(star["head"].values[n - 1], plain["head"].values[n - 1].abs(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(star["mlp"].values[n - 1], plain["mlp"].values[n - 1].abs(), atol=1e-5, rtol=1e-4)
    # the MLP one layer below: dropping the last block leaves only the direct path through the residual
    (clean, corrupt), metric = _setup(model)
    layer = n - 2
    mo = f"blocks.{layer}.mlp_out"
    final = f"blocks.{n - 1}.resid_post"
    run = model.run(clean, cache=[final], grad=True, logits="last")
    (g_final,) = torch.autograd.grad(metric(run.logits), [run.cache[final]])
    d_mlp = model.run(corrupt, cache=[mo]).cache[mo] - model.run(clean, cache=[mo]).cache[mo]
    direct = (d_mlp * g_final).sum()
    assert abs(float(direct) - float(plain["mlp"].values[layer])) > 1e-3  # the drop changes something
    expect = ((n - 2) * plain["mlp"].values[layer].abs() + direct.abs()) / (n - 1)
    torch.testing.assert_close(star["mlp"].values[layer], expect, atol=1e-5, rtol=1e-4)
    assert (star["head"].values >= 0).all()


def test_atp_bad_input(tiny_llama):
    with pytest.raises(InputError, match="node"):
        atp(tiny_llama, PAIRS, nodes=("heads",))
    with pytest.raises(InputError, match="noise"):
        atp(tiny_llama, PAIRS, direction="sideways")
    uneven = PromptPairs(["the cat sat on the mat", "the dog ran"], ["the dog sat on the mat", "the cat ran"],
                         ["and", "to"], ["to", "and"])
    with pytest.raises(InputError, match="one token length"):
        atp(tiny_llama, uneven, nodes=("resid",))
    assert "head" in atp(tiny_llama, uneven, nodes=("head",))


def test_spearman_against_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    b[:10] = a[:10]
    a[5] = a[6]  # a tie
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-9)


@pytest.mark.real
def test_atp_ranks_heads_like_exact_patching_on_ioi(smollm):
    """AtP (noising, logit difference) against exact per-head patching on IOI prompts. CI uses 16
    prompts; the 50-prompt figure is in the issue report."""
    from lmscope.localization.tasks import ioi

    pairs = ioi(smollm, 16, seed=1)
    approx = atp(smollm, pairs, nodes=("head",), direction="noise", normalise=False)["head"].values
    exact = exact_head_effects(smollm, pairs, direction="noise").values
    assert approx.abs().max() > 0.05
    rho = spearman(approx, exact)
    assert rho >= 0.7, rho


@pytest.mark.real
def test_atp_sign_is_wrong_where_exact_head_patching_says_so(smollm):
    """Issue 17's finding, on the same 50 IOI prompts (ABC corruption, noising, logit difference): patching
    L16.H0 or L8.H1 (attn.z at every position) lowers the logit difference (L16.H0 by ~1.7, the 3rd largest
    |effect|; L8.H1 by ~0.44), while AtP's first-order estimate is positive for both. Exact effects here come
    from single patched runs, not from the batched sweep. (AtP*'s GradDrop does not recover them either:
    bench/circuit_report.py atp, README.)"""
    from lmscope.localization.tasks import ioi

    pairs = ioi(smollm, 50, seed=0)
    est = atp(smollm, pairs, nodes=("head",), direction="noise", normalise=False, batch_size=10)["head"].values
    t, f = pairs.token_ids(smollm)
    exact = {head: 0.0 for head in ((16, 0), (8, 1), (23, 3))}
    for start in range(0, len(pairs), 10):
        rows = range(start, min(len(pairs), start + 10))
        clean, corrupt = encode_pairs(smollm, pairs.subset(rows))
        metric = Metric("logit_diff", t[start:start + 10], f[start:start + 10])
        with torch.no_grad():
            base = float(metric(smollm.run(clean, logits="last").logits))
            for layer, head in exact:
                site = f"blocks.{layer}.attn.z"
                z = smollm.run(corrupt, cache=[site]).cache[site]
                run = smollm.run(clean, interventions=[Patch(site, value=z, heads=[head])], logits="last")
                exact[layer, head] += (float(metric(run.logits)) - base) * len(rows) / len(pairs)
    assert exact[16, 0] < -1.0 and exact[8, 1] < -0.3, exact
    assert float(est[16, 0]) > 0.1 and float(est[8, 1]) > 0.1, est[[16, 8], [0, 1]]
    # where AtP holds: the largest effect (L23.H3, a name mover) is estimated to within 10%
    assert exact[23, 3] < -2.0 and float(est[23, 3]) == pytest.approx(exact[23, 3], rel=0.1)


@pytest.mark.real
def test_atp_star_runs_on_real_model(smollm):
    from lmscope.localization.tasks import ioi

    res = atp_star(smollm, ioi(smollm, 2, seed=2), nodes=("head",))
    assert set(res) == {"head", "head_q", "head_k", "head_v"}
    assert (res["head"].values >= 0).all() and res["head"].values.max() > 0


def test_exact_head_effects_match_single_runs(tiny_llama):
    model = tiny_llama
    res = exact_head_effects(model, PAIRS, direction="noise")
    (clean, corrupt), metric = _setup(model)
    base = metric(model.run(clean, logits="last").logits)
    for layer, head in [(0, 0), (1, 3), (2, 1)]:
        site = f"blocks.{layer}.attn.z"
        value = model.run(corrupt, cache=[site]).cache[site]
        run = model.run(clean, interventions=[Patch(site, value=value, heads=[head])], logits="last")
        assert float(res.values[layer, head]) == pytest.approx(float(metric(run.logits) - base), abs=1e-5)
    assert res.values.abs().max() > 1e-3


def test_head_check_sets_atp_beside_exact_patching(tiny_llama):
    """atp --exact: the check's columns are the exact sweep, AtP and GradDrop; its wrong-sign heads and ranks
    recomputed here from those columns; the spec's ResultSet carries it as 'head_check'."""
    from lmscope import specs
    from lmscope.localization.atp import AtPConfig
    from lmscope.localization.atp_check import head_check

    model = tiny_llama
    check = head_check(model, PAIRS, big=0.05)
    exact = exact_head_effects(model, PAIRS, direction="noise").values.flatten()
    plain = atp(model, PAIRS, nodes=("head",), direction="noise", normalise=False)["head"].values.flatten()
    gd = atp(model, PAIRS, nodes=("head",), direction="noise", normalise=False, graddrop=True)["head"].values.flatten()
    torch.testing.assert_close(check.values, torch.stack([exact, plain, gd], 1))
    assert check.meta["spearman"] == pytest.approx(spearman(plain, exact), abs=1e-9)
    H = model.spec.n_heads
    big = exact.abs() >= 0.05 * exact.abs().max()
    want = sorted((i for i in range(len(exact)) if big[i] and (plain[i] > 0) != (exact[i] > 0)),
                  key=lambda i: -abs(float(exact[i])))
    assert [r["head"] for r in check.meta["wrong_sign"]] == [f"L{i // H}.H{i % H}" for i in want]
    top = check.meta["top_exact"][0]
    i = int(exact.abs().argmax())
    assert top["head"] == f"L{i // H}.H{i % H}" and top["rank_exact"] == 1
    assert top["rank_atp"] == 1 + int((plain.abs() > plain[i].abs()).sum())
    rs = specs.get("atp").run(model, PAIRS, AtPConfig(direction="noise", exact=True))
    torch.testing.assert_close(rs["head_check"].values, check.values)
    with pytest.raises(InputError, match="big"):
        head_check(model, PAIRS, big=0.0)
