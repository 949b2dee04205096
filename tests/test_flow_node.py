"""The graph view's specs against independent computations: the full graph routes like `flow`, the blockwise
decomposition equals the one-block one, and each node's inspector (heads, neurons, logit lens) equals a
direct computation from the model's weights and cached sites."""

from __future__ import annotations

import importlib

import pytest
import torch

from lmscope import specs
from lmscope.errors import InputError, LmscopeError
from lmscope.localization.flow import EPS, flow_contributions

flow_mod = importlib.import_module("lmscope.localization.flow")  # the module (the package exports the function)

P = "when Mary and John went to the store John gave a drink to"


def test_blockwise_contributions_equal_one_block(tiny, monkeypatch):
    whole = flow_contributions(tiny, P)
    monkeypatch.setattr(flow_mod, "CHUNK_FLOATS", 7)  # one causal pair at a time
    small = flow_contributions(tiny, P)
    for a, b in ((whole.attn, small.attn), (whole.attn_resid, small.attn_resid), (whole.mlp, small.mlp)):
        torch.testing.assert_close(a, b)
    one = flow_contributions(tiny, P, layers=[1])
    torch.testing.assert_close(one.attn[0], whole.attn[1])


def test_flow_graph_predictions_are_the_models(tiny_llama):
    g = specs.run_json(tiny_llama, "flow-graph", P, {})
    logits = tiny_llama.run(P).logits[0].float()
    top = logits.softmax(-1).topk(5, dim=-1)
    assert [[t for t, _ in row] for row in g.meta["predictions"]] == [
        [tiny_llama.decode([i]) for i in ids] for ids in top.indices.tolist()]
    assert all(e["weight"] > 0.01 for e in g.meta["edges"])
    attn = [e for e in g.meta["edges"] if e["kind"] == "attn"]
    assert attn and all(sum(e["heads"]) == pytest.approx(e["weight"], abs=1e-5) for e in attn)


def test_head_node_against_direct_computation(tiny_llama):
    m, layer, pos = tiny_llama, 1, 9
    res = specs.run_json(m, "flow-node", P, {"component": "attn_heads", "layer": layer, "position": pos, "k": 3})
    c = flow_contributions(m, P)
    torch.testing.assert_close(res.values, c.attn[layer].permute(2, 0, 1))
    run = m.run(P, cache=[f"blocks.{layer}.attn.pattern", f"blocks.{layer}.attn.z", "final.scale",
                          "blocks.2.resid_post"])
    torch.testing.assert_close(res.extras["pattern"], run[f"blocks.{layer}.attn.pattern"][0])
    # head h's write: z_h W_O[h]; read out linearly with the final RMSNorm's scale frozen
    z = run[f"blocks.{layer}.attn.z"][0, pos]
    final = run["blocks.2.resid_post"][0, pos]
    inv_rms = torch.rsqrt(final.pow(2).mean() + m.hf.config.rms_norm_eps)
    w_norm = m.hf.model.norm.weight.detach()
    for h in range(m.spec.n_heads):
        write = z[h] @ m.W_O(layer)[h].detach()
        logits = (write * inv_rms * w_norm) @ m.hf.lm_head.weight.detach().T
        top = logits.topk(3).indices.tolist()
        assert [t for t, _ in res.meta["promotes"][h]] == [m.decode([i]) for i in top]
        assert res.meta["promotes"][h][0][1] == pytest.approx(float(logits[top[0]]), abs=1e-3)
        assert res.meta["suppresses"][h][0][1] == pytest.approx(float(logits.min()), abs=1e-3)


def test_neuron_node_against_a_naive_loop(tiny_llama):
    m, layer, pos = tiny_llama, 2, 12
    res = specs.run_json(m, "flow-node", P, {"component": "mlp_neurons", "layer": layer, "position": pos, "k": 5})
    run = m.run(P, cache=[f"blocks.{layer}.mlp.post", f"blocks.{layer}.mlp_out"])
    act = run[f"blocks.{layer}.mlp.post"][0, pos]
    down = m.hf.model.layers[layer].mlp.down_proj.weight.detach()  # (D, F)
    y = run[f"blocks.{layer}.mlp_out"][0, pos]
    prox = []
    for n in range(act.shape[0]):
        z = act[n] * down[:, n]
        prox.append(max(EPS, float(y.abs().sum() - (y - z).abs().sum())))
    prox = torch.tensor(prox)
    imp = prox / prox.sum()
    top = imp.topk(5)
    assert [int(x) for x in res.axes[0].labels] == top.indices.tolist()
    torch.testing.assert_close(res.values, top.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.extras["activation"], act[top.indices])


@pytest.mark.parametrize("component", ["resid_post", "resid_mid", "embed"])
def test_state_node_is_the_logit_lens(tiny, component):
    m, layer, pos = tiny, 1, 4
    res = specs.run_json(m, "flow-node", {"prompt": P, "target": "Mary"},
                         {"component": component, "layer": layer, "position": pos, "k": 4})
    pre = f"blocks.{layer}."
    run = m.run(P, cache=["embed", pre + "resid_pre", pre + "attn_out", pre + "resid_post"])
    mid = run[pre + "resid_pre"][0, pos] + run[pre + "attn_out"][0, pos]
    before, after = {"resid_post": (mid, run[pre + "resid_post"][0, pos]),
                     "resid_mid": (run[pre + "resid_pre"][0, pos], mid),
                     "embed": (run["embed"][0, pos], run["embed"][0, pos])}[component]
    probs = [m.unembed(x).softmax(-1) for x in (before, after)]
    top = probs[1].topk(4)
    torch.testing.assert_close(res.values, top.values)
    assert res.meta["top_tokens"] == [m.decode([i]) for i in top.indices.tolist()]
    for r, (i, rb) in enumerate(zip(top.indices.tolist(), res.extras["rank_before"].tolist())):
        assert rb == int((probs[0] > probs[0][i]).sum()) + 1
        assert int(res.axes[0].labels[r]) == int((probs[1] > probs[1][i]).sum()) + 1
    tid = m.token_id("Mary")
    assert res.meta["target"]["rank"] == int((probs[1] > probs[1][tid]).sum()) + 1


def _plain_hook_metric(m, prompt, replace, pos, tid):
    """The target's log-probability at ``pos`` with attention/MLP outputs replaced through plain torch hooks:
    ``replace[(kind, layer)]`` = (value (T, D), positions)."""
    handles = []

    def hook(kind, layer):
        def fn(mod, args, out):
            if (kind, layer) not in replace:
                return out
            value, positions = replace[(kind, layer)]
            x = out[0] if isinstance(out, tuple) else out
            x = x.clone()
            x[0, positions] = value[positions]
            return (x, *out[1:]) if isinstance(out, tuple) else x
        return fn

    for layer, block in enumerate(m.hf.model.layers):
        handles.append(block.self_attn.register_forward_hook(hook("attn", layer)))
        handles.append(block.mlp.register_forward_hook(hook("mlp", layer)))
    try:
        with torch.no_grad():
            return float(m.forward(m.encode(prompt)).logits[0, pos].double().log_softmax(-1)[tid])
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("corrupt", [None, "when John and Mary went to the store Mary gave a drink to"])
def test_flow_verify_against_plain_hooks(tiny_llama, corrupt):
    from lmscope.localization.flow_verify import kept_blocks

    m, tau = tiny_llama, 0.04
    cfg = {"threshold": tau} if corrupt is None else {"threshold": tau, "corrupt": corrupt}
    res = specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary"}, cfg)
    tid, t, n = m.token_id("Mary"), len(m.to_str_tokens(P)), m.spec.n_layers
    pos = t - 1
    sites = [f"blocks.{l}.{k}" for l in range(n) for k in ("attn_out", "mlp_out")]
    src = m.run(P if corrupt is None else corrupt, cache=sites)
    value = {(k[:-4], l): (src[f"blocks.{l}.{k}"][0, 1:].mean(0).expand(t, -1) if corrupt is None
                           else src[f"blocks.{l}.{k}"][0]) for l in range(n) for k in ("attn_out", "mlp_out")}
    kept = kept_blocks(flow_mod.flow(m, P, threshold=tau))
    assert res.meta["kept"] == kept and kept["attn"] and kept["mlp"]
    keep = {("attn", l, i) for l, i in kept["attn"]} | {("mlp", l, i) for l, i in kept["mlp"]}
    outside = {key: (v, [i for i in range(t) if (key[0], key[1], i) not in keep]) for key, v in value.items()}
    everything = {key: (v, list(range(t))) for key, v in value.items()}
    clean = _plain_hook_metric(m, P, {}, pos, tid)
    graph = _plain_hook_metric(m, P, outside, pos, tid)
    none = _plain_hook_metric(m, P, everything, pos, tid)
    assert res.meta["metric"] == "log_prob" and res.meta["mean_skip_first"] is True
    torch.testing.assert_close(res.values[:3], torch.tensor([clean, graph, none]), atol=1e-4, rtol=1e-4)
    assert float(res.values[3]) == pytest.approx((graph - none) / (clean - none), abs=1e-4)


def test_flow_verify_metrics_are_the_shared_ones(tiny_llama):
    """With a foil the default is the logit difference; kl, probability and the plain mean are options; each
    is the metric of the same three runs (the log-probabilities of the default give them all)."""
    m = tiny_llama
    base = specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary"}, {"metric": "kl"})
    with_foil = specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary", "foil": "John"}, {})
    assert with_foil.meta["metric"] == "logit_diff" and base.meta["metric"] == "kl"
    assert float(base.values[0]) == pytest.approx(0.0, abs=1e-6) and float(base.values[2]) > 0
    lp = specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary"}, {"metric": "logprob"})
    lp_foil = specs.run_json(m, "flow-verify", {"prompt": P, "target": "John"}, {})
    torch.testing.assert_close(with_foil.values[:3], lp.values[:3] - lp_foil.values[:3], atol=1e-4, rtol=1e-4)
    prob = specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary"}, {"metric": "probability"})
    torch.testing.assert_close(prob.values[:3], lp.values[:3].exp(), atol=1e-5, rtol=1e-4)
    plain = specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary"}, {"mean_skip_first": False})
    assert float(plain.values[0]) == pytest.approx(float(lp.values[0]), abs=1e-5)
    assert float(plain.values[2]) != pytest.approx(float(lp.values[2]), abs=1e-4)
    with pytest.raises(InputError, match="foil"):
        specs.run_json(m, "flow-verify", {"prompt": P, "target": "Mary"}, {"metric": "logit_diff"})
    with pytest.raises(InputError, match="metric"):
        specs.run_json(m, "flow-verify", P, {"metric": "bogus"})


@pytest.mark.real

def test_one_head_is_that_head_of_every_head(tiny):
    """``head=h``: head h's maps, promoted and suppressed tokens of the all-heads result, to the bit; a bad head
    is a clear error."""
    every = specs.run_json(tiny, "flow-node", P, {"component": "attn_heads", "layer": 1, "position": 7, "k": 4})
    for h in (0, tiny.spec.n_heads - 1):
        one = specs.run_json(tiny, "flow-node", P, {"component": "attn_heads", "layer": 1, "position": 7, "k": 4,
                                                    "head": h})
        assert one.shape[0] == 1 and one.axes[0].labels == (str(h),) and one.params["head"] == h
        assert torch.equal(one.values[0], every.values[h]) and torch.equal(one.extras["pattern"][0],
                                                                           every.extras["pattern"][h])
        assert one.meta["promotes"][0] == every.meta["promotes"][h]
        assert one.meta["suppresses"][0] == every.meta["suppresses"][h]
    with pytest.raises(LmscopeError, match="out of range"):
        specs.run_json(tiny, "flow-node", P, {"component": "attn_heads", "layer": 1, "head": tiny.spec.n_heads})

def test_flow_verify_defaults_are_meaningful_on_ioi(smollm):
    """The reported bug: on SmolLM2's IOI prompt the defaults (raw logit, plain mean) gave a 'none' run above the
    clean one and faithfulness 1.93. With the shared metric and the sink left out of the mean, patching every
    block removes the behaviour and the graph keeps most of it, at every threshold of the slider's range."""
    ioi = "When Mary and John went to the store, John gave a drink to"
    for tau in (0.04, 0.08):
        res = specs.run_json(smollm, "flow-verify", ioi, {"threshold": tau})
        clean, graph, none, faith = res.values.tolist()
        assert res.target["target"] == " Mary" and res.meta["metric"] == "log_prob"
        assert none < graph and none < clean - 1.0, (tau, res.values)
        assert 0.5 < faith <= 1.1, (tau, faith)


def test_head_and_neuron_nodes_on_every_family(tiny):
    """GQA, post-norms (Gemma), Conv1D (GPT-2), parallel blocks (NeoX): the head maps are the graph's numbers,
    each pattern row sums to 1, and the neuron shares are the largest of a distribution over neurons."""
    res = specs.run_json(tiny, "flow-node", P, {"component": "attn_heads", "layer": 2, "position": 10, "k": 2})
    torch.testing.assert_close(res.values, flow_contributions(tiny, P, [2]).attn[0].permute(2, 0, 1))
    torch.testing.assert_close(res.extras["pattern"].sum(-1), torch.ones(res.shape[:2]), atol=1e-5, rtol=0)
    assert len(res.meta["promotes"]) == tiny.spec.n_heads and all(len(r) == 2 for r in res.meta["promotes"])
    neurons = specs.run_json(tiny, "flow-node", P, {"component": "mlp_neurons", "layer": 0, "position": 4, "k": 5})
    v = neurons.values
    assert (v[:-1] >= v[1:]).all() and 0 < float(v.sum()) <= 1 + 1e-6
