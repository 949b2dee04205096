"""The model access layer on tiny random models of every family: sites against the model's own
outputs, scoped hooks, interventions against independent computations, batching and padding."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmscope import Ablate, Add, Knockout, Patch, Scale
from lmscope.errors import InputError, SiteError, TokenError
from lmscope.models import decompose
from lmscope.models.parts import get_module
from lmscope.models.checks import all_sites, expected_shape

PROMPT = "when Mary and John went to the store John gave a drink to"
PROMPTS = ["the cat sat on the mat", "when Mary and John went to the store John gave", "the dog ran"]


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def test_every_site_fires_with_its_shape(tiny):
    run = tiny.run(PROMPT, cache=all_sites(tiny))
    b, t = run.batch.input_ids.shape
    for name in all_sites(tiny):
        kind = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        assert tuple(run[name].shape) == expected_shape(tiny, kind, b, t), name


def test_residual_sites_match_hidden_states(tiny):
    n = tiny.spec.n_layers
    sites = [f"blocks.{l}.resid_pre" for l in range(n)] + [f"blocks.{l}.resid_post" for l in range(n - 1)]
    run = tiny.run(PROMPT, cache=sites)
    with torch.no_grad():
        hs = tiny.forward(run.batch, output_hidden_states=True).hidden_states
    for layer in range(n):
        torch.testing.assert_close(run[f"blocks.{layer}.resid_pre"], hs[layer])
        if layer < n - 1:
            torch.testing.assert_close(run[f"blocks.{layer}.resid_post"], hs[layer + 1])


def test_patterns_match_eager_attention(tiny):
    config = copy.deepcopy(tiny.hf.config)
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    eager.load_state_dict(tiny.hf.state_dict())
    eager.eval()
    run = tiny.run(PROMPT, cache=[f"blocks.{l}.attn.pattern" for l in range(tiny.spec.n_layers)])
    with torch.no_grad():
        out = eager(input_ids=run.batch.input_ids, output_attentions=True)
    for layer, att in enumerate(out.attentions):
        torch.testing.assert_close(run[f"blocks.{layer}.attn.pattern"], att, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run.logits, out.logits, atol=1e-4, rtol=1e-4)


def test_logits_site_is_the_models_output(tiny):
    """The ``logits`` site is what the model returns (after Gemma 2's soft-cap), when read and when patched."""
    run = tiny.run(PROMPT, cache=["logits"])
    with torch.no_grad():
        plain = tiny.forward(run.batch).logits
    torch.testing.assert_close(run["logits"], plain, atol=0, rtol=0)
    value = torch.randn_like(plain)
    patched = tiny.run(PROMPT, interventions=[Patch("logits", value=value)])
    torch.testing.assert_close(patched.logits, value, atol=0, rtol=0)


def test_readout_of_the_final_residual_is_the_models_logits(tiny):
    """``unembed`` (final norm, unembedding, soft-cap) of the final residual gives the model's logits;
    ``softcap=False`` gives the unembedding module's own output."""
    from conftest import unembedding_output

    n = tiny.spec.n_layers
    run = tiny.run(PROMPT, cache=[f"blocks.{n - 1}.resid_post"])
    z, logits = unembedding_output(tiny, PROMPT)
    resid = run[f"blocks.{n - 1}.resid_post"][0]
    torch.testing.assert_close(tiny.unembed(resid), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.unembed(resid, softcap=False), z, atol=1e-5, rtol=1e-5)
    assert tiny.logit_softcap == getattr(tiny.hf.config, "final_logit_softcapping", None)


def test_attention_scores_reproduce_the_patterns(tiny):
    """Scores recomputed from the cached q and k (scaling, Gemma 2's soft-cap) give the model's own patterns."""
    sites = [f"blocks.{l}.attn.{s}" for l in range(tiny.spec.n_layers) for s in ("q", "k", "pattern")]
    run = tiny.run(PROMPT, cache=sites)
    for layer in range(tiny.spec.n_layers):
        pre = f"blocks.{layer}.attn."
        pattern = run[pre + "pattern"]
        scores = tiny.attention_scores(layer, run[pre + "q"], run[pre + "k"])
        rec = scores.masked_fill(pattern <= 0, float("-inf")).softmax(-1)
        torch.testing.assert_close(rec, pattern, atol=1e-6, rtol=1e-5)


def test_heads_and_mlp_writes_add_up_to_block_writes(tiny):
    layer = 1
    run = tiny.run(PROMPT, cache=[f"blocks.{layer}.attn.head_out", f"blocks.{layer}.attn_out",
                                  f"blocks.{layer}.mlp.post", f"blocks.{layer}.mlp_out"])
    total = run[f"blocks.{layer}.attn.head_out"].sum(dim=2)
    b_o = tiny.b_O(layer)
    if b_o is not None:
        total = total + (b_o * run[f"aux.blocks.{layer}.attn_write_factor"] if tiny.spec.post_norms else b_o)
    torch.testing.assert_close(total, run[f"blocks.{layer}.attn_out"], atol=1e-5, rtol=1e-4)
    if not tiny.spec.post_norms:
        neurons = run[f"blocks.{layer}.mlp.post"] @ tiny.W_out(layer)
        if tiny.b_out(layer) is not None:
            neurons = neurons + tiny.b_out(layer)
        torch.testing.assert_close(neurons, run[f"blocks.{layer}.mlp_out"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("neurons", [False, True])
def test_decomposition_adds_up(tiny, neurons):
    dec = decompose(tiny, PROMPTS, neurons=neurons)
    total = dec.vectors.sum(dim=1)
    rel = (total - dec.resid).norm(dim=-1) / dec.resid.norm(dim=-1)
    assert rel.max().item() < 1e-4
    assert dec.vectors.shape[1] == len(dec.labels)


def test_q_k_v_match_weights_for_first_layer(tiny):
    """Values are a linear map of the normed input (no RoPE, no norm): check v against W_V, b_V."""
    run = tiny.run(PROMPT, cache=["blocks.0.attn.v", "blocks.0.resid_pre"])
    block = tiny.block(0)
    ln = block.input_layernorm if hasattr(block, "input_layernorm") else block.ln_1
    with torch.no_grad():
        x = ln(run["blocks.0.resid_pre"])
        v = torch.einsum("btd,hde->bthe", x, tiny.W_V(0))
        if tiny.b_V(0) is not None:
            v = v + tiny.b_V(0)
    torch.testing.assert_close(run["blocks.0.attn.v"], v, atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_on_exit_and_on_exception(tiny_llama):
    before = _hook_count(tiny_llama)
    with tiny_llama.hooks(cache=all_sites(tiny_llama)):
        assert _hook_count(tiny_llama) > before
    assert _hook_count(tiny_llama) == before
    with pytest.raises(ZeroDivisionError):
        with tiny_llama.hooks(cache=["blocks.0.attn.pattern"], interventions=[Scale("blocks.1.mlp_out", 0.5)]):
            1 / 0
    assert _hook_count(tiny_llama) == before
    attn = get_module(tiny_llama.block(0), tiny_llama.adapter.block.mixer.module)
    assert not hasattr(attn, "_lmscope_attn")


def test_patch_with_own_value_changes_nothing(tiny):
    sites = ["blocks.1.resid_pre", "blocks.1.attn.z", "blocks.0.mlp_out", "blocks.2.attn.pattern"]
    clean = tiny.run(PROMPT, cache=sites)
    patched = tiny.run(PROMPT, interventions=[Patch(s, value=clean[s]) for s in sites])
    torch.testing.assert_close(patched.logits, clean.logits, atol=0, rtol=0)


def test_zero_head_matches_manual_o_proj_edit(tiny):
    layer, head = 1, 2
    out = tiny.run(PROMPT, interventions=[Ablate(f"blocks.{layer}.attn.z", heads=[head])])
    o_proj = get_module(tiny.block(layer), tiny.adapter.block.mixer.o_proj)
    dh = tiny.spec.d_head

    def zero_head(module, args):
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_head)
    try:
        with torch.no_grad():
            ref = tiny.forward(out.batch).logits
    finally:
        handle.remove()
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert (out.logits - tiny.run(PROMPT).logits).abs().max() > 1e-4


def test_add_to_embed_equals_shifted_inputs(tiny_llama):
    m = tiny_llama
    vec = torch.randn(m.spec.d_model)
    out = m.run(PROMPT, interventions=[Add("embed", vector=vec, scale=0.5, positions=[2])])
    batch = out.batch
    emb = m.hf.get_input_embeddings()(batch.input_ids).detach()
    emb[:, 2] += 0.5 * vec
    with torch.no_grad():
        ref = m.hf(inputs_embeds=emb, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)


def test_head_out_patch_equals_attn_out_delta(tiny):
    """Zeroing one head's write equals subtracting it from the block's write."""
    layer, head = 1, 1
    clean = tiny.run(PROMPT, cache=[f"blocks.{layer}.attn.head_out", f"blocks.{layer}.attn_out"])
    a = tiny.run(PROMPT, interventions=[Ablate(f"blocks.{layer}.attn.head_out", heads=[head])])
    target = clean[f"blocks.{layer}.attn_out"] - clean[f"blocks.{layer}.attn.head_out"][:, :, head]
    b = tiny.run(PROMPT, interventions=[Patch(f"blocks.{layer}.attn_out", value=target)])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_resid_mid_patch(tiny):
    if tiny.spec.parallel:
        with pytest.raises(SiteError, match="parallel"):
            tiny.run(PROMPT, cache=["blocks.0.resid_mid"])
        return
    clean = tiny.run(PROMPT, cache=["blocks.1.resid_mid", "blocks.1.resid_pre", "blocks.1.attn_out"])
    torch.testing.assert_close(clean["blocks.1.resid_mid"], clean["blocks.1.resid_pre"] + clean["blocks.1.attn_out"])
    other = tiny.run("the dog ran fast and the cat sat on a red mat slow", cache=["blocks.1.resid_mid"])
    patched = tiny.run(PROMPT, interventions=[Patch("blocks.1.resid_mid", value=other["blocks.1.resid_mid"])],
                       cache=["blocks.1.resid_mid"])
    torch.testing.assert_close(patched["blocks.1.resid_mid"], other["blocks.1.resid_mid"], atol=1e-5, rtol=1e-5)


def test_knockout_matches_renormalised_pattern(tiny):
    layer, query = 0, 5
    base = tiny.run(PROMPT, cache=[f"blocks.{layer}.attn.pattern"])
    pat = base[f"blocks.{layer}.attn.pattern"].clone()
    pat[:, :, query, 0:2] = 0
    pat[:, :, query] /= pat[:, :, query].sum(-1, keepdim=True)
    ko = tiny.run(PROMPT, interventions=[Knockout(layer, from_positions=[query], to_positions=[0, 1])])
    ref = tiny.run(PROMPT, interventions=[Patch(f"blocks.{layer}.attn.pattern", value=pat)])
    torch.testing.assert_close(ko.logits, ref.logits, atol=1e-5, rtol=1e-4)


def test_mean_and_resample_ablation(tiny_llama):
    m = tiny_llama
    site = "blocks.1.mlp_out"
    clean = m.run(PROMPTS, cache=[site])
    ref = torch.randn(5, *clean[site].shape[1:])
    mean = m.run(PROMPTS, interventions=[Ablate(site, mode="mean", reference=ref)], cache=[site])
    torch.testing.assert_close(mean[site], ref.mean(0, keepdim=True).expand_as(clean[site]))
    res = m.run(PROMPTS, interventions=[Ablate(site, mode="resample", reference=ref, seed=3)], cache=[site])
    rows = torch.randint(5, (3,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(res[site], ref[rows])


@pytest.mark.parametrize("reuse", [True, False])  # reuse=False: the benches' "lmscope without reuse" figures
def test_run_sets_equals_separate_runs(tiny, reuse):
    clean = tiny.run(PROMPTS, cache=["blocks.1.resid_pre", "blocks.0.attn.z"])
    sets = [
        [],
        [Patch("blocks.1.resid_pre", value=clean["blocks.1.resid_pre"].flip(0), positions=[3])],
        [Ablate("blocks.0.attn.z", heads=[0, 3])],
        [Add("blocks.2.mlp_out", vector=torch.ones(tiny.spec.d_model), positions=[-1]), Scale("blocks.0.attn_out", 2.0)],
        [Knockout(1, from_positions=[-1], to_positions=[0], heads=[1])],
    ]
    sites = ["blocks.2.resid_post", "blocks.0.resid_pre", "blocks.1.attn.pattern"]
    for chunk in (2, 3, None):
        batched = tiny.run_sets(PROMPTS, sets, cache=sites, logits="all", chunk_size=chunk, reuse=reuse)
        last = tiny.run_sets(PROMPTS, sets, logits="last", chunk_size=chunk, reuse=reuse).logits
        assert batched.logits.shape[:2] == (len(sets), len(PROMPTS))
        for i, ivs in enumerate(sets):
            single = tiny.run(PROMPTS, interventions=ivs, cache=sites)
            torch.testing.assert_close(batched.logits[i], single.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last[i], single.logits[:, -1], atol=1e-5, rtol=1e-5)
            for s in sites:
                torch.testing.assert_close(batched[s][i], single[s], atol=1e-5, rtol=1e-5)


def _plan_cost(chunks, starts, weights, rows, t, overhead):
    return sum(overhead + rows * (t - min(starts[i] for i in c))
               * ((len({weights[i] for i in c}) > 1) + sum(weights[i] for i in c)) for c in chunks)


@pytest.mark.parametrize("cap", [None, 3])
def test_plan_chunks_is_the_cheapest_contiguous_split(cap):
    from itertools import product

    from lmscope.models.reuse import plan_chunks

    gen = torch.Generator().manual_seed(0)
    t, rows, overhead = 12, 2, 20.0
    starts = torch.randint(0, t, (9,), generator=gen).tolist()
    weights = (torch.randint(1, 5, (9,), generator=gen) / 4).tolist()
    chunks = plan_chunks(starts, weights, rows, t, cap=cap, overhead=overhead)
    assert sorted(i for c in chunks for i in c) == list(range(9))
    assert cap is None or max(map(len, chunks)) <= cap
    # brute force over every way to cut the (start, -weight) order, each piece split greedily by cap
    order = sorted(range(9), key=lambda i: (starts[i], -weights[i]))
    cuts = [k for k in range(1, 9) if starts[order[k]] != starts[order[k - 1]]]
    best = float("inf")
    for keep in product([False, True], repeat=len(cuts)):
        edges = [0] + [c for c, k in zip(cuts, keep) if k] + [9]
        pieces = []
        for a, e in zip(edges, edges[1:]):
            step = cap or 9
            pieces += [order[x:min(e, x + step)] for x in range(a, e, step)]
        best = min(best, _plan_cost(pieces, starts, weights, rows, t, overhead))
    assert _plan_cost(chunks, starts, weights, rows, t, overhead) == pytest.approx(best)
    # a fixed cost per forward makes one-token-apart sets share forwards; without it, they do not
    one_each = plan_chunks(list(range(40)), [1.0] * 40, 1, 40, overhead=0.0)
    shared = plan_chunks(list(range(40)), [1.0] * 40, 1, 40, overhead=64.0)
    assert len(one_each) == 40 and 1 < len(shared) < 40


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_single_prompts(tiny, side):
    sites = ["blocks.1.resid_post", "blocks.2.attn.z"]
    run = tiny.run(PROMPTS, cache=sites, padding_side=side)
    mask = run.batch.attention_mask.bool()
    for i, prompt in enumerate(PROMPTS):
        single = tiny.run(prompt, cache=sites)
        keep = mask[i]
        torch.testing.assert_close(run.logits[i][keep], single.logits[0], atol=1e-5, rtol=1e-4)
        for s in sites:
            torch.testing.assert_close(run[s][i][keep], single[s][0], atol=1e-5, rtol=1e-4)
    last = tiny.run(PROMPTS, padding_side=side, logits="last").logits
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(last[i], tiny.run(prompt).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_bad_input_errors(tiny_llama):
    m = tiny_llama
    with pytest.raises(SiteError, match="out of range"):
        m.run(PROMPT, cache=["blocks.7.resid_pre"])
    with pytest.raises(SiteError, match="Unknown site kind"):
        m.run(PROMPT, cache=["blocks.0.resid_middle"])
    with pytest.raises(SiteError, match="Cannot parse"):
        m.run(PROMPT, cache=["resid_pre"])
    with pytest.raises(InputError, match="Empty"):
        m.run("   ")
    with pytest.raises(InputError, match="at most"):
        m.run(" ".join(["cat"] * 200))
    with pytest.raises(TokenError, match="splits into 2"):
        m.token_id("cat dog")
    with pytest.raises(InputError, match="head axis"):
        Ablate("blocks.0.resid_pre", heads=[0])


def test_tl_aliases(tiny_llama):
    run = tiny_llama.run(PROMPT, cache=["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "ln_final.hook_scale"])
    assert set(run.cache) == {"blocks.0.resid_pre", "blocks.1.attn.z", "final.scale"}


def test_patch_of_wrong_length_says_why(tiny_llama):
    other = tiny_llama.run("the cat sat", cache=["blocks.0.resid_pre"])
    with pytest.raises(InputError, match="same number of tokens"):
        tiny_llama.run(PROMPT, interventions=[Patch("blocks.0.resid_pre", value=other["blocks.0.resid_pre"])])
    with pytest.raises(InputError, match="last dimension"):
        tiny_llama.run(PROMPT, interventions=[Add("blocks.0.resid_pre", vector=torch.ones(7))])


def test_unknown_architecture_names_the_fix():
    from transformers import OPTConfig, OPTForCausalLM

    from lmscope.errors import UnsupportedArchitectureError
    from lmscope.models import Model

    hf = OPTForCausalLM(OPTConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                  num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedArchitectureError, match="lmscope/models/families"):
        Model(hf, None, "tiny-opt")


def test_load_check_catches_a_decomposition_that_does_not_add_up(monkeypatch):
    """The load-time check must fail when head writes are wrong (here: each scaled by 0.9)."""
    from conftest import make_tiny

    from lmscope.errors import ModelCheckError
    from lmscope.models.model import Model

    original = Model.head_writes
    monkeypatch.setattr(Model, "head_writes", lambda self, *a, **k: 0.9 * original(self, *a, **k))
    with pytest.raises(ModelCheckError, match="add up"):
        make_tiny("llama")


def test_load_check_catches_a_missing_soft_cap(monkeypatch):
    """A model whose logits are soft-capped fails the load-time check if the soft-cap is not known to lmscope."""
    from conftest import make_tiny

    from lmscope.errors import ModelCheckError
    from lmscope.models.model import Model

    make_tiny("gemma2")  # passes as is
    monkeypatch.setattr(Model, "logit_softcap", property(lambda self: None))
    with pytest.raises(ModelCheckError, match="soft-cap"):
        make_tiny("gemma2")
