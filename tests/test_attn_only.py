"""The attention-only model (no MLP): it loads, passes the load checks, matches a forward written
by hand, round-trips through save/load, runs every method that applies (the same reference checks
the other families pass), and gets a clear UnsupportedArchitectureError from methods that need an MLP."""

from __future__ import annotations

import math

import pytest
import test_attribution
import test_dla_lens
import test_models
import test_patching
import test_probes
import test_projections
import test_steering
import test_tracing
import test_tuned_lens
import torch
from conftest import make_tiny, tiny_tokenizer
from test_atp import PAIRS as ATP_PAIRS
from test_atp import SITE, _directional_derivative, _setup

from lmscope.errors import UnsupportedArchitectureError
from lmscope.localization.atp import atp
from lmscope.localization.dla import dla
from lmscope.localization.patching import activation_patching

PROMPT = "when Mary and John went to the store John gave a drink to"


@pytest.fixture(scope="module", params=["attn_only", "attn_only-rms"])
def model(request):
    return make_tiny(request.param)


def test_loads_passes_the_checks_and_has_no_mlp_sites(model):
    assert model.load_check == "checked"
    assert model.parts == {"embedding", "block", "attention", "final_norm", "unembedding"}
    assert "mlp_out" not in model.site_kinds and "mlp.post" not in model.site_kinds
    assert {"attn.z", "attn.pattern", "resid_mid", "attn_out"} <= set(model.site_kinds)
    assert model.spec.d_mlp == 0 and model.spec.n_heads == 4 and model.spec.d_head == 8
    assert model.spec.norm == ("rms" if model.hf.config.norm == "rms" else "layer")


def _reference_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """The attention-only forward written out by hand: RoPE as a complex rotation of (i, i + dh/2) pairs."""
    cfg = hf.config
    b, t = ids.shape
    h_n = cfg.num_attention_heads
    dh = cfg.hidden_size // h_n

    def norm(mod, x):
        if cfg.norm == "layer":
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + cfg.norm_eps)
            return x * mod.weight + mod.bias
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * mod.weight

    freqs = cfg.rope_theta ** (-torch.arange(dh // 2, dtype=torch.float64) * 2 / dh)
    rot = torch.polar(torch.ones(t, dh // 2, dtype=torch.float64), torch.arange(t)[:, None] * freqs)

    def rope(v):  # (b, t, h, dh)
        c = torch.complex(v[..., : dh // 2].double(), v[..., dh // 2:].double()) * rot[None, :, None]
        return torch.cat([c.real, c.imag], dim=-1).float()

    def lin(mod, x):
        return x @ mod.weight.T + (0 if mod.bias is None else mod.bias)

    x = hf.model.embed_tokens.weight[ids]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for block in hf.model.layers:
        a, h = block.self_attn, norm(block.input_layernorm, x)
        q, k, v = (lin(p, h).view(b, t, h_n, dh) for p in (a.q_proj, a.k_proj, a.v_proj))
        scores = torch.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)) / math.sqrt(dh)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
        x = x + lin(a.o_proj, z)
    return norm(hf.model.norm, x) @ hf.lm_head.weight.T


def test_forward_matches_a_hand_written_one(model):
    batch = model.encode(PROMPT)
    with torch.no_grad():
        ref = _reference_logits(model.hf, batch.input_ids)
        torch.testing.assert_close(model.run(batch).logits, ref, atol=1e-4, rtol=1e-4)
        explicit = model.run(batch, cache=["blocks.0.attn.pattern", "blocks.2.attn.pattern"]).logits
    torch.testing.assert_close(explicit, ref, atol=1e-4, rtol=1e-4)


def test_generation_with_the_kv_cache_equals_full_forwards(model):
    new, logps = model.generate(["the cat sat on", "when Mary and John went"], 4)
    batch = model.encode(["the cat sat on", "when Mary and John went"])
    ids = torch.cat([batch.input_ids, new], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(new)], dim=1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float().log_softmax(-1)
    t = batch.input_ids.shape[1]
    torch.testing.assert_close(logps, full[:, t - 1:-1], atol=1e-4, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    import lmscope

    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    m = make_tiny("attn_only")
    m.hf.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded = lmscope.load(str(tmp_path / "m"), progress=False)
    assert type(loaded.hf).__name__ == "AttnOnlyForCausalLM" and loaded.spec == m.spec
    torch.testing.assert_close(loaded.run(PROMPT).logits, m.run(PROMPT).logits, atol=0, rtol=0)


# The reference checks other families pass, run on the attention-only model. Each compares a method
# against an independent computation (separate forwards, autograd, hand-computed sums).
REUSED = [
    (test_models, "test_every_site_fires_with_its_shape", ()),
    (test_models, "test_residual_sites_match_hidden_states", ()),
    (test_models, "test_patterns_match_eager_attention", ()),
    (test_models, "test_logits_site_is_the_models_output", ()),
    (test_models, "test_readout_of_the_final_residual_is_the_models_logits", ()),
    (test_models, "test_attention_scores_reproduce_the_patterns", ()),
    (test_models, "test_decomposition_adds_up", (False,)),
    (test_models, "test_q_k_v_match_weights_for_first_layer", ()),
    (test_models, "test_zero_head_matches_manual_o_proj_edit", ()),
    (test_models, "test_head_out_patch_equals_attn_out_delta", ()),
    (test_models, "test_resid_mid_patch", ()),
    (test_models, "test_knockout_matches_renormalised_pattern", ()),
    (test_models, "test_padded_batches_match_single_prompts", ("left",)),
    (test_models, "test_padded_batches_match_single_prompts", ("right",)),
    (test_dla_lens, "test_dla_sums_to_logit_difference", ("layer",)),
    (test_dla_lens, "test_dla_sums_to_logit_difference", ("head",)),
    (test_dla_lens, "test_logit_lens_last_row_is_the_model", ()),
    (test_tuned_lens, "test_untrained_lens_is_exactly_the_logit_lens", ()),
    (test_patching, "test_position_sweep_cells_equal_unbatched", ("resid_pre", "denoise")),
    (test_patching, "test_position_sweep_cells_equal_unbatched", ("attn_out", "noise")),
    (test_patching, "test_head_sweep_cells_equal_unbatched", ("z",)),
    (test_patching, "test_head_sweep_cells_equal_unbatched", ("pattern",)),
    (test_patching, "test_self_patch_changes_nothing_and_final_layer_restores", ()),
    (test_patching, "test_path_patching_matches_manual_steps", ()),
    (test_tracing, "test_trace_invariants_and_one_cell", ()),
    (test_attribution, "test_saliency_and_input_x_gradient_match_autograd", ()),
    (test_attribution, "test_occlusion_equals_separate_forwards", (1,)),
    (test_attribution, "test_rollout_order_identity_and_rows", ()),
    (test_attribution, "test_alti_rows_and_alti_logit_adds_up", ()),
    (test_attribution, "test_value_zeroing_matches_explicit_recomputation", ()),
    (test_attribution, "test_component_lens_adds_up_to_logits", ()),
    (test_projections, "test_ov_and_qk_match_the_models_own_values_queries_keys", ()),
    (test_steering, "test_cached_steering_equals_recomputation", ("actadd",)),
    (test_steering, "test_directions_against_manual_means", ()),
    (test_probes, "test_collect_matches_single_runs", ()),
]


@pytest.mark.parametrize("module, name, args", REUSED, ids=[f"{m.__name__}.{n}{list(a) or ''}" for m, n, a in REUSED])
def test_reference_checks_of_other_families(model, module, name, args):
    getattr(module, name)(model, *args)


def test_dla_by_layer_has_attention_entries_only(model):
    res = dla(model, PROMPT, "Mary", "John", by="layer")
    n = model.spec.n_layers
    assert res.axes[0].labels == ("embed", *(f"L{l}.attn" for l in range(n)))
    by_head = dla(model, PROMPT, "Mary", "John", by="head")
    assert "mlp" not in by_head.extras
    for layer in range(n):
        want = by_head.values[layer].sum().item() + by_head.extras["attn_bias"][layer].item()
        assert res.values[1 + layer].item() == pytest.approx(want, abs=1e-5)


def test_atp_on_heads_is_the_first_order_taylor_term(model):
    pairs = ATP_PAIRS.subset([0])
    res = atp(model, pairs, nodes=("head", "resid"), direction="noise", normalise=False)
    (base_b, other_b), metric = _setup(model, pairs)
    checks = 0
    for kind, layer, index in [("head", 1, 2), ("head", 0, 3), ("head", 2, 1), ("resid", 1, 4)]:
        site = f"blocks.{layer}.{SITE[kind]}"
        select = torch.zeros(model.run(base_b, cache=[site]).cache[site].shape)
        if kind == "head":
            select[:, :, index] = 1
        else:
            select[:, index] = 1
        by_hand = _directional_derivative(model, base_b, other_b, metric, site, select)
        assert float(res[kind].values[layer, index]) == pytest.approx(by_hand, abs=2e-3, rel=2e-3), (kind, layer)
        checks += abs(by_hand) > 1e-3
    assert checks >= 2


def test_methods_that_need_an_mlp_say_so(model):
    from lmscope.sae.io import check_fits, make_sae

    with pytest.raises(UnsupportedArchitectureError, match=r"DLA by neuron needs mlp.post, which needs the mlp "
                                                           r"part; tiny-attn_only\S* \(attn-only\) has no mlp"):
        dla(model, PROMPT, "Mary", by="neuron")
    sae = make_sae("relu", d_in=8, d_sae=16, site="blocks.1.mlp.post")
    with pytest.raises(UnsupportedArchitectureError, match=r"An SAE on blocks.1.mlp.post needs mlp.post"):
        check_fits(sae, model)
    with pytest.raises(UnsupportedArchitectureError, match="AtP on mlp nodes needs mlp_out"):
        atp(model, ATP_PAIRS.subset([0]))
    with pytest.raises(UnsupportedArchitectureError, match="needs mlp_out, which needs the mlp part"):
        activation_patching(model, test_patching.PAIRS, "mlp_out")
    with pytest.raises(UnsupportedArchitectureError, match="W_out .* needs mlp.post"):
        model.W_out(0)
    # the sites it has still work after a refusal (no hooks left behind)
    assert model.run(PROMPT, cache=["blocks.0.attn_out"])["blocks.0.attn_out"].shape[-1] == model.spec.d_model


def _edge_patched_metric(model, clean, corrupt, metric, u: str, v: str, eps: float = 1.0) -> float:
    """M(clean run with edge u → v carrying clean + eps·(corrupt − clean)), by real forwards and site patches
    only (no edge machinery): the receiver's input is rebuilt by patching its layer's whole residual input in
    a separate run, and only the receiver's own q/k/v is copied from there into the clean run."""
    from lmscope.interventions import Patch

    n = model.spec.n_layers
    ul = None if u == "input" else int(u.split(".")[0][1:])
    site = "embed" if u == "input" else f"blocks.{ul}.attn.head_out"
    rc = model.run(clean, cache=[site] + [f"blocks.{l}.resid_pre" for l in range(n)] + [f"blocks.{n - 1}.resid_post"],
                   logits="none").cache
    z_c, z_r = rc[site], model.run(corrupt, cache=[site], logits="none").cache[site]
    if u != "input":
        h = int(u.split(".")[1][1:])
        z_c, z_r = z_c[:, :, h], z_r[:, :, h]
    d = eps * (z_r - z_c)
    if v == "logits":
        ivs = [Patch(f"blocks.{n - 1}.resid_post", value=rc[f"blocks.{n - 1}.resid_post"] + d)]
    else:
        layer, head, which = int(v.split(".")[0][1:]), int(v.split(".")[1][1:]), v.split(".")[2]
        name, resid = f"blocks.{layer}.attn.{which}", f"blocks.{layer}.resid_pre"
        moved = model.run(clean, cache=[name], interventions=[Patch(resid, value=rc[resid] + d)], logits="none")
        ivs = [Patch(name, value=moved.cache[name], heads=[head])]
    return float(metric(model.run(clean, interventions=ivs, logits="last").logits))


def test_edge_graph_eap_and_acdc_on_the_attention_only_model(model):
    """The edge graph is built from the parts the model has (no MLP nodes); single-edge patching matches real
    forwards with site patches, EAP matches the derivative of those forwards along the edge, ACDC and the
    circuit spec run."""
    from lmscope import specs
    from lmscope.localization.acdc import acdc
    from lmscope.localization.eap import eap
    from lmscope.models.edges import edge_forward, edge_graph, upstream_values

    g = edge_graph(model)
    n, h_n = model.spec.n_layers, model.spec.n_heads
    assert not g.has_mlp and not any(x.startswith("m") for x in g.upstream + g.receivers)
    assert len(g.upstream) == 1 + n * h_n and len(g.receivers) == 3 * h_n * n + 1
    assert g.n_edges == sum(3 * h_n * (1 + l * h_n) for l in range(n)) + 1 + n * h_n
    with pytest.raises(Exception, match="no MLP"):
        g.mlp_index(0)
    (clean, corrupt), metric = _setup(model, ATP_PAIRS)
    up = upstream_values(model, corrupt)
    scores = eap(model, ATP_PAIRS, batch_size=8)
    edges = [("input", "a0.h1.v"), ("a0.h2", "a1.h3.q"), ("a0.h0", "a2.h1.k"), ("a2.h3", "logits")]
    checked = 0
    for u, v in edges:
        ui, ri = g.upstream.index(u), g.receivers.index(v)
        assert g.valid[ui, ri], (u, v)
        patch = torch.zeros_like(g.valid)
        patch[ui, ri] = True
        with torch.no_grad():
            got = float(metric(edge_forward(model, clean, patch=patch, corrupt=up).logits))
            want = _edge_patched_metric(model, clean, corrupt, metric, u, v)
            assert got == pytest.approx(want, abs=1e-4, rel=1e-4), (u, v)
            eps = 1e-2
            deriv = (_edge_patched_metric(model, clean, corrupt, metric, u, v, eps)
                     - _edge_patched_metric(model, clean, corrupt, metric, u, v, -eps)) / (2 * eps)
        assert float(scores.scores[ui, ri]) == pytest.approx(deriv, abs=2e-3, rel=2e-3), (u, v)
        checked += abs(deriv) > 1e-3
    assert checked >= 2
    if model.spec.norm == "rms":
        return  # ACDC (one forward per edge) and the circuit spec: once, on the LayerNorm variant
    circ = acdc(model, ATP_PAIRS, threshold=0.05)
    assert circ.mask.shape == g.valid.shape and circ.meta["n_tests"] == g.n_edges
    res = specs.run(model, "circuit", ATP_PAIRS, specs.get("circuit").config(method="eap-ig", edges=10))
    assert res.meta["faithfulness"] == res.meta["faithfulness"]  # a number, not NaN
