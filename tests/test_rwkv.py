"""RWKV on a tiny random config: the load checks (every site fires with its shape, lmscope's path gives the
native logits, each time-mix write is output(r ⊙ wkv), the decomposition adds up), the WKV sites against a
recurrence written out by hand, the undone rescaling, batched = single-prompt runs despite transformers
ignoring the mask, state steering, and the toolbox (lenses, probes, CAA, patching, tracing, DLA)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny, tiny_config, tiny_tokenizer
from lmscope import Add, Knockout
from lmscope.errors import InputError, ModelCheckError, SiteError, UnsupportedArchitectureError
from lmscope.models import Model
from lmscope.models.checks import check_model
from lmscope.sites import KINDS
from toolbox_checks import check_caa_generation, check_patching_cells, check_probe, check_tuned_lens

PROMPT = "the cat sat on the mat and the dog ran to the"
RAGGED = ["the cat sat on the mat and the dog ran to the", "when Mary went", "a big red tree is by the river"]


@pytest.fixture(scope="module")
def rwkv():
    return make_tiny("rwkv")


def hand_time_mix(model, layer, x_TD):
    """(r, k, v, states (T, E, 2), wkv (T, E)) of one prompt's time-mix input x (T, D), token by token in float64
    from the native module's parameters."""
    att = model.hf.rwkv.blocks[layer].attention
    x = x_TD.double()
    prev = torch.cat([torch.zeros_like(x[:1]), x[:-1]])

    def proj(lin, mu):
        mu = mu.double().reshape(-1)
        return (x * mu + prev * (1 - mu)) @ lin.weight.double().T

    r = torch.sigmoid(proj(att.receptance, att.time_mix_receptance))
    k, v = proj(att.key, att.time_mix_key), proj(att.value, att.time_mix_value)
    w, u = torch.exp(att.time_decay.double()), att.time_first.double()
    a = torch.zeros(k.shape[1], dtype=torch.float64)
    b = torch.zeros_like(a)
    states, outs = [], []
    for t in range(k.shape[0]):
        own = torch.exp(u + k[t])
        outs.append((a + own * v[t]) / (b + own))
        a = torch.exp(-w) * a + torch.exp(k[t]) * v[t]
        b = torch.exp(-w) * b + torch.exp(k[t])
        states.append(torch.stack([a, b], dim=-1))
    return r, k, v, torch.stack(states), torch.stack(outs)


def test_loads_checked_with_every_site(rwkv):
    assert rwkv.spec.family == "rwkv" and rwkv.load_check == "checked"
    assert {"wkv", "mlp"} <= rwkv.parts and not {"attention", "ssm"} & rwkv.parts
    assert (rwkv.spec.d_inner, rwkv.spec.d_state, rwkv.spec.d_mlp) == (32, 2, 48)
    sites = [f"blocks.1.{k}" for k in KINDS if KINDS[k].part in ("wkv", "mlp")]
    run = rwkv.run(PROMPT, cache=sites)
    t = run.batch.input_ids.shape[1]
    for name in sites:
        assert tuple(run[name].shape) == KINDS[name.split(".", 2)[2]].shape(rwkv.spec, 1, t), name
    # resid_mid: between the time mix's write and the channel mix's, also under an intervention on the write
    vec = torch.randn(32, generator=torch.Generator().manual_seed(2))
    for ivs in ([], [Add("blocks.1.wkv_out", vec, positions=[2])]):
        mid = rwkv.run(PROMPT, cache=["blocks.1.resid_pre", "blocks.1.wkv_out", "blocks.1.resid_mid",
                                      "blocks.1.mlp_out", "blocks.1.resid_post"], interventions=ivs)
        torch.testing.assert_close(mid["blocks.1.resid_mid"], mid["blocks.1.resid_pre"] + mid["blocks.1.wkv_out"])
        torch.testing.assert_close(mid["blocks.1.resid_post"], mid["blocks.1.resid_mid"] + mid["blocks.1.mlp_out"])


def test_time_mix_sites_are_the_recurrence_and_the_writes_add_up(rwkv):
    names = ["wkv.r", "wkv.k", "wkv.v", "wkv.state", "wkv.out", "wkv.y", "wkv_out", "resid_pre", "mlp_out",
             "mlp.post"]
    run = rwkv.run(PROMPT, cache=[f"blocks.{l}.{k}" for l in range(3) for k in names] + ["embed", "blocks.2.resid_post"])
    block = rwkv.hf.rwkv.blocks[1]
    r, k, v, states, out = hand_time_mix(rwkv, 1, block.ln1(run["blocks.1.resid_pre"][0]))
    for name, want in (("wkv.r", r), ("wkv.k", k), ("wkv.v", v), ("wkv.state", states), ("wkv.out", out)):
        torch.testing.assert_close(run[f"blocks.1.{name}"][0].double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run["blocks.1.wkv.y"], run["blocks.1.wkv.r"] * run["blocks.1.wkv.out"])
    torch.testing.assert_close(block.attention.output(run["blocks.1.wkv.y"]), run["blocks.1.wkv_out"])
    # the stream starts after block 0's norm of the embeddings, and embed + Σ writes is the final residual
    ids = run.batch.input_ids
    torch.testing.assert_close(run["embed"], rwkv.hf.rwkv.blocks[0].pre_ln(rwkv.hf.rwkv.embeddings(ids)))
    torch.testing.assert_close(rwkv.embed_tokens(ids), run["embed"])
    total = run["embed"] + sum(run[f"blocks.{l}.wkv_out"] + run[f"blocks.{l}.mlp_out"] for l in range(3))
    torch.testing.assert_close(total, run["blocks.2.resid_post"], rtol=1e-5, atol=1e-5)
    # the channel mix's write is Σ_n post_n · (σ(r) ⊙ W_out[n]): linear in the neurons given the gate
    from lmscope.models import decompose

    dec = decompose(rwkv, PROMPT, neurons=True)
    neurons = [i for i, (kind, ly) in enumerate(zip(dec.kinds, dec.layers)) if kind == "neuron" and ly == 1]
    torch.testing.assert_close(dec.vectors[0, neurons].sum(0), run["blocks.1.mlp_out"][0, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dec.vectors[0].sum(0), dec.resid[0], rtol=1e-4, atol=1e-5)


def test_check_catches_a_path_that_misses_the_native_forward(rwkv, monkeypatch):
    from lmscope.models import wkv

    monkeypatch.setattr(wkv, "_shift", lambda x, last: torch.zeros_like(x))  # no token shift
    with pytest.raises(ModelCheckError, match="time-mix and channel-mix path"):
        check_model(rwkv)


def _raw_tiny(rescale_every: int):
    torch.manual_seed(3)
    cfg = tiny_config("rwkv")
    cfg.rescale_every = rescale_every
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3 if "emb" in name else 0.15)
    return hf


def test_rescaling_is_switched_off_and_undone_with_the_same_logits(monkeypatch):
    hf = _raw_tiny(2)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    native = copy.deepcopy(hf).eval()
    ids = tiny_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = native(ids).logits  # transformers' eval: block 2's output weights halved, the stream halved after 1
    assert native.rwkv.layers_are_rescaled
    assert torch.equal(native.rwkv.blocks[2].attention.output.weight, weights["rwkv.blocks.2.attention.output.weight"] / 2)
    for source in (hf, native):  # fresh, and already rescaled in place by an eval forward
        model = Model(source, tiny_tokenizer(), "tiny-rwkv-rescaled")
        assert model.load_check == "checked" and model.hf.config.rescale_every == 0
        for k, v in model.hf.state_dict().items():
            assert torch.equal(v, weights[k]), k
        # equal up to the norms' eps (LayerNorm(x / 2) is not exactly LayerNorm(x) with eps = 1e-5)
        torch.testing.assert_close(model.run(PROMPT).logits, want, rtol=1e-3, atol=2e-4)
    from lmscope.models import wkv

    monkeypatch.setattr(wkv, "prepare", lambda hf: None)  # left rescaled, the writes do not add up to the stream
    with pytest.raises(ModelCheckError, match="add up"):
        Model(_raw_tiny(2), tiny_tokenizer(), "tiny-rwkv-rescaled")


def test_batched_runs_equal_single_prompt_runs(rwkv):
    sites = ["blocks.0.resid_post", "blocks.1.wkv.state", "blocks.1.wkv.out", "blocks.2.mlp.post", "embed"]
    batch = rwkv.run(RAGGED, cache=sites)
    for row, prompt in enumerate(RAGGED):
        single = rwkv.run(prompt, cache=sites)
        t = single.logits.shape[1]
        torch.testing.assert_close(batch.logits[row, -t:], single.logits[0], rtol=1e-5, atol=1e-5)
        for name in sites:
            torch.testing.assert_close(batch[name][row, -t:], single[name][0], rtol=1e-5, atol=1e-5)
    # transformers' own forward lets the pads in: the short prompts' logits differ (what the path prevents)
    with torch.no_grad():
        native = rwkv.forward(rwkv.encode(RAGGED)).logits
    t = len(rwkv.to_str_tokens(RAGGED[1]))
    assert float((native[1, -t:] - batch.logits[1, -t:]).abs().max()) > 1e-3
    # intervention sets on copies of a padded batch (run_sets) equal separate runs
    vec = torch.randn(32, generator=torch.Generator().manual_seed(0))
    sets = [[Add("blocks.1.resid_pre", vec, positions=[-1])], [Add("blocks.0.wkv_out", vec, scale=2.0)], []]
    many = rwkv.run_sets(RAGGED, sets)
    for i, ivs in enumerate(sets):
        torch.testing.assert_close(many.logits[i], rwkv.run(RAGGED, interventions=ivs, logits="last").logits,
                                   rtol=1e-5, atol=1e-5)


def test_state_steering_flows_on_through_the_recurrence(rwkv):
    g = torch.Generator().manual_seed(0)
    delta = torch.stack([torch.randn(32, generator=g), torch.rand(32, generator=g)], dim=-1)  # (E, 2): Δa, Δb > 0
    names = ["blocks.1.wkv.state", "blocks.1.wkv.out", "blocks.1.wkv.k", "blocks.1.wkv.v"]
    base = rwkv.run(PROMPT, cache=names)
    steer = rwkv.run(PROMPT, cache=names, interventions=[Add("blocks.1.wkv.state", delta, positions=[3])])
    d = steer["blocks.1.wkv.state"][0] - base["blocks.1.wkv.state"][0]
    assert float(d[:3].abs().max()) == 0.0
    torch.testing.assert_close(d[3], delta, rtol=1e-4, atol=1e-5)
    decay = torch.exp(-torch.exp(rwkv.hf.rwkv.blocks[1].attention.time_decay))[:, None]
    torch.testing.assert_close(d[5], decay ** 2 * delta, rtol=1e-4, atol=1e-5)
    # the next token reads the changed state: wkv_4 = (a_3 + Δa + e^{u+k_4} v_4) / (b_3 + Δb + e^{u+k_4})
    a3, b3 = base["blocks.1.wkv.state"][0, 3].unbind(-1)
    k4, v4 = base["blocks.1.wkv.k"][0, 4], base["blocks.1.wkv.v"][0, 4]
    own = torch.exp(rwkv.hf.rwkv.blocks[1].attention.time_first + k4)
    want = (a3 + delta[:, 0] + own * v4) / (b3 + delta[:, 1] + own)
    torch.testing.assert_close(steer["blocks.1.wkv.out"][0, 4], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(steer["blocks.1.wkv.out"][0, :4], base["blocks.1.wkv.out"][0, :4])


def test_logit_lens_and_dla_per_block_and_neuron(rwkv):
    from lmscope.decoding import logit_lens
    from lmscope.localization.dla import dla

    logits = rwkv.run(PROMPT, logits="last").logits[0]
    lens = logit_lens(rwkv, PROMPT, k=3)
    top = torch.softmax(logits.float(), -1).topk(3)
    assert lens.values.shape[0] == 4 and lens.extras["top_ids"][-1, -1].tolist() == top.indices.tolist()
    diff = float(logits[rwkv.token_id("mat")] - logits[rwkv.token_id("dog")])
    res = dla(rwkv, PROMPT, "mat", "dog")
    assert res.axes[0].labels == ("embed", "L0.wkv", "L0.mlp", "L1.wkv", "L1.mlp", "L2.wkv", "L2.mlp")
    assert abs(res.meta["total"] - diff) < 1e-4
    # a block's term is its write through the frozen final norm onto W_U[mat] − W_U[dog]
    run = rwkv.run(PROMPT, cache=["blocks.1.wkv_out", "final.scale"])
    direction = rwkv.logit_direction("mat", "dog", scale=run["final.scale"][0, -1])
    assert abs(float(res.values[3]) - float(run["blocks.1.wkv_out"][0, -1] @ direction.vector)) < 1e-4
    neurons = dla(rwkv, PROMPT, "mat", "dog", by="neuron")
    assert neurons.values.shape == (3, 48) and abs(neurons.meta["total"] - diff) < 1e-4
    torch.testing.assert_close(neurons.values.sum(1), res.values[2::2].float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(UnsupportedArchitectureError, match="attention"):
        dla(rwkv, PROMPT, "mat", "dog", by="head")


def test_tuned_lens_trains_and_reports_bits_per_byte(rwkv):
    check_tuned_lens(rwkv)


def test_probe_reads_the_last_token(rwkv):
    check_probe(rwkv)


def test_caa_steering_in_cached_generation_equals_recomputation(rwkv):
    check_caa_generation(rwkv, 3)


@pytest.mark.parametrize("site", ["resid_post", "resid_mid", "wkv_out", "wkv.out", "wkv.r", "mlp_out"])
def test_patching_cells_equal_single_patched_runs(rwkv, site):
    check_patching_cells(rwkv, site)


@pytest.mark.parametrize("kind", ["hidden", "wkv", "wkv_s", "receptance", "mlp"])
def test_causal_tracing(rwkv, kind):
    from lmscope.localization.tracing import causal_trace

    res = causal_trace(rwkv, "the cat sat on the", "cat", kind=kind, samples=3, window=None if kind == "hidden" else 1)
    assert res.values.shape == (3, 5) and res.meta["clean_prob"] != res.meta["corrupt_prob"]
    if kind == "hidden":  # the last block's output at the last position restored: the clean prediction
        assert abs(float(res.values[-1, -1]) - res.meta["clean_prob"]) < 1e-5
    else:  # restoring a write moves the probability off the corrupted run's somewhere
        assert float((res.values - res.meta["corrupt_prob"]).abs().max()) > 1e-4


def test_memory_knockout_and_what_is_refused(rwkv):
    mem = rwkv.memory(1)
    assert (mem.kind, mem.key_site) == ("wkv", "blocks.1.wkv.y")
    run = rwkv.run(PROMPT, cache=["blocks.1.wkv.y", "blocks.1.wkv_out"])
    torch.testing.assert_close(run["blocks.1.wkv.y"][0] @ mem.weight().T, run["blocks.1.wkv_out"][0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="wkv"):  # the gated channel mix is no v = W k memory
        rwkv.memory(1, "mlp")
    with pytest.raises(UnsupportedArchitectureError):
        rwkv.run(PROMPT, interventions=[Knockout(1, from_positions=[-1], to_positions=[0])])
    with pytest.raises(SiteError):
        rwkv.run(PROMPT, cache=["blocks.1.wkv.q"])
    # transformers' generate would let the pads in: ragged prompts are sampled one by one, laid out as a batch
    both = rwkv.sample(RAGGED[:2], 3)
    p = rwkv.encode(RAGGED[:2]).input_ids.shape[1]
    for row, prompt in enumerate(RAGGED[:2]):
        alone = rwkv.sample(prompt, 3)[0]
        n = len(rwkv.to_str_tokens(prompt))
        assert torch.equal(both[row, p - n:p + len(alone) - n], alone)
    assert both.shape[1] > p
