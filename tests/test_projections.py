"""Weight projections against direct matrix computations and against the model's own q/k/v."""

from __future__ import annotations

import pytest
import torch

from lmscope import Patch
from lmscope.decoding.projections import (embedding_matches, neuron_tokens, normed_embeddings, ov_circuit,
                                          ov_outputs, qk_circuit, qk_scores, unembed_direct, vector_tokens)
from lmscope.errors import InputError, TokenError

TOKENS = ["cat", "Mary", "the", "seven"]


def test_ov_circuit_equals_matrix_product(tiny_llama):
    m = tiny_llama
    layer, head = 1, 2
    ids = torch.tensor([m.token_id(t) for t in TOKENS])
    with torch.no_grad():
        # independent: RMS-normalise the embeddings by hand, then W_E · W_V · W_O · diag(g_final) · W_U
        norm = m.block(layer).input_layernorm
        e = m.W_E[ids]
        x = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
        W_OV = m.W_V(layer)[head] @ m.W_O(layer)[head]
        full = x @ W_OV @ torch.diag(m.final_norm.weight) @ m.W_U
    r = ov_circuit(m, layer, head, TOKENS, k=5)
    assert r.values.shape == (4, 5)
    top = full.topk(5, dim=-1)
    assert torch.allclose(r.values, top.values, atol=1e-5)
    assert r.meta["top_ids"] == top.indices.tolist()
    assert torch.allclose(r.extras["bottom"], full.topk(5, dim=-1, largest=False).values, atol=1e-5)


def test_ov_and_qk_match_the_models_own_values_queries_keys(tiny):
    """Embeddings patched in at layer l and position 0: the model's own v (and, at relative distance 0,
    q·k) must equal the weight-based circuits."""
    m = tiny
    layer, head = 1, 1
    ids = torch.tensor([m.token_id(t) for t in TOKENS])
    emb = m.W_E[ids].detach()[:, None]  # one token per row, position 0 (RoPE is the identity there)
    site = f"blocks.{layer}"
    run = m.run(ids[:, None], cache=[f"{site}.attn.v", f"{site}.attn.q", f"{site}.attn.k"],
                interventions=[Patch(f"{site}.resid_pre", value=emb)])
    v = run[f"{site}.attn.v"][:, 0, head]
    out = v @ m.W_O(layer)[head]
    if m.adapter.block.post_norms:
        out = m.block(layer).post_attention_layernorm(out)
    assert torch.allclose(ov_outputs(m, layer, head, ids.tolist()), out, atol=1e-5)
    if m.hf.config.model_type == "gemma3_text":
        return  # Gemma 3 normalises q and k per head; the QK projection documents that it does not model this
    q, k = run[f"{site}.attn.q"][:, 0, head], run[f"{site}.attn.k"][:, 0, head]
    assert torch.allclose(qk_scores(m, layer, head, ids.tolist(), ids.tolist()), q @ k.T / m.spec.d_head ** 0.5,
                          atol=1e-4)


def test_qk_circuit_tops_over_vocabulary(tiny_llama):
    m = tiny_llama
    r = qk_circuit(m, 0, 3, TOKENS, k=4)
    full = qk_scores(m, 0, 3, [m.token_id(t) for t in TOKENS])
    assert full.shape == (4, m.spec.d_vocab)
    assert r.meta["top_ids"] == full.topk(4, dim=-1).indices.tolist()


def test_neuron_and_vector_tokens(tiny):
    m = tiny
    r = neuron_tokens(m, 2, 5, k=3)
    w = m.W_out(2)[5]
    if m.adapter.block.post_norms:
        w = m.block(2).post_feedforward_layernorm(w)
    g = m.final_norm.weight.float() + (1.0 if m.adapter.block.norms.kind == "rms_offset" else 0.0)
    if m.adapter.block.norms.kind == "layer":
        w = w - w.mean()
    logits = (w * g) @ m.W_U
    assert torch.allclose(r.values[0], logits.topk(3).values, atol=1e-5)
    assert torch.allclose(r.values[1], logits.topk(3, largest=False).values, atol=1e-5)
    vec = torch.randn(m.spec.d_model)
    assert torch.allclose(vector_tokens(m, vec, k=2).values[0], unembed_direct(m, vec).topk(2).values)
    tok = m.token_id("cat")
    assert embedding_matches(m, m.W_E[tok].detach(), k=1).meta["ids"][0] == [tok]


def test_normed_embeddings_are_the_blocks_input():
    """Values, not just the shape: block 0's own attention norm, hooked in a real forward, outputs the normed
    embedding of each token; at every layer they equal a hand-computed RMSNorm with that block's gain (the gains
    are made to differ per layer, so a wrong layer fails)."""
    from conftest import make_tiny

    m = make_tiny("llama", seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in range(m.spec.n_layers):
            m.block(layer).input_layernorm.weight.copy_(1 + torch.randn(m.spec.d_model, generator=g))
    ids = torch.tensor([m.token_id(t) for t in TOKENS])
    seen = {}
    norm0 = m.block(0).input_layernorm
    handle = norm0.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out.detach()))
    try:
        with torch.no_grad():
            m.hf(ids[None])
    finally:
        handle.remove()
    torch.testing.assert_close(normed_embeddings(m, 0, ids), seen["out"][0], rtol=1e-5, atol=1e-6)
    full = normed_embeddings(m, 2)
    assert full.shape == (m.spec.d_vocab, m.spec.d_model)
    with torch.no_grad():
        e = m.W_E[ids]
        for layer in range(m.spec.n_layers):
            norm = m.block(layer).input_layernorm
            ref = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
            torch.testing.assert_close(normed_embeddings(m, layer, ids), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full[ids], normed_embeddings(m, 2, ids))
        assert not torch.allclose(normed_embeddings(m, 1, ids), normed_embeddings(m, 2, ids))


def test_bad_input(tiny_llama):
    m = tiny_llama
    with pytest.raises(InputError, match="Head 4 is out of range"):
        ov_circuit(m, 0, 4, TOKENS)
    with pytest.raises(InputError, match="Layer 3 is out of range"):
        qk_circuit(m, 3, 0, TOKENS)
    with pytest.raises(InputError, match="Neuron 48 is out of range"):
        neuron_tokens(m, 0, 48)
    with pytest.raises(InputError, match="D = 32"):
        vector_tokens(m, torch.randn(31))
    with pytest.raises(TokenError):
        ov_circuit(m, 0, 0, ["zebra crossing"])


def test_cli_bad_input_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from lmscope.cli.main import app

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood film,1\nbad film,\n")
    res = CliRunner().invoke(app, ["probe", "--dataset", str(bad)])
    assert res.exit_code == 2 and "no 'label' label" in res.output
    single = tmp_path / "single.jsonl"
    single.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    res = CliRunner().invoke(app, ["probe", "--dataset", str(single)])
    assert res.exit_code == 2 and "same label" in res.output
    res = CliRunner().invoke(app, ["project", "--head", "1.2", "--neuron", "3.4"])
    assert res.exit_code == 2 and "exactly one" in res.output


@pytest.mark.real
def test_cli_project(smollm, tmp_path):
    import json

    from typer.testing import CliRunner

    from lmscope.cli.main import app

    out = tmp_path / "ov.json"
    res = CliRunner().invoke(app, ["project", "--head", "5.3", "--tokens", " Paris, cat", "--k", "4",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["method"] == "ov_circuit" and [a["labels"] for a in doc["axes"]][0] == [" Paris", " cat"]
    assert json.loads((tmp_path / "ov_qk.json").read_text())["method"] == "qk_circuit"
    direct = ov_circuit(smollm, 5, 3, [" Paris", " cat"], k=4)
    assert torch.allclose(torch.tensor(doc["values"]), direct.values, atol=1e-4)
    res = CliRunner().invoke(app, ["project", "--neuron", "40.1"])
    assert res.exit_code == 2 and "out of range" in res.output
