"""Input attribution on tiny random models: every method against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import logit_references, make_tiny
from lmscope import Ablate
from lmscope.attribution import (ConvergenceWarning, alti, alti_logit, attention_norm, attention_rollout, attribute,
                                 attribute_generation, component_lens, input_x_gradient, integrated_gradients,
                                 occlusion, quadrature, raw_attention, rollout, saliency, value_zeroing)
from lmscope.attribution.gradient import integrate_path
from lmscope.errors import InputError, UnsupportedArchitectureError
from lmscope.models.parts import get_module

PROMPT = "when Mary and John went to the store John gave a drink to"
SHORT = "when Mary and John went to the store"


def hand_gradient(model, prompt, target, foil=None):
    """∂(logit target − logit foil)/∂(token embedding) through HF's own ``inputs_embeds`` path."""
    ids = model.encode(prompt).input_ids
    with torch.no_grad():
        emb = get_module(model.hf, model.adapter.embedding.tokens)(ids)
    emb = emb.detach().clone().requires_grad_(True)
    logits = model.hf(inputs_embeds=emb, use_cache=False).logits[0, -1]
    t = model.token_id(target)
    f = logits[t] - (logits[model.token_id(foil)] if foil else 0.0)
    (g,) = torch.autograd.grad(f, emb)
    return emb.detach()[0], g[0], float(f.detach())


def test_saliency_and_input_x_gradient_match_autograd(tiny):
    emb, g, f = hand_gradient(tiny, PROMPT, "Mary", "John")
    sal = saliency(tiny, PROMPT, "Mary", "John")
    assert torch.allclose(sal.extras["gradient"], g, atol=1e-5, rtol=1e-4)
    assert torch.allclose(sal.values, g.norm(dim=-1), atol=1e-5, rtol=1e-4)
    assert sal.meta["f"] == pytest.approx(f, abs=1e-4)
    ixg = input_x_gradient(tiny, PROMPT, "Mary", "John")
    assert torch.allclose(ixg.values, (emb * g).sum(dim=-1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(ixg.extras["norm"], (emb * g).norm(dim=-1), atol=1e-5, rtol=1e-4)
    assert ixg.axes[0].labels == tuple(tiny.encode(PROMPT).str_tokens[0])


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                    "riemann_trapezoid"])
def test_integrated_gradients_exact_on_linear_function(method):
    torch.manual_seed(0)
    w, x, x0 = torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7)

    def linear(points):
        return (points * w).sum(dim=(1, 2)), w.expand_as(points).clone()

    ig, fx, f0, delta, _ = integrate_path(linear, x, x0, 3, method)
    assert torch.allclose(ig, (x - x0) * w, atol=1e-6)
    assert abs(delta) < 1e-5 and fx - f0 == pytest.approx(float(((x - x0) * w).sum()), abs=1e-5)


def test_gauss_legendre_is_exact_for_quadratic_and_weights_sum_to_one():
    torch.manual_seed(0)
    a, x, x0 = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)

    def quad(points):  # f = Σ a e², ∇f = 2 a e: linear along the path, so 1 Gauss-Legendre node is exact
        return (a * points ** 2).sum(dim=(1, 2)), 2 * a * points

    ig, *_ = integrate_path(quad, x, x0, 1)
    assert torch.allclose(ig, a * (x ** 2 - x0 ** 2), atol=1e-5)
    for m in ("gausslegendre", "riemann_middle", "riemann_trapezoid"):
        nodes, weights = quadrature(7, m)
        assert float(weights.sum()) == pytest.approx(1.0) and 0 <= nodes.min() and nodes.max() <= 1


def test_integrated_gradients_complete_and_batched(tiny_llama):
    r = integrated_gradients(tiny_llama, PROMPT, "Mary", "John", steps=32, internal_batch_size=5)
    r2 = integrated_gradients(tiny_llama, PROMPT, "Mary", "John", steps=32, internal_batch_size=64)
    assert torch.allclose(r.values, r2.values, atol=1e-5)
    assert r.meta["relative_delta"] < 0.01
    total = float(r.extras["granular"].double().sum())
    assert total - (r.meta["f_input"] - r.meta["f_baseline"]) == pytest.approx(r.meta["delta"], abs=1e-5)
    _, _, f = hand_gradient(tiny_llama, PROMPT, "Mary", "John")
    assert r.meta["f_input"] == pytest.approx(f, abs=1e-4)


def test_integrated_gradients_baselines(tiny):
    batch = tiny.encode(PROMPT)
    for baseline in ("zero", "pad", "scaled", "the"):
        r = integrated_gradients(tiny, PROMPT, "Mary", metric="probability", steps=16, baseline=baseline,
                                 warn_above=math.inf)
        assert r.values.shape == (batch.input_ids.shape[1],) and torch.isfinite(r.values).all()
    # the baseline token replaces every position: f(baseline) is the model's own value on that input
    r = integrated_gradients(tiny, PROMPT, "Mary", steps=4, baseline="the", warn_above=math.inf)
    ids = torch.full_like(batch.input_ids, tiny.token_id("the"))
    own = tiny.run(ids, logits="last").logits[0, tiny.token_id("Mary")]
    assert r.meta["f_baseline"] == pytest.approx(float(own), abs=1e-4)


def test_integrated_gradients_warns_and_refines(tiny_llama):
    with pytest.warns(ConvergenceWarning, match="relative completeness error"):
        integrated_gradients(tiny_llama, PROMPT, "Mary", "John", steps=1, method="riemann_left", baseline="zero")
    # the zero embedding does not converge on this RMSNorm model (measured: 1.86 at 512 steps): warned
    r = integrated_gradients(tiny_llama, PROMPT, "Mary", "John", steps=1, tolerance=1e-4)
    assert r.meta["relative_delta"] <= 1e-4 and r.meta["steps"] > 1
    assert [h["steps"] for h in r.meta["refinement"]] == [2 ** i for i in range(len(r.meta["refinement"]))]
    assert all(h["relative_delta"] > 1e-4 for h in r.meta["refinement"][:-1])


@pytest.mark.parametrize("window", [1, 2])
def test_occlusion_equals_separate_forwards(tiny, window):
    batch = tiny.encode(SHORT)
    ids, t = batch.input_ids, batch.input_ids.shape[1]
    unk = tiny.tokenizer.unk_token_id
    r = occlusion(tiny, SHORT, "Mary", "John", window=window, baseline="unk")

    def f(input_ids):
        lg = tiny.run(input_ids, logits="last").logits[0]
        return float(lg[tiny.token_id("Mary")] - lg[tiny.token_id("John")])

    clean = f(ids)
    for s in range(t - window + 1):
        occluded = ids.clone()
        occluded[0, s:s + window] = unk
        assert float(r.extras["windows"][s]) == pytest.approx(clean - f(occluded), abs=1e-4)
    if window == 1:
        assert torch.allclose(r.values, r.extras["windows"])


def test_rollout_order_identity_and_rows(tiny):
    a1 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    a2 = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0.1, 0.1, 0.8]])
    assert torch.allclose(rollout(torch.stack([a1, a2])), a2 @ a1)
    assert torch.allclose(rollout(torch.eye(3).expand(4, 3, 3)), torch.eye(3))
    r = attention_rollout(tiny, PROMPT)
    raw = raw_attention(tiny, PROMPT)
    assert raw.values.shape[1] == tiny.spec.n_heads
    assert torch.allclose(raw.values.sum(dim=-1), torch.ones(raw.values.shape[:-1]), atol=1e-5)
    expected = torch.eye(r.values.shape[0])
    for layer in range(tiny.spec.n_layers):
        a = 0.5 * raw.values[layer].mean(dim=0) + 0.5 * torch.eye(r.values.shape[0])
        expected = (a / a.sum(dim=-1, keepdim=True)) @ expected
    assert torch.allclose(r.values, expected, atol=1e-5)
    assert (r.values >= 0).all() and torch.allclose(r.values.sum(dim=-1), torch.ones(len(r.values)), atol=1e-5)
    assert torch.allclose(r.values, torch.tril(r.values))


def _direct_terms(model, prompt, layer):
    """Unvectorised per-head transformed vectors from the weights: α^h_ij (LN1(x_j) W_V^h + b_V^h) W_O^h."""
    run = model.run(prompt, cache=[f"blocks.{layer}.resid_pre", f"blocks.{layer}.resid_mid",
                                   f"blocks.{layer}.attn.pattern"], logits="none")
    x = run[f"blocks.{layer}.resid_pre"][0]
    y = run[f"blocks.{layer}.resid_mid"][0]
    a = run[f"blocks.{layer}.attn.pattern"][0]
    ln1 = model.block(layer).input_layernorm
    w_v, b_v, w_o = model.W_V(layer).detach(), model.b_V(layer), model.W_O(layer).detach()
    t, heads = x.shape[0], model.spec.n_heads
    terms = [[torch.zeros(model.spec.d_model) for _ in range(t)] for _ in range(t)]
    per_head = torch.zeros(heads, t, t)
    with torch.no_grad():
        for j in range(t):
            xn = ln1(x[j])
            for h in range(heads):
                v = xn @ w_v[h] + (b_v[h] if b_v is not None else 0)
                f = v @ w_o[h]
                for i in range(j, t):
                    terms[i][j] = terms[i][j] + a[h, i, j] * f
                    per_head[h, i, j] = (a[h, i, j] * f).norm()
    return x, y, terms, per_head


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_alti_and_attention_norm_match_direct_computation(family):
    model = make_tiny(family)  # GQA (4 query heads, 2 KV heads); qwen2 has value biases
    r = alti(model, PROMPT)
    an = attention_norm(model, PROMPT)
    assert r.meta["max_reconstruction_error"] < 1e-4
    for layer in range(model.spec.n_layers):
        x, y, terms, per_head = _direct_terms(model, PROMPT, layer)
        t = x.shape[0]
        c = torch.zeros(t, t)
        for i in range(t):
            for j in range(i + 1):
                tij = terms[i][j] + (x[i] if i == j else 0)
                c[i, j] = max(0.0, float(y[i].abs().sum() - (y[i] - tij).abs().sum()))
            c[i] /= c[i].sum()
            norms = torch.stack([terms[i][j].norm() for j in range(t)])
            assert torch.allclose(an.values[layer, i], norms, atol=1e-5)
        assert torch.allclose(r.extras["per_layer"][layer], c, atol=1e-5)
        assert torch.allclose(an.extras["per_head"][layer], per_head, atol=1e-5)
    assert (r.values >= 0).all() and torch.allclose(r.values.sum(dim=-1), torch.ones(len(r.values)), atol=1e-5)


def test_alti_rows_and_alti_logit_adds_up(tiny):
    r = alti(tiny, PROMPT)
    assert r.meta["max_reconstruction_error"] < 1e-4
    assert (r.extras["per_layer"] >= 0).all()
    assert torch.allclose(r.extras["per_layer"].sum(dim=-1), torch.ones(r.extras["per_layer"].shape[:2]), atol=1e-5)
    assert torch.allclose(r.values.sum(dim=-1), torch.ones(len(r.values)), atol=1e-5)
    al = alti_logit(tiny, PROMPT, "Mary", "John")
    m = al.meta
    metric, decomposed, own = logit_references(tiny, PROMPT, "Mary", "John")
    assert m["metric"] == metric
    assert m["model_value"] == pytest.approx(own, abs=1e-5) and m["metric_value"] == pytest.approx(decomposed, abs=1e-5)
    total = float(al.values.sum()) + m["embed_term"] + m["mlp_term"] + m["bias_term"] + m["constant"]
    assert total == pytest.approx(decomposed, abs=1e-3)
    assert torch.allclose(al.values, al.extras["per_layer"].sum(dim=0))


def test_value_zeroing_matches_explicit_recomputation(tiny):
    r = value_zeroing(tiny, SHORT, chunk_size=3)
    t = r.values.shape[0]
    for layer in range(tiny.spec.n_layers):
        site, out = f"blocks.{layer}.attn.v", f"blocks.{layer}.resid_post"
        ref = tiny.run(SHORT, cache=[out], logits="none")[out][0]
        for j in range(t):
            z = tiny.run(SHORT, cache=[out], interventions=[Ablate(site, positions=[j])], logits="none")[out][0]
            dist = 1 - torch.nn.functional.cosine_similarity(ref, z, dim=-1)
            expected = torch.where(torch.arange(t) >= j, dist.clamp(min=0), torch.zeros(t))
            assert torch.allclose(r.extras["raw"][layer, :, j], expected, atol=1e-5)
    assert torch.allclose(r.extras["per_layer"].sum(dim=-1), torch.ones(tiny.spec.n_layers, t), atol=1e-5)
    assert torch.allclose(r.values.sum(dim=-1), torch.ones(t), atol=1e-5)


def test_value_zeroing_refuses_attention_it_cannot_rewrite():
    model = make_tiny("llama")
    model.hf.set_attn_implementation("eager")
    with pytest.raises(UnsupportedArchitectureError, match="alti"):
        value_zeroing(model, PROMPT)


def test_generation_matrix(tiny_llama):
    r = attribute_generation(tiny_llama, PROMPT, "saliency", max_new_tokens=3)
    p = tiny_llama.encode(PROMPT).input_ids.shape[1]
    assert r.values.shape == (p + 2, 3) and r.meta["prompt_length"] == p
    ids = tiny_llama.hf.generate(input_ids=tiny_llama.encode(PROMPT).input_ids, max_new_tokens=3, do_sample=False,
                                 pad_token_id=1)[0]
    for s in range(3):
        assert torch.isnan(r.values[p + s:, s]).all()
        single = saliency(tiny_llama, ids[None, :p + s], int(ids[p + s]), metric="probability")
        assert torch.allclose(r.values[:p + s, s], single.values, atol=1e-6)
        probs = tiny_llama.run(ids[None, :p + s], logits="last").logits[0].softmax(-1)
        assert float(r.extras["step_probability"][s]) == pytest.approx(float(probs[ids[p + s]]), abs=1e-5)
    rollout_gen = attribute(tiny_llama, PROMPT, method="rollout", generate=3)
    full = attention_rollout(tiny_llama, ids[None, :-1])
    assert torch.allclose(rollout_gen.values[:p + 2, 2], full.values[p + 1, :p + 2], atol=1e-6)


def test_component_lens_adds_up_to_logits(tiny):
    r = component_lens(tiny, PROMPT, k=3, kinds=("embed", "head", "attn_bias", "mlp"), target="Mary", foil="John")
    metric, decomposed, own = logit_references(tiny, PROMPT, "Mary", "John")
    assert r.meta["metric"] == metric
    assert r.meta["model_value"] == pytest.approx(own, abs=1e-5)
    assert r.meta["metric_value"] == pytest.approx(decomposed, abs=1e-5)
    const = 0.0
    beta = getattr(tiny.final_norm, "bias", None)
    u = (tiny.W_U[:, tiny.token_id("Mary")] - tiny.W_U[:, tiny.token_id("John")]).detach()
    if beta is not None:
        const += float(beta.detach() @ u)
    if tiny.b_U is not None:
        const += float((tiny.b_U[tiny.token_id("Mary")] - tiny.b_U[tiny.token_id("John")]).detach())
    assert float(r.extras["target"].sum()) + const == pytest.approx(decomposed, abs=1e-3)
    assert (r.values[:, :-1] >= r.values[:, 1:]).all() and len(r.meta["top_tokens"][0]) == 3
    assert (r.extras["bottom"][:, 0] <= r.values[:, -1]).all()


def test_bad_input(tiny_llama):
    with pytest.raises(InputError, match="foil"):
        saliency(tiny_llama, PROMPT, "Mary", "Mary")
    with pytest.raises(InputError, match="at least 1 step"):
        integrated_gradients(tiny_llama, PROMPT, "Mary", steps=0)
    with pytest.raises(InputError, match="context limit"):
        attribute_generation(tiny_llama, PROMPT, "saliency", max_new_tokens=500)
    with pytest.raises(InputError, match="unknown"):
        attribute(tiny_llama, PROMPT, "Mary", method="lime")
    with pytest.raises(InputError, match="foil has no meaning"):
        attribute(tiny_llama, PROMPT, "Mary", "John", method="alti")
    with pytest.raises(InputError, match="window"):
        occlusion(tiny_llama, PROMPT, "Mary", window=0)
    with pytest.raises(InputError, match="metric='logit'"):
        from lmscope.attribution.targets import logit_vector, resolve_target

        logit_vector(tiny_llama, resolve_target(tiny_llama, "Mary", metric="probability"), torch.tensor(1.0))
