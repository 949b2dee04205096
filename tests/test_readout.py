"""Model's read-out API on tiny random models of every family, against the native modules and
independent computations: unembedding (live and frozen), logit directions, norms by name, attention
scaling, token embeddings, stopped forwards and native generation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, unembedding_output

from lmscope.attribution.generation import generate as generate_for_attribution
from lmscope.errors import InputError, SiteError

PROMPT = "when Mary and John went to the store John gave a drink to"


def _native_norms(model, layer):
    """{name: native module} read off the HF block by the families' own attribute names."""
    block = model.block(layer)
    norms = {f"blocks.{layer}.ln1": getattr(block, "input_layernorm", None) or getattr(block, "ln_1")}
    if model.spec.post_norms:
        norms[f"blocks.{layer}.ln2"] = block.pre_feedforward_layernorm
        norms[f"blocks.{layer}.ln1_post"] = block.post_attention_layernorm
        norms[f"blocks.{layer}.ln2_post"] = block.post_feedforward_layernorm
    elif model.spec.d_mlp:
        norms[f"blocks.{layer}.ln2"] = getattr(block, "post_attention_layernorm", None) or getattr(block, "ln_2")
    base = model.hf.base_model
    norms["ln_final"] = getattr(base, "norm", None) or getattr(base, "ln_f", None) or base.final_layer_norm
    return norms


def _inverse_scale(module, x, layer_norm: bool):
    """1/s of a norm for x (..., D), computed here from the module's epsilon."""
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    eps = float(eps if eps is not None else module.eps)
    x = x.float()
    if layer_norm:
        return 1 / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + eps)
    return 1 / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def test_norms_by_name_live_and_frozen(tiny):
    _check_norms(tiny)


def test_frozen_unembedding_plus_biases_is_the_models_logit(tiny):
    """With the final norm's own scale frozen, the linear read-out plus the bias terms gives the
    unembedding's output z (the pre-soft-cap logits); soft-capping it gives the model's logits."""
    _check_frozen_unembedding(tiny)


@pytest.mark.parametrize("family", ["attn_only", "attn_only-rms"])
def test_read_outs_of_attention_only_models(family):
    model = make_tiny(family)
    _check_norms(model)
    _check_frozen_unembedding(model)


def _check_norms(tiny):
    x = torch.randn(5, tiny.spec.d_model)
    layer_norm = tiny.spec.norm == "layer"
    for name, module in _native_norms(tiny, 1).items():
        with torch.no_grad():
            native = module(x).float()
        torch.testing.assert_close(tiny.norm(name, x), native, atol=1e-5, rtol=1e-5)
        frozen = tiny.norm(name, x, scale=_inverse_scale(module, x, layer_norm))  # the live scale, frozen
        bias = getattr(module, "bias", None)
        torch.testing.assert_close(frozen + (0 if bias is None else bias.detach()), native, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny.norm(name, 2 * x, scale=0.5), tiny.norm(name, x, scale=1.0))  # linear
    torch.testing.assert_close(tiny.norm_weight("ln_final"), _native_norms(tiny, 0)["ln_final"].weight)


def _check_frozen_unembedding(tiny):
    n = tiny.spec.n_layers
    run = tiny.run(PROMPT, cache=[f"blocks.{n - 1}.resid_post", "final.scale"])
    resid, scale = run[f"blocks.{n - 1}.resid_post"][0], run["final.scale"][0]
    z, logits = unembedding_output(tiny, PROMPT)
    final = _native_norms(tiny, 0)["ln_final"]
    bias = torch.zeros(tiny.spec.d_vocab)
    if getattr(final, "bias", None) is not None:
        bias = bias + final.bias.detach() @ tiny.W_U.detach()
    if tiny.b_U is not None:
        bias = bias + tiny.b_U.detach()
    frozen = tiny.unembed(resid, scale=scale)
    torch.testing.assert_close(frozen + bias, z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tiny.softcap(frozen + bias), logits, atol=1e-4, rtol=1e-4)
    assert tiny.unembed(resid, grad=True).requires_grad is False  # no graph without a leaf that needs one
    leaf = resid.clone().requires_grad_(True)
    out = tiny.unembed(leaf, grad=True)
    out[:, 3].sum().backward()
    assert leaf.grad is not None and all(p.grad is None for p in tiny.hf.parameters())
    torch.testing.assert_close(out.detach(), logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="pre-soft-cap"):
        tiny.unembed(resid, scale=scale, softcap=True)


def test_logit_direction_reads_the_logit_difference(tiny):
    n = tiny.spec.n_layers
    run = tiny.run(PROMPT, cache=[f"blocks.{n - 1}.resid_post", "final.scale"])
    z, _ = unembedding_output(tiny, PROMPT)
    t, f = tiny.token_id("Mary"), tiny.token_id("John")
    for pos in (-1, 2):
        d = tiny.logit_direction("Mary", "John", scale=run["final.scale"][0, pos])
        assert (d.target_id, d.foil_id) == (t, f)
        value = float(run[f"blocks.{n - 1}.resid_post"][0, pos].float() @ d.vector) + d.constant
        assert value == pytest.approx(float(z[pos, t] - z[pos, f]), abs=1e-4)
    rows = tiny.logit_direction("Mary", scale=run["final.scale"][0])  # one vector per position
    single = tiny.logit_direction("Mary", scale=run["final.scale"][0, 2])
    assert rows.vector.shape == (run.batch.input_ids.shape[1], tiny.spec.d_model)
    torch.testing.assert_close(rows.vector[2], single.vector)
    torch.testing.assert_close(rows.unembed, tiny.W_U[:, t].detach().float())
    with pytest.raises(InputError, match="foil"):
        tiny.logit_direction("Mary", "Mary")


def test_attention_scaling_and_embeddings(tiny):
    expected = tiny.spec.d_head ** -0.5
    if tiny.spec.family == "gemma3":
        expected = tiny.hf.config.query_pre_attn_scalar ** -0.5
    assert tiny.attn_scaling(0) == pytest.approx(expected)
    ids = torch.tensor([[1, 5, 7], [2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(tiny.embed_tokens(ids), tiny.hf.get_input_embeddings()(ids))


def test_norm_names_are_checked(tiny_llama):
    with pytest.raises(SiteError, match="ln_final"):
        tiny_llama.norm("blocks.0.ln3", torch.zeros(tiny_llama.spec.d_model))
    with pytest.raises(SiteError, match="out of range"):
        tiny_llama.norm("blocks.99.ln1", torch.zeros(tiny_llama.spec.d_model))
    with pytest.raises(SiteError, match="post-norms"):
        tiny_llama.norm("blocks.0.ln1_post", torch.zeros(tiny_llama.spec.d_model))
    attn_only = make_tiny("attn_only")
    with pytest.raises(SiteError, match="an MLP"):
        attn_only.norm("blocks.0.ln2", torch.zeros(attn_only.spec.d_model))


def test_run_until_stops_the_forward(tiny_llama):
    m = tiny_llama
    n = m.spec.n_layers
    sites = ["embed", "blocks.0.resid_pre", "blocks.1.resid_mid", "blocks.1.attn.q", "blocks.0.mlp.post", "logits"]
    calls = []
    handle = m.block(n - 1).register_forward_hook(lambda *a: calls.append(1))
    try:
        for site in sites:
            full = m.run(PROMPT, cache=[site])[site]
            calls.clear()
            torch.testing.assert_close(m.run_until(PROMPT, site), full, atol=0, rtol=0)
            assert (len(calls) == 1) == (site == "logits"), site  # the last block runs only when needed
    finally:
        handle.remove()


def test_sample_is_the_native_generate():
    m = make_tiny("llama")
    enc = m.encode(PROMPT)
    ref = m.hf.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=4, do_sample=False,
                        pad_token_id=1)
    torch.testing.assert_close(m.sample(PROMPT, 4), ref)
    kwargs = dict(do_sample=True, temperature=1.5, top_k=20)
    torch.manual_seed(3)
    ref = m.hf.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=4, pad_token_id=1, **kwargs)
    torch.manual_seed(3)
    torch.testing.assert_close(m.sample(PROMPT, 4, **kwargs), ref)
    torch.manual_seed(3)
    torch.testing.assert_close(generate_for_attribution(m, PROMPT, 4, kwargs), ref[0])


def test_greedy_generation_for_attribution_stops_at_eos_like_the_native_generate():
    m = make_tiny("llama")
    p = m.encode(PROMPT).input_ids.shape[1]
    free = generate_for_attribution(m, PROMPT, 5)
    assert free.shape == (p + 5,)
    m.hf.generation_config.eos_token_id = int(free[p + 1])  # the second new token now ends the generation
    stop = free[: p + 2]
    assert m.eos_token_ids == (int(free[p + 1]),)
    torch.testing.assert_close(generate_for_attribution(m, PROMPT, 5), stop)
    enc = m.encode(PROMPT)
    native = m.hf.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=5, do_sample=False,
                           pad_token_id=1)[0]
    torch.testing.assert_close(native, stop)
