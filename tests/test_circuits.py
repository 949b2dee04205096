"""Edge-level patching, EAP / EAP-IG, circuit extraction, faithfulness and ACDC: against independent
computations (node-level interventions, finite differences of real edge-patched forwards), on tiny
models of several families and, for the IOI circuit, on the real model."""

from __future__ import annotations

import pytest
import torch

from lmscope import Add, Patch
from lmscope.errors import InputError
from lmscope.localization.acdc import acdc, receiver_order
from lmscope.localization.atp import encode_pairs
from lmscope.localization.circuits import Circuit, evaluate_masks, extract, faithfulness_curve, prune, select
from lmscope.localization.eap import eap
from lmscope.localization.metrics import Metric
from lmscope.localization.tasks import PromptPairs
from lmscope.models.edges import edge_forward, edge_graph, upstream_values
from lmscope.results import Result

PAIRS = PromptPairs(
    ["when Mary and John went to the store John gave a drink to", "the cat sat on the mat and the dog ran to the"],
    ["when Mary and John went to the store Mary gave a drink to", "the dog sat on the mat and the cat ran to the"],
    ["Mary", "dog"], ["John", "cat"])


def _batches(model):
    clean, corrupt = encode_pairs(model, PAIRS)
    return clean, corrupt, upstream_values(model, clean), upstream_values(model, corrupt)


def test_edge_forward_endpoints(tiny):
    """No patched edge: the model's own run; every edge patched: exactly the corrupted run."""
    clean, corrupt, _, up_r = _batches(tiny)
    graph = edge_graph(tiny)
    with torch.no_grad():
        own = tiny.run(clean, logits="last").logits
        bad = tiny.run(corrupt, logits="last").logits
        torch.testing.assert_close(edge_forward(tiny, clean).logits, own, atol=1e-5, rtol=1e-4)
        full = edge_forward(tiny, clean, patch=graph.valid.clone(), corrupt=up_r).logits
    torch.testing.assert_close(full, bad, atol=1e-5, rtol=1e-4)
    assert (own - bad).abs().max() > 0.1


def test_single_edges_against_node_interventions(tiny):
    """Patching u → logits alone equals adding the corrupted-minus-clean write of u to the final
    residual; patching every edge into one head's query (key) equals patching that head's query
    (key) with the corrupted run's (for grouped-query models: that query head's copy only)."""
    clean, corrupt, up_c, up_r = _batches(tiny)
    graph = edge_graph(tiny)
    n = tiny.spec.n_layers
    with torch.no_grad():
        u = graph.head_index(1, 2)
        patch = torch.zeros_like(graph.valid)
        patch[u, -1] = True
        got = edge_forward(tiny, clean, patch=patch, corrupt=up_r).logits
        want = tiny.run(clean, logits="last", interventions=[
            Add(f"blocks.{n - 1}.resid_post", up_r[u] - up_c[u])]).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for which in ("q", "k", "v"):
            layer, head = 2, 1
            site = f"blocks.{layer}.attn.{which}"
            patch = torch.zeros_like(graph.valid)
            patch[:, graph.receiver_index(layer, which, head)] = True
            got = edge_forward(tiny, clean, patch=patch, corrupt=up_r).logits
            value = tiny.run(corrupt, cache=[site]).cache[site]
            want = tiny.run(clean, logits="last", interventions=[Patch(site, value=value, heads=[head])]).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            assert (got - tiny.run(clean, logits="last").logits).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gemma3", "neox"])
def test_eap_is_the_first_order_term_of_edge_patching(family):
    from conftest import make_tiny

    model = make_tiny(family)
    scores = eap(model, PAIRS)
    clean, corrupt, up_c, up_r = _batches(model)
    t, f = PAIRS.token_ids(model)
    metric = Metric("logit_diff", t, f)
    g = scores.graph
    eps = 1e-2
    edges = [(0, g.receiver_index(1, "q", 2)), (g.head_index(0, 1), g.receiver_index(2, "k", 3)),
             (g.mlp_index(1), len(g.receivers) - 1), (g.head_index(0, 3), g.receiver_index(1, "v", 1)),
             (g.head_index(1, 0), g.receiver_index(1, "mlp"))]
    nonzero = 0
    for u, r in edges:
        if not g.valid[u, r]:  # parallel blocks: a head does not feed its own layer's MLP
            assert model.spec.parallel and scores.scores[u, r] == 0
            continue
        patch = torch.zeros_like(g.valid)
        patch[u, r] = True
        with torch.no_grad():
            plus = metric(edge_forward(model, clean, patch=patch, corrupt=up_c + eps * (up_r - up_c)).logits)
            minus = metric(edge_forward(model, clean, patch=patch, corrupt=up_c - eps * (up_r - up_c)).logits)
        by_hand = float(plus - minus) / (2 * eps)
        assert float(scores.scores[u, r]) == pytest.approx(by_hand, abs=1e-3, rel=1e-3), (g.upstream[u], g.receivers[r])
        nonzero += abs(by_hand) > 1e-3
    assert nonzero >= 3


def test_eap_ig_one_step_is_eap_at_the_corrupted_input(tiny_llama):
    """With one step EAP-IG takes the gradient at the corrupted embeddings: equal to EAP's formula
    with the gradient taken on the corrupted prompts (scores are linear in the gradient)."""
    ig = eap(tiny_llama, PAIRS, method="eap-ig", ig_steps=1)
    clean, corrupt, up_c, up_r = _batches(tiny_llama)
    t, f = PAIRS.token_ids(tiny_llama)
    run = edge_forward(tiny_llama, corrupt, grad=True)
    grads = run.receiver_grads(Metric("logit_diff", t, f)(run.logits))
    want = ((up_r - up_c).flatten(1) @ grads.flatten(1).T) * ig.graph.valid
    torch.testing.assert_close(ig.scores, want, atol=1e-5, rtol=1e-4)
    five = eap(tiny_llama, PAIRS, method="eap-ig", ig_steps=5)
    assert not torch.allclose(five.scores, ig.scores)


def test_eap_ig_with_several_steps_equals_finite_differences_along_the_path(tiny_llama):
    """EAP-IG with m = 3 steps against an independent integration: at each interpolated input
    e_r + (k/m)(e_c − e_r), k = 0..m−1 (a real forward with the embeddings patched), the directional
    derivative of the metric along the edge's corrupted-minus-clean write, by central finite differences
    of real edge-patched forwards; the score is their mean. No gradient of the implementation is used."""
    model, m_steps, eps = tiny_llama, 3, 1e-2
    ig = eap(model, PAIRS, method="eap-ig", ig_steps=m_steps)
    clean, corrupt, up_c, up_r = _batches(model)
    t, f = PAIRS.token_ids(model)
    metric = Metric("logit_diff", t, f)
    g = ig.graph
    delta = up_r - up_c
    edges = [(0, g.receiver_index(1, "q", 2)), (g.head_index(0, 1), g.receiver_index(2, "k", 3)),
             (g.mlp_index(1), len(g.receivers) - 1), (g.head_index(0, 3), g.receiver_index(1, "v", 1)),
             (0, g.receiver_index(0, "mlp")), (g.head_index(1, 0), g.receiver_index(1, "mlp"))]
    by_hand = torch.zeros(len(edges))
    with torch.no_grad():
        for k in range(m_steps):
            ivs = (Patch("embed", value=up_r[0] + (k / m_steps) * (up_c[0] - up_r[0])),)
            here = upstream_values(model, clean, interventions=ivs)  # the writes at this point of the path
            for j, (u, r) in enumerate(edges):
                patch = torch.zeros_like(g.valid)
                patch[u, r] = True
                plus = metric(edge_forward(model, clean, patch=patch, corrupt=here + eps * delta,
                                           interventions=ivs).logits)
                minus = metric(edge_forward(model, clean, patch=patch, corrupt=here - eps * delta,
                                            interventions=ivs).logits)
                by_hand[j] += float(plus - minus) / (2 * eps) / m_steps
    got = torch.stack([ig.scores[u, r] for u, r in edges])
    torch.testing.assert_close(got, by_hand, atol=1e-3, rtol=1e-3)
    assert (by_hand.abs() > 1e-3).sum() >= 4
    plain = eap(model, PAIRS).scores
    eap_scores = torch.stack([plain[u, r] for u, r in edges])
    assert (eap_scores - by_hand).abs().max() > 1e-2  # the integration differs from the clean-end gradient


def test_clean_corrupted_averages_the_endpoint_gradients(tiny_llama):
    """The clean-corrupted variant: (corrupt − clean writes) · the mean of the receiver gradients
    of the clean and of the corrupted prompts, each taken by hand from its own backward pass."""
    cc = eap(tiny_llama, PAIRS, method="clean-corrupted")
    clean, corrupt, up_c, up_r = _batches(tiny_llama)
    t, f = PAIRS.token_ids(tiny_llama)
    metric = Metric("logit_diff", t, f)
    grads = []
    for batch in (clean, corrupt):
        run = edge_forward(tiny_llama, batch, grad=True)
        grads.append(run.receiver_grads(metric(run.logits)))
    mean = (grads[0] + grads[1]) / 2
    want = ((up_r - up_c).flatten(1) @ mean.flatten(1).T) * cc.graph.valid
    torch.testing.assert_close(cc.scores, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cc.scores, eap(tiny_llama, PAIRS).scores, atol=1e-3)
    with torch.no_grad():
        want_clean = float(metric(tiny_llama.run(clean, logits="last").logits))
        want_corrupt = float(metric(tiny_llama.run(corrupt, logits="last").logits))
    assert cc.meta["clean_metric"] == pytest.approx(want_clean, abs=1e-4)
    assert cc.meta["corrupt_metric"] == pytest.approx(want_corrupt, abs=1e-4)


def test_extraction_faithfulness_and_json(tiny_llama, tmp_path):
    scores = eap(tiny_llama, PAIRS)
    n_all = scores.graph.n_edges
    top = extract(scores, 10)
    assert top.n_edges == 10
    kept = scores.scores[top.mask].abs()
    assert kept.min() >= scores.scores[scores.graph.valid & ~top.mask].abs().max()
    curve = faithfulness_curve(tiny_llama, PAIRS, scores, [0, 10, n_all])
    # the empty circuit is the corrupted run, the full graph the clean run
    assert curve.values[0] == pytest.approx(0.0, abs=1e-4)
    assert curve.values[-1] == pytest.approx(1.0, abs=1e-4)
    ev = evaluate_masks(tiny_llama, PAIRS, [top.mask])
    gap = ev["clean"] - ev["corrupt"]
    assert curve.values[1] == pytest.approx((float(ev["circuit"][0]) - ev["corrupt"]) / gap, abs=1e-5)
    # graph results serialise to JSON and back
    res = top.to_result()
    res.save_json(tmp_path / "circuit.json")
    back = Circuit.from_result(Result.load(tmp_path / "circuit.json"), tiny_llama)
    assert torch.equal(back.mask, top.mask)
    assert {n["id"] for n in res.meta["nodes"]} >= {e["source"] for e in res.meta["edges"]}
    full = scores.to_result()
    assert full.shape == (len(scores.graph.upstream), len(scores.graph.receivers))
    assert int(torch.isfinite(full.values).sum()) == n_all
    with pytest.raises(InputError, match="impossible"):
        extract(scores, n_all + 1)


def _reachable(graph, mask):
    """Naive search: (U, R) bool, edges on some input → logits path of ``mask``."""
    def node(r):
        name = graph.receivers[r]
        return None if name == "logits" else graph.upstream.index(".".join(name.split(".")[:2]))

    edges = [(u, r) for u, r in mask.nonzero().tolist()]
    fwd, todo = {0}, [0]
    while todo:  # nodes reached from the input
        w = todo.pop()
        for u, r in edges:
            if u == w and node(r) is not None and node(r) not in fwd:
                fwd.add(node(r))
                todo.append(node(r))
    back, changed = set(), True
    while changed:  # nodes that reach the logits
        changed = False
        for u, r in edges:
            if u not in back and (node(r) is None or node(r) in back):
                back.add(u)
                changed = True
    out = torch.zeros_like(mask)
    for u, r in edges:
        if u in fwd and (node(r) is None or node(r) in back):
            out[u, r] = True
    return out


def test_pruning_drops_only_edges_that_change_nothing(tiny_llama):
    """Dangling edges (not on an input → logits path) are found as a naive search finds them, and
    removing them leaves the patched-complement metric exactly as it was; "pruned" and "greedy"
    selections respect the budget and contain no dangling edge."""
    scores = eap(tiny_llama, PAIRS)
    graph = scores.graph
    gen = torch.Generator().manual_seed(0)
    masks = [graph.valid & (torch.rand(graph.valid.shape, generator=gen) < p) for p in (0.03, 0.08)]
    masks.append(scores.top_mask(40))
    pruned = [prune(graph, m) for m in masks]
    for m, p in zip(masks, pruned):
        assert torch.equal(p, _reachable(graph, m))
        assert (p & ~m).sum() == 0
    assert any(int(p.sum()) < int(m.sum()) for m, p in zip(masks, pruned))
    ev = evaluate_masks(tiny_llama, PAIRS, masks + pruned)
    k = len(masks)
    torch.testing.assert_close(ev["circuit"][k:], ev["circuit"][:k], atol=1e-4, rtol=1e-4)
    assert (ev["circuit"][:k] - ev["corrupt"]).abs().max() > 1e-3  # the circuits do something
    for how in ("pruned", "greedy"):
        for n in (10, 40):
            m = select(scores, n, how)
            assert 0 < int(m.sum()) <= n and torch.equal(prune(graph, m), m)
    # "pruned" keeps the top-k edges that survive pruning, for the largest k within budget
    m = select(scores, 40, "pruned")
    k_top = next(k for k in range(40, graph.n_edges + 1) if torch.equal(prune(graph, scores.top_mask(k)), m))
    assert int(prune(graph, scores.top_mask(k_top + 1)).sum()) > 40 or k_top == graph.n_edges
    with pytest.raises(InputError, match="how="):
        select(scores, 10, "best")


def test_support_ranking(tiny_llama):
    """absolute=False ranks edges by how much their clean value supports the clean behaviour:
    −score when the clean metric is the larger, +score otherwise; the selections keep that order."""
    import dataclasses

    scores = eap(tiny_llama, PAIRS)
    graph = scores.graph
    up = scores.meta["clean_metric"] >= scores.meta["corrupt_metric"]
    torch.testing.assert_close(scores.support(), -scores.scores if up else scores.scores)
    flipped = dataclasses.replace(scores, meta={**scores.meta, "clean_metric": scores.meta["corrupt_metric"],
                                                "corrupt_metric": scores.meta["clean_metric"]})
    assert scores.meta["clean_metric"] != scores.meta["corrupt_metric"]
    torch.testing.assert_close(flipped.support(), -scores.support())
    sup = scores.support()
    for n in (5, 30):
        m = scores.top_mask(n, absolute=False)
        assert int(m.sum()) == n
        assert sup[m].min() >= sup[graph.valid & ~m].max()
    # the support ranking is not the |score| ranking: both signs appear among the top |score| edges
    top_abs = scores.top_mask(30)
    assert (scores.scores[top_abs] > 0).any() and (scores.scores[top_abs] < 0).any()
    assert not torch.equal(scores.top_mask(30, absolute=False), top_abs)
    for how in ("pruned", "greedy"):
        m = select(scores, 30, how, absolute=False)
        assert 0 < int(m.sum()) <= 30 and torch.equal(prune(graph, m), m)
    # greedy growth from the logits takes the most supporting edge into the logits first
    from lmscope.localization.circuits import _greedy_order

    rank = _greedy_order(scores, absolute=False)
    first = (rank == 0).nonzero()[0].tolist()
    col = graph.receivers.index("logits")
    assert first[1] == col and sup[first[0], col] == sup[graph.valid[:, col], col].max()
    assert extract(scores, 10, "top", absolute=False).params["rank"] == "support"
    bare = dataclasses.replace(scores, meta={})
    with pytest.raises(InputError, match="absolute=True"):
        select(bare, 10, "top", absolute=False)

def _two_layer_llama():
    import transformers as tr

    from conftest import tiny_tokenizer
    from lmscope.models import Model

    torch.manual_seed(1)
    cfg = tr.LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=1, bos_token_id=2, eos_token_id=1, tie_word_embeddings=False)
    hf = tr.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.5)
    return Model(hf, tiny_tokenizer(), "tiny-2l")


def test_acdc_greedy_pruning_is_exact():
    model = _two_layer_llama()
    graph = edge_graph(model)
    order = receiver_order(graph)
    assert order[0] == len(graph.receivers) - 1 and sorted(order) == list(range(len(graph.receivers)))
    tau = 0.02
    circ = acdc(model, PAIRS, threshold=tau)
    # the reported damage is the exact KL of the circuit with its complement patched
    ev = evaluate_masks(model, PAIRS, [circ.mask], metric="kl")
    assert float(ev["circuit"][0]) == pytest.approx(circ.meta["circuit_metric"], abs=1e-6)
    assert circ.meta["n_tests"] == graph.n_edges
    # every removed edge was removed because its measured damage increase was below τ; kept ones were not
    removed = graph.valid & ~circ.mask
    assert (circ.scores[removed] < tau).all() and (circ.scores[circ.mask] >= tau).all()
    assert 0 < circ.n_edges < graph.n_edges
    empty = acdc(model, PAIRS, threshold=1e6)
    assert empty.n_edges == 0
    with pytest.raises(InputError, match="positive"):
        acdc(model, PAIRS, threshold=0)


@pytest.mark.real
def test_acdc_refuses_large_models(smollm):
    with pytest.raises(InputError, match="EAP"):
        acdc(smollm, PAIRS)


@pytest.mark.real
def test_cli_atp_and_circuit(smollm, tmp_path):
    import json

    from typer.testing import CliRunner

    from lmscope.cli.main import app

    runner = CliRunner()
    path = tmp_path / "atp.json"
    result = runner.invoke(app, ["atp", "--clean", "When Mary and John went to the store, John gave a drink to",
                                 "--corrupt", "When Mary and John went to the store, Mary gave a drink to",
                                 "--target", " Mary", "--foil", " John", "--json", str(path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["method"] == "atp" and [a["name"] for a in doc["axes"]] == ["layer", "head"]
    assert len(doc["values"]) == smollm.spec.n_layers
    path = tmp_path / "circuit.json"
    result = runner.invoke(app, ["circuit", "--task", "ioi", "--method", "eap", "--n", "4", "--edges", "200",
                                 "--json", str(path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["method"] == "eap" and 0 < len(doc["meta"]["edges"]) <= 200  # dangling edges pruned
    assert "faithfulness" in doc["meta"]
    result = runner.invoke(app, ["circuit", "--task", "ioi", "--method", "clean-corrupted", "--n", "2", "--edges",
                                 "100", "--rank", "support", "--json", str(path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["method"] == "clean-corrupted" and doc["params"]["rank"] == "support"
    # every edge of a support-ranked circuit pushes the logit difference towards clean (score < 0)
    assert doc["meta"]["edges"] and all(e["score"] < 0 for e in doc["meta"]["edges"])
    bad = runner.invoke(app, ["circuit", "--task", "ioi", "--n", "2", "--rank", "signed"])
    assert bad.exit_code == 2 and "abs or support" in bad.output
    bad = runner.invoke(app, ["circuit", "--task", "ioi", "--method", "acdc", "--n", "2"])
    assert bad.exit_code == 2 and "EAP" in bad.output
    bad = runner.invoke(app, ["flow", "--prompt", "hello there", "--threshold", "1.5"])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.output


def test_mib_circuit_scores_are_areas_of_the_faithfulness_curves(tiny_llama):
    """CMD (|score| ranking) and CPR (support ranking) are trapezoid areas of F over the fraction of edges,
    F from independent faithfulness curves; the random baseline ranks by seeded random scores; F(0) = 0
    and F(1) = 1 exactly (the corrupted and the clean run)."""
    from lmscope.localization.circuit_scores import area, circuit_scores, random_scores

    scores = eap(tiny_llama, PAIRS)
    fr = (0.0, 0.01, 0.05, 0.2, 0.5, 1.0)
    res = circuit_scores(tiny_llama, PAIRS, scores, fractions=fr, random_seed=3)
    n_all = scores.graph.n_edges
    sizes = [round(f * n_all) for f in fr]
    x = torch.tensor(sizes, dtype=torch.float64) / n_all
    rnd = random_scores(scores, 3)
    for row, sc in enumerate((scores, rnd)):
        f_abs = faithfulness_curve(tiny_llama, PAIRS, sc, sizes, absolute=True).values.double()
        f_sup = faithfulness_curve(tiny_llama, PAIRS, sc, sizes, absolute=False).values.double()
        torch.testing.assert_close(res.extras["faithfulness_abs"][row].double(), f_abs, atol=1e-5, rtol=1e-4)
        cmd = sum(float((abs(1 - f_abs[i]) + abs(1 - f_abs[i + 1])) / 2 * (x[i + 1] - x[i])) for i in range(len(x) - 1))
        cpr = sum(float((f_sup[i] + f_sup[i + 1]) / 2 * (x[i + 1] - x[i])) for i in range(len(x) - 1))
        assert float(res.values[row, 0]) == pytest.approx(cmd, abs=1e-5)
        assert float(res.values[row, 1]) == pytest.approx(cpr, abs=1e-5)
        assert float(f_abs[0]) == pytest.approx(0.0, abs=1e-4) and float(f_abs[-1]) == pytest.approx(1.0, abs=1e-4)
    assert not torch.equal(res.extras["faithfulness_abs"][0], res.extras["faithfulness_abs"][1])
    assert area([0.0, 0.5, 1.0], torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(0.75)
    with pytest.raises(InputError, match="fractions"):
        circuit_scores(tiny_llama, PAIRS, scores, fractions=(0.5, 0.1))


def test_find_circuit_mib_option(tiny_llama):
    from lmscope.localization.circuit_scores import circuit_scores
    from lmscope.localization.find_circuit import CircuitConfig, find_circuit

    res = find_circuit(tiny_llama, PAIRS, CircuitConfig(edges=10, select="top", mib=True))
    direct = circuit_scores(tiny_llama, PAIRS, eap(tiny_llama, PAIRS), how="top")
    mib = res.meta["mib"]
    assert [mib["cmd"], mib["cpr"], mib["random_cmd"], mib["random_cpr"]] == pytest.approx(
        direct.values.flatten().tolist(), abs=1e-5)
    with pytest.raises(InputError, match="ACDC"):
        CircuitConfig(method="acdc", mib=True)


def _node_of(receiver: str) -> str:
    return ".".join(receiver.split(".")[:2])


def test_node_scores_rank_edges_by_their_weaker_end(tiny_llama):
    """The top-n edges of node-derived scores are exactly the edges among the top-k nodes (input and logits
    always in), computed here by a loop over the edges, for every k, by |score| and by support; AtP's node
    scores are its noising estimates."""
    from lmscope.localization.atp import atp
    from lmscope.localization.node_circuits import atp_edge_scores, edge_scores_from_nodes

    graph = edge_graph(tiny_llama)
    g = torch.Generator().manual_seed(1)
    nodes = list(graph.upstream[1:])
    vals = torch.randn(len(nodes), generator=g).tolist()
    scores = edge_scores_from_nodes(graph, dict(zip(nodes, vals)), "nodes", tiny_llama.name, clean_metric=2.0,
                                    corrupt_metric=-1.0)
    for absolute in (True, False):
        key = {n: (abs(v) if absolute else -v) for n, v in zip(nodes, vals)}  # support: −score (clean > corrupt)
        order = sorted(nodes, key=lambda n: -key[n])
        for k in (0, 1, 3, len(nodes) // 2, len(nodes)):
            kept = set(order[:k]) | {"input", "logits"}
            want = torch.zeros_like(graph.valid)
            for u, up in enumerate(graph.upstream):
                for r, rec in enumerate(graph.receivers):
                    want[u, r] = bool(graph.valid[u, r]) and up in kept and _node_of(rec) in kept
            got = select(scores, int(want.sum()), "top", absolute)
            assert torch.equal(got, want), (absolute, k)
    u, r = graph.head_index(1, 2), graph.receivers.index("a2.h0.q")
    assert float(scores.scores[u, r]) == min(vals[u - 1], vals[nodes.index("a2.h0")], key=abs)
    with pytest.raises(InputError, match="No node score"):
        edge_scores_from_nodes(graph, {"a0.h0": 1.0}, "nodes", tiny_llama.name, clean_metric=1.0, corrupt_metric=0.0)
    res = atp(tiny_llama, PAIRS, nodes=("head", "mlp"), direction="noise", normalise=False)
    from_atp = atp_edge_scores(tiny_llama, PAIRS)
    ns = from_atp.meta["node_scores"]
    assert ns["a1.h3"] == pytest.approx(float(res["head"].values[1, 3]), abs=1e-6)
    assert ns["m2"] == pytest.approx(float(res["mlp"].values[2]), abs=1e-6)
    assert from_atp.meta["clean_metric"] == pytest.approx(res["head"].meta["clean_metric"], abs=1e-6)


def test_mib_scores_of_several_methods_in_one_pass(tiny_llama):
    """Several score sets (EAP, AtP-derived) in one call give the rows of separate calls, one random row."""
    from lmscope.localization.circuit_scores import circuit_scores
    from lmscope.localization.node_circuits import atp_edge_scores

    fr = (0.0, 0.05, 0.3, 1.0)
    a, b = eap(tiny_llama, PAIRS), atp_edge_scores(tiny_llama, PAIRS)
    both = circuit_scores(tiny_llama, PAIRS, [a, b], fractions=fr, random_seed=2)
    assert both.axes[0].labels == ("eap", "atp", "random")
    assert both.meta["circuits_checked"] < 3 * 2 * len(fr)  # the empty and the full circuit once each
    for row, sc in ((0, a), (1, b)):
        alone = circuit_scores(tiny_llama, PAIRS, sc, fractions=fr, random_seed=2)
        torch.testing.assert_close(both.values[row], alone.values[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both.values[2], alone.values[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both.values[0], both.values[1])


def test_exact_top_rescores_the_top_edges_by_single_edge_patching(tiny):
    """exact_top replaces the k largest-|score| edges' first-order scores by M(edge alone corrupted) − M(clean):
    for an edge u → logits that is the clean run with u's corrupted-minus-clean write added to the final
    residual (checked with a plain Add intervention); every other score is left as it was."""
    from lmscope.localization.circuits import exact_top
    from lmscope.localization.find_circuit import CircuitConfig, find_circuit

    clean, corrupt, up_c, up_r = _batches(tiny)
    scores = eap(tiny, PAIRS)
    graph = scores.graph
    col = graph.receivers.index("logits")
    u = int(scores.scores[:, col].abs().argmax())  # the strongest edge into the logits
    k = int((scores.scores.abs() * graph.valid >= scores.scores[u, col].abs()).sum())  # its |score| rank
    fixed = exact_top(tiny, PAIRS, scores, k)
    n = tiny.spec.n_layers
    metric = Metric("logit_diff", *PAIRS.token_ids(tiny))
    with torch.no_grad():
        base = metric(tiny.run(clean, logits="last").logits)
        moved = metric(tiny.run(clean, logits="last", interventions=[
            Add(f"blocks.{n - 1}.resid_post", up_r[u] - up_c[u])]).logits)
    assert abs(float(moved - base)) > 1e-3
    torch.testing.assert_close(fixed.scores[u, col], (moved - base).to(fixed.scores.dtype), atol=1e-4, rtol=1e-3)
    changed = (fixed.scores != scores.scores) & graph.valid
    assert int(changed.sum()) <= k and len(fixed.meta["exact_edges"]) == k
    top = torch.where(graph.valid, scores.scores.abs(), torch.tensor(-1.0)).flatten().argsort(descending=True)[:k]
    untouched = torch.ones(graph.valid.numel(), dtype=torch.bool)
    untouched[top] = False
    assert torch.equal(fixed.scores.flatten()[untouched], scores.scores.flatten()[untouched])
    # a first-order score differs from the exact effect somewhere among the re-scored edges
    assert changed.any()
    res = find_circuit(tiny, PAIRS, CircuitConfig(method="eap", edges=20, exact=5, rank="support"))
    assert "note" not in res.meta and res.params["exact_top"] == 5
    with pytest.raises(InputError, match="--exact"):
        CircuitConfig(method="atp", exact=3)
