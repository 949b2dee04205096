"""Activation patching, metrics and path patching on tiny models of every family: each sweep cell
against a separate unbatched patched forward, invariants, bad input, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope import Ablate, Patch
from lmscope.errors import InputError, SiteError
from lmscope.localization import metrics
from lmscope.localization.patching import activation_patching, prepare
from lmscope.localization.path_patching import path_patching
from lmscope.localization.tasks import PromptPairs

CLEAN = ["when Mary and John went to the store John gave a drink to",
         "when John and Mary ran to the tree Mary gave a drink to"]
CORRUPT = ["when John and Mary went to the store Mary gave a drink to",
           "when Mary and John ran to the tree John gave a drink to"]
PAIRS = PromptPairs(CLEAN, CORRUPT, ["Mary", "John"], ["John", "Mary"])


def _metric(model, setup, base, ivs):
    logits = model.run(base, interventions=ivs, logits="last").logits
    return float(setup.metric(logits))


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_position_sweep_cells_equal_unbatched(tiny, site, direction):
    setup = prepare(tiny, PAIRS)
    r = activation_patching(tiny, PAIRS, site, direction=direction, normalise=False, setup=setup, chunk_size=5)
    t = setup.clean.input_ids.shape[1]
    assert r.values.shape == (tiny.spec.n_layers, t)
    src = setup.clean if direction == "denoise" else setup.corrupt
    base = setup.base(direction)
    names = [f"blocks.{l}.{site}" for l in range(tiny.spec.n_layers)]
    cache = tiny.run(src, cache=names).cache
    ref = torch.tensor([[_metric(tiny, setup, base, [Patch(nm, value=cache[nm], positions=[p])]) for p in range(t)]
                        for nm in names])
    torch.testing.assert_close(r.values, ref, atol=2e-4, rtol=1e-4)
    assert ref.std() > 1e-3  # the sweep measures something
    norm = activation_patching(tiny, PAIRS, site, direction=direction, setup=setup)
    torch.testing.assert_close(norm.values, setup.normalise(ref, direction), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("site", ["z", "q", "k", "v", "pattern"])
def test_head_sweep_cells_equal_unbatched(tiny, site):
    setup = prepare(tiny, PAIRS)
    kind = {"z": "attn.z", "q": "attn.q", "k": "attn.k", "v": "attn.v", "pattern": "attn.pattern"}[site]
    names = [f"blocks.{l}.{kind}" for l in range(tiny.spec.n_layers)]
    cache = tiny.run(setup.clean, cache=names).cache
    r = activation_patching(tiny, PAIRS, site, normalise=False, setup=setup)
    assert r.axis_names == ("layer", "head")
    ref = torch.tensor([[_metric(tiny, setup, setup.corrupt, [Patch(nm, value=cache[nm], heads=[h])])
                         for h in range(tiny.spec.n_heads)] for nm in names])
    torch.testing.assert_close(r.values, ref, atol=2e-4, rtol=1e-4)
    pos = [3, 12]
    r3 = activation_patching(tiny, PAIRS, site, normalise=False, setup=setup, by_position=True, positions=pos,
                             layers=[1])
    assert r3.axis_names == ("layer", "head", "position")
    ref3 = torch.tensor([[[_metric(tiny, setup, setup.corrupt, [Patch(names[1], value=cache[names[1]], heads=[h],
                                                                      positions=[p])]) for p in pos]
                          for h in range(tiny.spec.n_heads)]])
    torch.testing.assert_close(r3.values, ref3, atol=2e-4, rtol=1e-4)


def test_self_patch_changes_nothing_and_final_layer_restores(tiny):
    setup = prepare(tiny, PAIRS)
    for site in ("resid_pre", "z"):
        same = activation_patching(tiny, PAIRS, site, direction="noise", source="clean", normalise=False, setup=setup)
        torch.testing.assert_close(same.values, torch.full_like(same.values, setup.clean_value), atol=1e-4, rtol=0)
    last = f"blocks.{tiny.spec.n_layers - 1}.resid_pre"
    cache = tiny.run(setup.clean, cache=[last]).cache
    restored = _metric(tiny, setup, setup.corrupt, [Patch(last, value=cache[last])])
    assert restored == pytest.approx(setup.clean_value, abs=1e-5)
    assert abs(setup.clean_value - setup.corrupt_value) > 1e-3


def test_zero_and_mean_sources(tiny_llama):
    m = tiny_llama
    setup = prepare(m, PAIRS)
    z = activation_patching(m, PAIRS, "mlp_out", direction="noise", source="zeros", normalise=False, setup=setup,
                            positions=[5, 12])
    ref = [[_metric(m, setup, setup.clean, [Ablate(f"blocks.{l}.mlp_out", mode="zero", positions=[p])])
            for p in (5, 12)] for l in range(3)]
    torch.testing.assert_close(z.values, torch.tensor(ref), atol=2e-4, rtol=1e-4)
    names = [f"blocks.{l}.attn_out" for l in range(3)]
    both = m.run(CLEAN + CORRUPT, cache=names).cache
    mean = activation_patching(m, PAIRS, "attn_out", direction="noise", source="mean", normalise=False, setup=setup,
                               positions=[12])
    ref = [[_metric(m, setup, setup.clean, [Patch(nm, value=both[nm].mean(0, keepdim=True), positions=[12])])]
           for nm in names]
    torch.testing.assert_close(mean.values, torch.tensor(ref), atol=2e-4, rtol=1e-4)


def test_metrics_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 7, generator=g)
    t, f = torch.tensor([1, 4]), torch.tensor([2, 0])
    ld = metrics.logit_diff(logits, t, f)
    assert ld.shape == (3, 2)
    assert float(ld[2, 1]) == pytest.approx(float(logits[2, 1, 4] - logits[2, 1, 0]))
    p = metrics.probability(logits, t)
    assert float(p[0, 0]) == pytest.approx(float(torch.softmax(logits[0, 0], -1)[1]))
    clean = logits[0]
    kl = metrics.kl_to_clean(logits, clean)
    assert torch.allclose(kl[0], torch.zeros(2), atol=1e-6) and bool((kl[1:] > 0).all())
    pc, pp = torch.softmax(clean[1], -1), torch.softmax(logits[2, 1], -1)
    assert float(kl[2, 1]) == pytest.approx(float((pc * (pc.log() - pp.log())).sum()), rel=1e-5)
    assert float(metrics.normalise(torch.tensor(2.0), 4.0, 0.0, "denoise")) == pytest.approx(0.5)
    assert float(metrics.normalise(torch.tensor(0.0), 4.0, 0.0, "noise")) == pytest.approx(-1.0)
    m = metrics.Metric("logit_diff", t, f)
    assert torch.allclose(m(logits), ld.mean(-1))
    with pytest.raises(InputError, match="foil"):
        metrics.Metric("logit_diff", t)
    with pytest.raises(InputError, match="same metric value"):
        metrics.normalise(torch.tensor(1.0), 2.0, 2.0)


def test_bad_input(tiny_llama):
    m = tiny_llama
    bad = PromptPairs(["when Mary and John went to the store"], ["when Mary and John went to store"], ["Mary"],
                      ["John"])
    with pytest.raises(InputError, match="first differ at token 6"):
        activation_patching(m, bad)
    with pytest.raises(SiteError, match="not supported"):
        activation_patching(m, PAIRS, "attn_in")
    with pytest.raises(InputError, match="direction"):
        activation_patching(m, PAIRS, direction="sideways")
    with pytest.raises(InputError, match="source"):
        activation_patching(m, PAIRS, source="noise")
    with pytest.raises(InputError, match="no head axis"):
        activation_patching(m, PAIRS, "resid_pre", by_position=False)


def test_parallel_model_has_no_resid_mid():
    from conftest import make_tiny

    with pytest.raises(SiteError, match="resid_mid"):
        activation_patching(make_tiny("neox"), PAIRS, "resid_mid")


def _manual_path_patch(m, setup, sender, receiver, which):
    L = m.spec.n_layers
    zn = [f"blocks.{l}.attn.z" for l in range(L)]
    c = m.run(setup.clean, cache=zn).cache
    r = m.run(setup.corrupt, cache=zn).cache
    ivs = []
    for l in range(L):
        z = c[zn[l]].clone()
        if l == sender[0]:
            z[:, :, sender[1]] = r[zn[l]][:, :, sender[1]]
        ivs.append(Patch(zn[l], value=z))
    rn = f"blocks.{receiver[0]}.attn.{which}"
    rec = m.run(setup.clean, interventions=ivs, cache=[rn]).cache[rn]
    return _metric(m, setup, setup.clean, [Patch(rn, value=rec, heads=[receiver[1]])])


def test_path_patching_matches_manual_steps(tiny):
    setup = prepare(tiny, PAIRS)
    senders = [(0, 1), (1, 2), (2, 0)]
    res = path_patching(tiny, PAIRS, [(2, 3)], senders=senders, receiver_input="k", normalise=False)
    ref = torch.tensor([_manual_path_patch(tiny, setup, s, (2, 3), "k") for s in senders])
    torch.testing.assert_close(res.values, ref, atol=2e-4, rtol=1e-4)
    # a sender in the receiver's own layer has no path to it
    assert float(res.values[2]) == pytest.approx(setup.clean_value, abs=1e-4)
    assert res.axes[0].labels == ("L0.H1", "L1.H2", "L2.H0")


def test_path_patching_to_logits_in_last_layer(tiny_llama):
    m = tiny_llama
    setup = prepare(m, PAIRS)
    senders = [(2, h) for h in range(4)]
    # nothing but the MLP lies after a last-layer head: with MLPs free this is plain noising of the head
    direct = path_patching(m, PAIRS, "logits", senders=senders)
    noised = activation_patching(m, PAIRS, "z", direction="noise", layers=[2], setup=setup)
    torch.testing.assert_close(direct.values, noised.values[0], atol=1e-3, rtol=1e-3)
    # with MLPs frozen, the last MLP keeps its clean output
    frozen = path_patching(m, PAIRS, "logits", senders=senders, freeze_mlps=True, normalise=False)
    c = m.run(setup.clean, cache=["blocks.2.attn.z", "blocks.2.mlp_out"]).cache
    r = m.run(setup.corrupt, cache=["blocks.2.attn.z"]).cache
    ref = [_metric(m, setup, setup.clean, [Patch("blocks.2.attn.z", value=r["blocks.2.attn.z"], heads=[h]),
                                          Patch("blocks.2.mlp_out", value=c["blocks.2.mlp_out"])]) for h in range(4)]
    torch.testing.assert_close(frozen.values, torch.tensor(ref), atol=2e-4, rtol=1e-4)
    with pytest.raises(InputError, match="not a component"):
        path_patching(m, PAIRS, [(5, 0)])


def test_cli_patch_writes_json(tiny_llama, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmscope.cli import common
    from lmscope.cli.main import app

    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, ["patch", "--clean", CLEAN[0], "--corrupt", CORRUPT[0], "--target", "Mary",
                                   "--foil", "John", "--site", "z", "--noise", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [a["name"] for a in data["axes"]] == ["layer", "head"]
    assert len(data["values"]) == 3 and len(data["values"][0]) == 4
    res = CliRunner().invoke(app, ["patch", "--clean", CLEAN[0], "--corrupt", "when Mary went", "--target", "Mary",
                                   "--foil", "John"])
    assert res.exit_code == 2 and "differ" in res.output
