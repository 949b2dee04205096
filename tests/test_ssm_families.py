"""The other state-space families on tiny random configs, with the load checks Mamba has: every site fires
with its shape, the explicit mixer path gives the native logits, each block's write is out_proj(s ⊙ SiLU(g)),
and the residual decomposition adds up (all in :func:`check_model`, run at load); plus what differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_tiny
from lmscope.errors import ModelCheckError
from lmscope.models.checks import check_model
from lmscope.sites import KINDS

PROMPT = "the cat sat on the mat and the dog ran to the"


@pytest.fixture(scope="module")
def falcon():
    return make_tiny("falcon_mamba")


def test_falcon_mamba_loads_checked_with_every_ssm_site(falcon):
    assert falcon.spec.family == "falcon_mamba" and falcon.load_check == "checked"
    assert "ssm" in falcon.parts and "mlp" not in falcon.parts and "attention" not in falcon.parts
    sites = [f"blocks.1.{k}" for k in KINDS if KINDS[k].part == "ssm"]
    run = falcon.run(PROMPT, cache=sites)
    t = run.batch.input_ids.shape[1]
    for name in sites:
        assert tuple(run[name].shape) == KINDS[name.split(".", 2)[2]].shape(falcon.spec, 1, t), name
    check_model(falcon)  # again, explicitly


def test_falcon_mamba_norms_are_in_the_explicit_path(falcon, monkeypatch):
    """Without its Δ/B/C norms (plain Mamba's path) the explicit mixer misses the native logits: the check says so."""
    a = falcon.adapter
    plain = dataclasses.replace(a, block=dataclasses.replace(
        a.block, mixer=dataclasses.replace(a.block.mixer, selective_norms=None)))
    monkeypatch.setattr(falcon, "adapter", plain)
    with pytest.raises(ModelCheckError, match="state-space mixer"):
        check_model(falcon)
    monkeypatch.undo()
    # the norms are RMS norms of x_proj's Δ_rank, B and C: B as the scan sees it has unit RMS per token
    mx = falcon.hf.backbone.layers[1].mixer
    u = falcon.run(PROMPT, cache=["blocks.1.ssm.conv"])["blocks.1.ssm.conv"]
    from lmscope.models.ssm import selective

    _, _, b, c = selective(mx, u, a.block.mixer.selective_norms)
    for x in (b, c):
        torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(x.shape[:2]), rtol=1e-3, atol=1e-3)


def test_falcon_mamba_takes_the_toolbox(falcon):
    """Knockout, state steering and ROME's memory work as on Mamba (the same part)."""
    from lmscope import Knockout

    base = falcon.run(PROMPT, cache=["blocks.1.ssm.out"], logits="last")
    ko = falcon.run(PROMPT, interventions=[Knockout(1, from_positions=[-1], to_positions=[0, 1, 2])],
                    cache=["blocks.1.ssm.out"], logits="last")
    assert not torch.allclose(ko.logits, base.logits)
    torch.testing.assert_close(ko["blocks.1.ssm.out"][0, :-1], base["blocks.1.ssm.out"][0, :-1])
    mem = falcon.memory(1)
    assert mem.kind == "ssm" and mem.param is falcon.hf.backbone.layers[1].mixer.out_proj.weight


@pytest.fixture(scope="module")
def mamba2():
    return make_tiny("mamba2")


def hand_mamba2(model, layer, x_TD, sources=(), target=None):
    """(states (T, E, N), s (T, E)) of one prompt's mixer input x (T, D), token by token in float64 from the
    native module's parameters. With ``sources``/``target``: the target's s with the sources' terms dropped from
    the state sum and their x_a dropped from every conv window (Δ, B and C stay as in the run)."""
    mx = model.hf.backbone.layers[layer].mixer
    e, h, p, n, grp, k = mx.intermediate_size, mx.num_heads, mx.head_dim, mx.ssm_state_size, mx.n_groups, 4
    proj = x_TD.double() @ mx.in_proj.weight.double().T
    g, xbc, dt_raw = proj.split([e, mx.conv_dim, h], dim=-1)
    w, bias = mx.conv1d.weight[:, 0, :].double(), mx.conv1d.bias.double()
    t = x_TD.shape[0]

    def conv(r, drop=()):
        total = bias.clone()
        for j in range(k):
            i = r - (k - 1) + j
            if i >= 0:
                xi = xbc[i].clone()
                if i in drop:  # a dropped token's x_a leaves the window; its B and C inputs stay
                    xi[:e] = 0
                total = total + w[:, j] * xi
        return torch.nn.functional.silu(total)

    conv_all = torch.stack([conv(r) for r in range(t)])
    u, b, c = conv_all.split([e, grp * n, grp * n], dim=-1)
    if target is not None:  # the target's view: sources' x_a out of every window, the sources' own u gone
        u = torch.stack([torch.zeros(e, dtype=torch.float64) if r in sources else conv(r, sources)[:e]
                         for r in range(t)])
    dt = torch.nn.functional.softplus(dt_raw + mx.dt_bias.double())
    a = -torch.exp(mx.A_log.double())
    state = torch.zeros(h, p, n, dtype=torch.float64)
    states, outs = [], []
    for r in range(t):
        out = torch.zeros(h, p, dtype=torch.float64)
        for head in range(h):
            grp_i = head // (h // grp)
            bh, ch = b[r, grp_i * n:(grp_i + 1) * n], c[r, grp_i * n:(grp_i + 1) * n]
            xh = u[r, head * p:(head + 1) * p]
            state[head] = torch.exp(dt[r, head] * a[head]) * state[head] + dt[r, head] * torch.outer(xh, bh)
            out[head] = state[head] @ ch + mx.D[head].double() * xh
        states.append(state.reshape(e, n).clone())
        outs.append(out.reshape(e))
    return torch.stack(states), torch.stack(outs)


def test_mamba2_loads_checked_and_its_sites_are_the_recurrence(mamba2):
    assert mamba2.spec.family == "mamba2" and mamba2.load_check == "checked"
    assert (mamba2.spec.d_inner, mamba2.spec.d_state) == (64, 4)
    sites = [f"blocks.1.{k}" for k in KINDS if KINDS[k].part == "ssm"] + ["blocks.1.resid_pre"]
    run = mamba2.run(PROMPT, cache=sites)
    t = run.batch.input_ids.shape[1]
    assert t > mamba2.hf.config.chunk_size  # the native scan runs in several chunks
    for name in sites[:-1]:
        assert tuple(run[name].shape) == KINDS[name.split(".", 2)[2]].shape(mamba2.spec, 1, t), name
    x = mamba2.hf.backbone.layers[1].norm(run["blocks.1.resid_pre"])[0]
    states, s = hand_mamba2(mamba2, 1, x)
    torch.testing.assert_close(run["blocks.1.ssm.state"][0].double(), states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run["blocks.1.ssm.out"][0].double(), s, rtol=1e-4, atol=1e-5)
    # the out_proj input is the gated, grouped RMS norm of s ⊙ SiLU(g), with its weight
    y = run["blocks.1.ssm.out"][0] * torch.nn.functional.silu(run["blocks.1.ssm.gate"][0])
    y = y.view(t, 2, 32)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(t, 64)
    y = y * mamba2.hf.backbone.layers[1].mixer.norm.weight
    torch.testing.assert_close(run["blocks.1.ssm.y"][0], y, rtol=1e-4, atol=1e-5)
    check_model(mamba2)


def test_mamba2_check_catches_a_missing_norm(mamba2, monkeypatch):
    from lmscope.models import checks

    with monkeypatch.context() as mp:  # Mamba's out_proj input (no gated norm) does not give Mamba-2's writes
        mp.setattr(checks, "out_proj_input", lambda model, layer, s, g: s * torch.nn.functional.silu(g))
        with pytest.raises(ModelCheckError, match="write differs"):
            check_model(mamba2)


@pytest.mark.parametrize("sources,target", [((2, 3), 9), ((0,), 4), ((5,), 6)])
def test_mamba2_knockout_equals_the_recurrence_without_the_sources(mamba2, sources, target):
    from lmscope import Knockout

    ko = Knockout(1, from_positions=[target], to_positions=list(sources))
    run = mamba2.run(PROMPT, cache=["blocks.1.ssm.out", "blocks.1.resid_pre"], interventions=[ko])
    base = mamba2.run(PROMPT, cache=["blocks.1.ssm.out"])["blocks.1.ssm.out"][0]
    x = mamba2.hf.backbone.layers[1].norm(run["blocks.1.resid_pre"])[0]
    _, s = hand_mamba2(mamba2, 1, x, sources, target)
    got = run["blocks.1.ssm.out"][0]
    torch.testing.assert_close(got[target].double(), s[target], rtol=1e-4, atol=1e-5)
    assert float((got[target] - base[target]).abs().max()) > 1e-4  # the knockout changed the target
    others = [i for i in range(got.shape[0]) if i != target]
    torch.testing.assert_close(got[others], base[others])  # and nothing else


def test_mamba2_state_steering_and_rome_memory(mamba2):
    from lmscope import Add

    t = len(mamba2.to_str_tokens(PROMPT))
    v = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    base = mamba2.run(PROMPT, cache=["blocks.1.ssm.state", "blocks.1.ssm.out"])
    steer = mamba2.run(PROMPT, cache=["blocks.1.ssm.state"],
                       interventions=[Add("blocks.1.ssm.state", v, positions=[3])])
    d = steer["blocks.1.ssm.state"][0] - base["blocks.1.ssm.state"][0]
    assert float(d[:3].abs().max()) == 0.0
    torch.testing.assert_close(d[3], v, rtol=1e-4, atol=1e-5)
    # the change decays by each head's exp(Δ A) per token: position 4 holds exp(Δ_4 A) ⊙ v
    mx = mamba2.hf.backbone.layers[1].mixer
    x = mx.in_proj(mamba2.hf.backbone.layers[1].norm(mamba2.run(PROMPT, cache=["blocks.1.resid_pre"])
                                                     ["blocks.1.resid_pre"]))[0]
    dt = torch.nn.functional.softplus(x[:, -8:] + mx.dt_bias)
    decay = torch.exp(dt[4] * -torch.exp(mx.A_log)).repeat_interleave(8)
    torch.testing.assert_close(d[4], decay[:, None] * v, rtol=1e-4, atol=1e-5)
    assert t > 5
    mem = mamba2.memory(1)
    assert (mem.kind, mem.key_site) == ("ssm", "blocks.1.ssm.y")
    run = mamba2.run(PROMPT, cache=["blocks.1.ssm.y", "blocks.1.ssm_out"])
    torch.testing.assert_close(run["blocks.1.ssm.y"][0] @ mem.weight().T, run["blocks.1.ssm_out"][0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["falcon_mamba", "mamba2"])
def test_lens_dla_and_tracing_on_the_other_families(family, request):
    from lmscope.decoding import logit_lens
    from lmscope.localization.dla import dla
    from lmscope.localization.tracing import causal_trace

    model = request.getfixturevalue("falcon" if family == "falcon_mamba" else "mamba2")
    logits = model.run(PROMPT, logits="last").logits[0]
    lens = logit_lens(model, PROMPT, k=3)
    assert lens.extras["top_ids"][-1, -1].tolist() == torch.softmax(logits.float(), -1).topk(3).indices.tolist()
    res = dla(model, PROMPT, "mat", "dog")
    diff = float(logits[model.token_id("mat")] - logits[model.token_id("dog")])
    assert res.axes[0].labels == ("embed", "L0.ssm", "L1.ssm", "L2.ssm") and abs(res.meta["total"] - diff) < 1e-4
    tr = causal_trace(model, "the cat sat on the", "cat", kind="ssm_s", samples=3, window=3)
    assert tr.values.shape == (3, 5) and tr.meta["clean_prob"] != tr.meta["corrupt_prob"]
    tr = causal_trace(model, "the cat sat on the", "cat", kind="ssm", samples=3, window=3)
    assert abs(float(tr.values[1, -1]) - tr.meta["clean_prob"]) < 1e-5  # every write at the last token: clean
