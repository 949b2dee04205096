"""SAEs spliced into models: evaluation against a hand computation, features, attention-output SAE analyses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmscope import Ablate, Patch
from lmscope.errors import InputError, SiteError
from lmscope.sae import check_fits, make_sae, save_sae, load_sae
from lmscope.sae.attention import direct_feature_attribution, head_attribution
from lmscope.sae.evaluation import METRICS, compare, evaluate, evaluate_activations, pareto_png
from lmscope.sae.features import feature_report, features_html, residual_directions


def _ids(n=6, t=10, seed=0):
    return torch.randint(3, 80, (n, t), generator=torch.Generator().manual_seed(seed))


def _ce(logits, ids):
    return F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)).item()


@pytest.mark.parametrize("site", ["blocks.1.resid_post", "blocks.1.attn.z", "blocks.2.mlp_out"])
def test_evaluate_matches_hand_computation(tiny_llama, site):
    m = tiny_llama
    d = 32 if "attn.z" not in site else m.spec.n_heads * m.spec.d_head
    sae = make_sae("topk", d_in=d, d_sae=48, k=4, site=site, seed=3)
    ids = _ids()
    r = evaluate(sae, m, ids, batch_size=4)
    got = dict(zip(METRICS, r.values.tolist()))
    clean = m.run(ids, cache=[site])
    act = clean[site]
    x = act.reshape(*act.shape[:2], -1)
    xh = sae(x)
    xh[:, 0] = x[:, 0]                               # the first position stays clean
    later = list(range(1, ids.shape[1]))
    ce_sae = _ce(m.run(ids, interventions=[Patch(site, xh.reshape(act.shape))]).logits, ids)
    ce_zero = _ce(m.run(ids, interventions=[Ablate(site, "zero", positions=later)]).logits, ids)
    ce_clean = _ce(clean.logits, ids)
    xs, xhs = x[:, 1:].reshape(-1, d), xh[:, 1:].reshape(-1, d)
    assert got["ce_clean"] == pytest.approx(ce_clean, rel=1e-4)
    assert got["ce_sae"] == pytest.approx(ce_sae, rel=1e-4)
    assert got["ce_zero"] == pytest.approx(ce_zero, rel=1e-4)
    assert got["ce_recovered"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-3)
    assert got["l0"] == pytest.approx(4.0)
    fvu = (xs - xhs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    assert got["fve"] == pytest.approx(1 - fvu.item(), rel=1e-4, abs=1e-5)
    assert got["gamma"] == pytest.approx((xhs.pow(2).sum() / (xs * xhs).sum()).item(), rel=1e-4)
    mu = xs.mean(0)
    assert got["gamma_centred"] == pytest.approx(((xhs - mu).pow(2).sum() / ((xs - mu) * (xhs - mu)).sum()).item(),
                                                 rel=1e-4)
    density = (sae.encode(xs) > 0).float().mean(0)
    assert torch.allclose(r.extras["density"], density, atol=1e-6)
    assert got["dead_frac"] == pytest.approx((density == 0).float().mean().item())
    assert r.extras["density_hist"].sum() + r.meta["dead_latents"] == 48


def test_massive_positions_left_out_and_clean(tiny_llama):
    """max_norm_ratio: outsized positions leave the metrics and keep their clean activation in the spliced run."""
    m, site = tiny_llama, "blocks.1.resid_post"
    sae = make_sae("topk", d_in=32, d_sae=48, k=4, site=site, seed=3)
    ids = _ids(n=4)
    x = m.run(ids, cache=[site])[site]
    norms = x[:, 1:].norm(dim=-1)
    ratio = 1.0001 * (norms.max() / norms.median()).item()                  # nothing left out
    same = dict(zip(METRICS, evaluate(sae, m, ids, max_norm_ratio=ratio).values.tolist()))
    assert same == pytest.approx(dict(zip(METRICS, evaluate(sae, m, ids).values.tolist())), rel=1e-6)
    cut = 0.5 * (norms.max() + norms.flatten().sort().values[-2]).item()   # leaves out the largest norm only
    r = evaluate(sae, m, ids, max_norm_ratio=cut / norms.median().item())
    got = dict(zip(METRICS, r.values.tolist()))
    assert got["tokens"] == norms.numel() - 1
    keep = norms <= cut
    xh = sae(x)
    xh[:, 0] = x[:, 0]
    xh[:, 1:][~keep] = x[:, 1:][~keep]
    assert got["ce_sae"] == pytest.approx(_ce(m.run(ids, interventions=[Patch(site, xh)]).logits, ids), rel=1e-4)
    xs, xhs = x[:, 1:][keep], xh[:, 1:][keep]
    assert got["fve"] == pytest.approx(1 - ((xs - xhs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()).item(),
                                       rel=1e-4)
    with pytest.raises(InputError, match="above 1"):
        evaluate(sae, m, ids, max_norm_ratio=0.5)


def test_gamma_detects_shrinkage():
    x = torch.randn(500, 16)
    sae = make_sae("relu", d_in=16, d_sae=16, decoder="unit_norm")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(16) * 0.8)           # a 0.8× shrinking (on the positive part) autoencoder
        sae.W_dec.copy_(torch.eye(16))
    got = dict(zip(METRICS, evaluate_activations(sae, [x]).values.tolist()))
    assert got["gamma"] == pytest.approx(0.8, abs=1e-4)
    # x̂ = μ + 0.8 (x − μ) (latents ±e_i, b_dec = μ): a large mean reproduced exactly by the decoder bias pulls
    # raw γ to ~1, the centred γ still sees the 0.8 shrinkage
    two = make_sae("relu", d_in=16, d_sae=32, decoder="unit_norm")
    mu = torch.full((16,), 30.0)
    with torch.no_grad():
        two.W_enc.copy_(torch.cat([torch.eye(16), -torch.eye(16)], 1) * 0.8)
        two.W_dec.copy_(torch.cat([torch.eye(16), -torch.eye(16)], 0))
        two.b_dec.copy_(mu)
    xm = x + mu
    assert torch.allclose(two(xm), mu + 0.8 * x, atol=1e-4)
    got = dict(zip(METRICS, evaluate_activations(two, [xm]).values.tolist()))
    xc = xm - xm.mean(0)
    dev = 0.8 * xc - 0.2 * (xm.mean(0) - mu)                     # x̂ − E x
    want = dev.pow(2).sum() / (xc * dev).sum()
    assert got["gamma_centred"] == pytest.approx(want.item(), rel=1e-4) and abs(want.item() - 0.8) < 0.01
    assert got["gamma"] > 0.99


def test_compare_and_pareto(tmp_path, tiny_llama):
    ids = _ids(n=4)
    rs = [evaluate(make_sae("topk", d_in=32, d_sae=48, k=k, site="blocks.1.resid_post"), tiny_llama, ids)
          for k in (2, 8)]
    comp = compare(rs, ["k2", "k8"])
    assert comp.shape == (2, len(METRICS)) and torch.equal(comp.values[1], rs[1].values)
    assert pareto_png(comp, tmp_path / "p.png").stat().st_size > 1000


def test_features_report_marks_the_top_token(tmp_path, tiny_llama):
    m = tiny_llama
    sae = make_sae("relu", d_in=32, d_sae=24, site="blocks.2.resid_post", seed=1)
    ids = _ids(n=8, t=12)
    rep = feature_report(sae, m, ids, k=3, n_tokens=5)
    acts = sae.encode(m.run(ids, cache=["blocks.2.resid_post"])["blocks.2.resid_post"])[:, 1:]
    for f in rep.meta["features"]:
        lat = f["latent"]
        best = acts[..., lat].max().item()
        assert f["contexts"][0]["value"] == pytest.approx(best, abs=1e-4)
        c, p = f["contexts"][0]["context"], f["contexts"][0]["position"]
        assert acts[c, p - 1, lat].item() == pytest.approx(best, rel=1e-5)
        assert "«" + m.decode([int(ids[c, p])]) + "»" in f["contexts"][0]["text"]
        assert f["density"] == pytest.approx((acts[..., lat] > 0).float().mean().item())
        logits = sae.W_dec[lat].detach() @ m.W_U.float()
        assert f["promoted"][0][1] == pytest.approx(logits.max().item(), abs=1e-4)
        assert f["suppressed"][0][1] == pytest.approx(logits.min().item(), abs=1e-4)
    assert "<mark>" in features_html(rep, tmp_path / "f.html").read_text()


def test_attention_sae_head_attribution_and_dfa(tiny_llama):
    m = tiny_llama
    H, dh = m.spec.n_heads, m.spec.d_head
    sae = make_sae("relu", d_in=H * dh, d_sae=20, site="blocks.1.attn.z", d_head=dh, decoder="unit_norm", seed=2)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
        sae.scale.fill_(1.7)
    ha = head_attribution(sae, m)
    assert ha.shape == (20, H)
    assert torch.allclose(ha.values.sum(1), torch.ones(20), atol=1e-6)
    W = sae.W_dec.detach().reshape(20, H, dh)
    assert torch.allclose(ha.values[5], W[5].norm(dim=-1) / W[5].norm(dim=-1).sum(), atol=1e-6)
    prompt = "when Mary and John went to the store John gave a drink to"
    z = m.run(prompt, cache=["blocks.1.attn.z"])["blocks.1.attn.z"][0, -1].reshape(-1)
    pre = (z * 1.7 - sae.b_dec) @ sae.W_enc + sae.b_enc
    for lat in (0, 7):
        r = direct_feature_attribution(sae, m, prompt, lat)
        assert r.shape == (H, len(m.to_str_tokens(prompt)))
        assert r.values.sum().item() + r.meta["constant"] == pytest.approx(pre[lat].item(), abs=1e-4)
        assert r.meta["pre_activation"] == pytest.approx(pre[lat].item(), abs=1e-4)
        assert r.values[:, -1].abs().sum() > 0 and (r.values[:, :] != 0).any()
    # a head's own block only: zeroing other heads' encoder weights leaves that head's DFA row unchanged
    assert torch.allclose(torch.tensor(r.meta["by_head"]), r.values.sum(1), atol=1e-6)


def test_dfa_and_directions_need_the_right_site(tiny_llama):
    sae = make_sae("topk", d_in=32, d_sae=8, k=2, site="blocks.1.resid_post")
    with pytest.raises(InputError, match="attn.z"):
        head_attribution(sae, tiny_llama)
    assert residual_directions(sae, tiny_llama).shape == (8, 32)
    z_sae = make_sae("topk", d_in=32, d_sae=8, k=2, site="blocks.1.attn.z")
    assert residual_directions(z_sae, tiny_llama).shape == (8, 32)


def test_wrong_model_or_site(tmp_path, tiny_llama):
    sae = make_sae("topk", d_in=576, d_sae=8, k=2, site="blocks.1.resid_post", model="smollm2-135m")
    with pytest.raises(InputError, match="576-wide"):
        check_fits(sae, tiny_llama)
    with pytest.raises(InputError, match="576-wide"):
        evaluate(sae, tiny_llama, _ids())
    far = make_sae("topk", d_in=32, d_sae=8, k=2, site="blocks.7.resid_post")
    with pytest.raises(SiteError, match="out of range"):
        evaluate(far, tiny_llama, _ids())
    mlp = make_sae("topk", d_in=32, d_sae=8, k=2, site="blocks.1.mlp.post")   # d_mlp is 48
    with pytest.raises(InputError, match="48 wide"):
        check_fits(mlp, tiny_llama)
    back = load_sae(save_sae(make_sae("gated", d_in=48, d_sae=8, site="blocks.1.mlp.post"), tmp_path / "g"))
    assert check_fits(back, tiny_llama).name == "blocks.1.mlp.post"


def test_attention_sae_on_the_default_model(smollm):
    """GQA model (3 KV heads expanded to 9): DFA over heads and sources adds up to the encoder pre-activation."""
    sp = smollm.spec
    sae = make_sae("jumprelu", d_in=sp.n_heads * sp.d_head, d_sae=64, site="blocks.15.attn.z", d_head=sp.d_head,
                   model=smollm.name, seed=4)
    ha = head_attribution(sae, smollm)
    assert ha.shape == (64, 9) and torch.allclose(ha.values.sum(1), torch.ones(64), atol=1e-6)
    prompt = "When Mary and John went to the store, John gave a drink to"
    r = direct_feature_attribution(sae, smollm, prompt, 11, position=-1)
    assert r.shape == (9, len(smollm.to_str_tokens(prompt)))
    assert r.values.sum().item() + r.meta["constant"] == pytest.approx(r.meta["pre_activation"], abs=1e-3)
