"""Head detectors against independent computations: naive loops over patterns, a hand-built previous-token
head, the full V × V OV spectrum, and the model's own head writes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny

from lmscope.behaviors import ROLES, HeadsConfig, head_atlas, pattern_scores
from lmscope.behaviors.heads import copying_scores, ov_logits, positional_score, repeated_tokens, successor_pairs


def _naive(patterns, ids):
    """Loops: previous-token over i ≥ 1; duplicate/induction over query rows that have a target."""
    b, h, t, _ = patterns.shape
    out = {k: torch.zeros(h) for k in ("previous_token", "duplicate_token", "induction")}
    for head in range(h):
        prev, dup, ind, n_dup, n_ind = [], 0.0, 0.0, 0, 0
        for r in range(b):
            for i in range(t):
                if i >= 1:
                    prev.append(float(patterns[r, head, i, i - 1]))
                d = [j for j in range(i) if ids[r, j] == ids[r, i]]
                if d:
                    dup += sum(float(patterns[r, head, i, j]) for j in d)
                    n_dup += 1
                s = [j for j in range(1, i + 1) if ids[r, j - 1] == ids[r, i] and j - 1 < i]
                if s:
                    ind += sum(float(patterns[r, head, i, j]) for j in s)
                    n_ind += 1
        out["previous_token"][head] = sum(prev) / len(prev)
        out["duplicate_token"][head] = dup / max(n_dup, 1)
        out["induction"][head] = ind / max(n_ind, 1)
    return out


def test_pattern_scores_match_loops_and_ideal_patterns():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, 5, (3, 7), generator=g)] * 2, dim=1)  # repeats inside and across copies
    t = ids.shape[1]
    patterns = torch.rand(3, 2, t, t, generator=g).tril()
    patterns = patterns / patterns.sum(-1, keepdim=True)
    got = pattern_scores(patterns, ids)
    for name, want in _naive(patterns, ids).items():
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-5, msg=name)
    # ideal patterns score 1: a head attending to i-1, and one attending to i - n + 1 on [R R]
    n = 7
    ideal = torch.zeros(1, 2, t, t)
    ideal[0, :, 0, 0] = 1
    for i in range(1, t):
        ideal[0, 0, i, i - 1] = 1
        ideal[0, 1, i, i - n + 1 if i >= n else i] = 1
    rand = torch.randperm(200)[:n].view(1, n)
    s = pattern_scores(ideal, torch.cat([rand, rand], dim=1))
    assert s["previous_token"][0] == 1 and s["induction"][1] == pytest.approx(1.0)
    assert s["induction"][0] < 0.2 and s["previous_token"][1] < 0.2


def _previous_token_model():
    """Tiny attention-only model whose head 0.1 attends to the previous token by construction: W_Q = W_K = 0 and
    biases q = c·e_k, k = c·R(θ_k)e_k in every RoPE plane k, so q_i·k_j = c² Σ_k cos((j − i + 1)θ_k), largest at
    j = i − 1."""
    m = make_tiny("attn_only")  # biases on, d_head 8
    hf, dh = m.hf, m.spec.d_head
    attn = hf.model.layers[0].self_attn
    theta = hf.config.rope_theta ** (-torch.arange(0, dh, 2).float() / dh)
    q, k = torch.zeros(dh), torch.zeros(dh)
    half = dh // 2
    q[:half] = 12.0
    k[:half], k[half:] = 12.0 * theta.cos(), 12.0 * theta.sin()
    sl = slice(dh, 2 * dh)  # head 1
    with torch.no_grad():
        attn.q_proj.weight[sl] = 0
        attn.k_proj.weight[sl] = 0
        attn.q_proj.bias[sl] = q
        attn.k_proj.bias[sl] = k
    return m


def test_hand_built_previous_token_head_is_found(tmp_path):
    m = _previous_token_model()
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["the cat sat on the mat and the dog ran fast when Mary went to the store"] * 8))
    res = head_atlas(m, HeadsConfig(n=6, batch=4, texts=2, context=16, probe_tokens=30, corpus=str(corpus)),
                     progress=False)
    assert res.axes[0].labels == ROLES and res.shape == (len(ROLES), 3, 4)
    prev = res.sel(role="previous_token").values
    assert prev[0, 1] > 0.97 and prev.flatten().argmax() == 1  # the built head, and no other
    assert res.sel(role="positional").values[0, 1] > 0.97  # attention that ignores content
    assert res.meta["top_heads"]["previous_token"][0][0] == "L0.H1"
    # its evidence pattern is the mean pattern of that head on [BOS] R R
    ev = res.extras["pattern.previous_token"]
    assert ev.shape == (13, 13) and ev.diagonal(-1).mean() > 0.97


def test_copying_score_equals_the_full_ov_spectrum():
    m = make_tiny("attn_only-rms")
    layer = 1
    with torch.no_grad():
        WUE = m.W_U.float() @ m.W_E.float()
        got = copying_scores(m, layer, WUE)
        g1, gf = m.norm_weight(f"blocks.{layer}.ln1").float(), m.norm_weight("ln_final").float()
        for h in range(m.spec.n_heads):
            full = (m.W_E * g1) @ m.W_V(layer)[h] @ m.W_O(layer)[h] @ (gf[:, None] * m.W_U)  # (V, V)
            lam = torch.linalg.eigvals(full.double())
            want = lam.real.sum() / lam.abs().sum()  # zero eigenvalues add nothing to either sum
            assert float(got[h]) == pytest.approx(float(want), abs=1e-4)
    assert got.abs().max() <= 1


def test_ov_logits_equal_the_heads_own_write_on_one_token():
    m = make_tiny("attn_only-rms")
    ids = torch.tensor([5, 9, 17])
    got = ov_logits(m, 0, m.W_E[ids].float(), torch.arange(m.spec.d_vocab))  # (H, 3, V)
    out = m.run(ids.view(-1, 1), cache=["blocks.0.attn.head_out"], logits="none")
    write = out["blocks.0.attn.head_out"][:, 0]  # (3, H, D): one token attends to itself only
    want = m.norm("ln_final", write, scale=1.0) @ m.W_U.float()
    torch.testing.assert_close(got, want.permute(1, 0, 2), atol=1e-4, rtol=1e-4)


def test_probes_are_well_formed():
    m = make_tiny("llama")
    ids = repeated_tokens(m, 5, 2, seed=3)
    assert ids.shape == (2, 11) and ids[0, 0] == m.tokenizer.bos_token_id
    assert torch.equal(ids[:, 1:6], ids[:, 6:])
    runs = successor_pairs(m)  # the tiny vocabulary has "one" .. "ten"
    assert runs and all(len(r) >= 3 for r, _ in runs)
    assert [m.decode([i]) for i in runs[0][0][:3]] == ["one", "two", "three"]
    same = torch.rand(2, 1, 4, 4).tril()
    assert float(positional_score(torch.cat([same, same]), 4)) == pytest.approx(1.0)
    assert math.isclose(float(positional_score(torch.cat([same, same.flip(0)]), 4)), 1.0) is False


@pytest.mark.real
def test_default_model_has_induction_heads_and_copy_suppression(smollm, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["When Mary and John went to the store, John gave a drink to Mary. The cat sat on "
                                   "the mat because it was tired, and the dog barked at the cat."] * 20))
    res = head_atlas(smollm, HeadsConfig(n=30, batch=4, texts=4, context=48, probe_tokens=200, corpus=str(corpus)),
                     progress=False)
    rep = res.meta["repeated_tokens"]
    assert rep["loss_second_copy"] < 0.5 * rep["loss_first_copy"]
    assert res.sel(role="induction").values.max() >= 0.8
    assert res.sel(role="ov_suppression").values[24, 4] > 0.5  # the negative name mover of the IOI work
