"""Mamba: the state-space family on a tiny random model.

The explicit mixer path against the native forward and against a hand-written recurrence; every
site with its shape; the block write = out_proj(s ⊙ SiLU(g)); the residual decomposition; SSM
knockout and state steering against the scan recomputed by hand; methods that need attention say
so; and the toolbox (logit and tuned lens, probes, CAA steering, patching, causal tracing, DLA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmscope import Add, Knockout, Patch
from lmscope.errors import ModelCheckError, UnsupportedArchitectureError
from lmscope.models.checks import check_model

from conftest import make_tiny

PROMPT = "the cat sat on the mat and the dog ran to the"


@pytest.fixture(scope="module")
def mamba():
    return make_tiny("mamba")


def hand_scan(model, layer, xa, g, sources=(), target=None, state_add=None):
    """s (T, E) of one prompt from its x_a (T, E), by the recurrence written out token by token.

    With ``sources``/``target``: the target's s recomputed with the sources' terms dropped from the
    state and their x_a dropped from every conv window the target reads (Δ, B, C stay as in the run).
    ``state_add=(p, v)`` adds v (E, N) to the state after token p.
    """
    mx = model.hf.backbone.layers[layer].mixer
    t, e = xa.shape
    k = mx.conv1d.kernel_size[0]
    w, bias = mx.conv1d.weight[:, 0, :].double(), mx.conv1d.bias.double()
    xa, g = xa.double(), g.double()

    def conv(r, drop=()):
        total = bias.clone()
        for j in range(k):
            i = r - (k - 1) + j
            if i >= 0 and i not in drop:
                total = total + w[:, j] * xa[i]
        return F.silu(total)

    u = torch.stack([conv(r) for r in range(t)])
    rank, n = int(mx.time_step_rank), mx.ssm_state_size
    proj = u @ mx.x_proj.weight.double().T
    dt = F.softplus(proj[:, :rank] @ mx.dt_proj.weight.double().T + mx.dt_proj.bias.double())
    b, c = proj[:, rank:rank + n], proj[:, rank + n:]
    a = -torch.exp(mx.A_log.double())
    d = mx.D.double()
    out = []
    for q in range(t):
        if target is not None and q != target:
            out.append(None)
            continue
        drop = [s for s in sources if s < q] if target is not None else []
        v = torch.stack([conv(r, drop) for r in range(q + 1)])
        h = torch.zeros(e, n, dtype=torch.float64)
        for r in range(q + 1):
            h = torch.exp(dt[r, :, None] * a) * h
            if r not in drop:
                h = h + (dt[r] * v[r])[:, None] * b[r][None, :]
            if state_add is not None and r == state_add[0]:
                h = h + state_add[1].double()
        out.append(h @ c[q] + d * v[q])
    return out


def test_sites_shapes_and_parts(mamba):
    s = mamba.spec
    assert (s.n_heads, s.d_mlp, s.d_inner, s.d_state) == (0, 0, 64, 4)
    assert mamba.parts == {"embedding", "block", "ssm", "final_norm", "unembedding"}
    names = [f"blocks.1.{k}" for k in ("ssm.in", "ssm.gate", "ssm.conv", "ssm.state", "ssm.out", "ssm.y", "ssm_out",
                                       "resid_pre", "resid_post")]
    run = mamba.run(PROMPT, cache=names)
    t = run.batch.input_ids.shape[1]
    want = {"ssm.state": (1, t, 64, 4), "ssm_out": (1, t, 32), "resid_pre": (1, t, 32), "resid_post": (1, t, 32)}
    for name in names:
        assert tuple(run[name].shape) == want.get(name.split(".", 2)[2], (1, t, 64)), name


def test_explicit_path_matches_native_and_hand_recurrence(mamba):
    batch = mamba.encode(PROMPT)
    with torch.no_grad():
        native = mamba.hf(batch.input_ids, output_hidden_states=True)
    sites = [f"blocks.{l}.{k}" for l in range(3) for k in ("ssm.in", "ssm.gate", "ssm.out", "ssm.y", "ssm_out",
                                                           "resid_post")]
    run = mamba.run(batch, cache=sites)
    assert torch.allclose(run.logits, native.logits, atol=1e-5)
    for l in range(3):
        assert torch.allclose(run[f"blocks.{l}.resid_post"], native.hidden_states[l], atol=1e-5)  # HF: block outputs
        s, g = run[f"blocks.{l}.ssm.out"], run[f"blocks.{l}.ssm.gate"]
        assert torch.allclose(run[f"blocks.{l}.ssm.y"], s * F.silu(g), atol=1e-6)
        write = mamba.hf.backbone.layers[l].mixer.out_proj(s * F.silu(g))
        assert torch.allclose(write, run[f"blocks.{l}.ssm_out"], atol=1e-5)
        ref = torch.stack(hand_scan(mamba, l, run[f"blocks.{l}.ssm.in"][0], g[0])).float()
        assert torch.allclose(ref, s[0], atol=1e-4)
    from lmscope.models import decompose

    dec = decompose(mamba, PROMPT)
    assert dec.labels == ["embed", "L0.ssm", "L1.ssm", "L2.ssm"]
    assert torch.allclose(dec.vectors.sum(1), dec.resid, atol=1e-5)


def test_load_check_catches_a_wrong_mixer(mamba, monkeypatch):
    from lmscope.models import ssm

    real = ssm.selective
    monkeypatch.setattr(ssm, "selective", lambda mx, u, *norms: (lambda dt, a, b, c: (dt * 1.5, a, b, c))(*real(mx, u, *norms)))
    with pytest.raises(ModelCheckError, match="state-space mixer"):
        check_model(mamba)


def test_methods_that_need_attention_say_so(mamba):
    from lmscope.localization.dla import dla
    from lmscope.localization.patching import activation_patching
    from lmscope.localization.tasks import PromptPairs

    with pytest.raises(UnsupportedArchitectureError, match=r"DLA by head needs attn.head_out, which needs the "
                                                           r"attention part; tiny-mamba \(mamba\) has no attention"):
        dla(mamba, PROMPT, "mat", by="head")
    with pytest.raises(UnsupportedArchitectureError, match="needs attn.z, which needs the attention part"):
        activation_patching(mamba, PromptPairs(["the cat sat"], ["the dog sat"], ["on"], ["in"]), "z")
    with pytest.raises(UnsupportedArchitectureError, match="W_O .* needs attn.z"):
        mamba.W_O(0)
    with pytest.raises(UnsupportedArchitectureError, match="DLA by neuron needs mlp.post"):
        dla(mamba, PROMPT, "mat", by="neuron")
    assert mamba.run(PROMPT, cache=["blocks.0.ssm_out"])["blocks.0.ssm_out"].shape[-1] == 32  # no hooks left


@pytest.mark.parametrize("sources,target", [([2], 5), ([0, 3, 4], 7), ([6], 8)])
def test_knockout_equals_the_scan_recomputed_without_the_sources(mamba, sources, target):
    layer = 1
    names = [f"blocks.{layer}.ssm.in", f"blocks.{layer}.ssm.gate", f"blocks.{layer}.ssm.out"]
    clean = mamba.run(PROMPT, cache=names)
    ko = mamba.run(PROMPT, cache=names, interventions=[Knockout(layer, from_positions=[target],
                                                                 to_positions=sources)])
    s_ko, s_clean = ko[names[2]][0], clean[names[2]][0]
    ref = hand_scan(mamba, layer, clean[names[0]][0], clean[names[1]][0], sources, target)[target].float()
    assert torch.allclose(s_ko[target], ref, atol=1e-4)
    assert (s_ko[target] - s_clean[target]).abs().max() > 1e-3  # the knockout does something
    others = [p for p in range(s_ko.shape[0]) if p != target]
    assert torch.equal(s_ko[others], s_clean[others])
    # only the knocked-out layer changes: the layer below is untouched, its input identical
    assert torch.equal(ko[names[0]], clean[names[0]])


def test_knockout_in_batched_sets_equals_single_runs(mamba):
    sets = [[Knockout(l, from_positions=[-1], to_positions=[1, 2])] for l in range(3)] + [[]]
    out = mamba.run_sets(PROMPT, sets, logits="last")
    for i, ivs in enumerate(sets):
        single = mamba.run(PROMPT, interventions=ivs, logits="last").logits
        assert torch.allclose(out.logits[i], single, atol=1e-5)
    assert not torch.allclose(out.logits[0], out.logits[-1], atol=1e-4)


def test_state_steering_flows_through_the_recurrence(mamba):
    layer, p = 2, 4
    vec = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    names = [f"blocks.{layer}.ssm.in", f"blocks.{layer}.ssm.gate", f"blocks.{layer}.ssm.out",
             f"blocks.{layer}.ssm.state"]
    clean = mamba.run(PROMPT, cache=names)
    steered = mamba.run(PROMPT, cache=names, interventions=[Add(f"blocks.{layer}.ssm.state", vec, positions=[p])])
    ref = torch.stack(hand_scan(mamba, layer, clean[names[0]][0], clean[names[1]][0], state_add=(p, vec))).float()
    assert torch.allclose(steered[names[2]][0], ref, atol=1e-4)
    assert torch.equal(steered[names[2]][0, :p], clean[names[2]][0, :p])
    assert torch.allclose(steered[names[3]][0, p], clean[names[3]][0, p] + vec, atol=1e-5)
    # a patch of the state at two positions leaves exactly those values there
    src = torch.randn_like(clean[names[3]])
    patched = mamba.run(PROMPT, cache=names[3:], interventions=[Patch(names[3], value=src, positions=[3, 6])])
    assert torch.allclose(patched[names[3]][0, [3, 6]], src[0, [3, 6]], atol=1e-6)
