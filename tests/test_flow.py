"""Information-flow routes: importances against a naive loop over parts, normalisation, the
thresholded graph's structure, and the IOI route on the real model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmscope.errors import InputError
from lmscope.localization.flow import EPS, flow, flow_contributions

PROMPT = "when Mary and John went to the store John gave a drink to"
IOI = "When Mary and John went to the store, John gave a drink to"


def test_contributions_are_normalised(tiny):
    c = flow_contributions(tiny, PROMPT)
    n, t = c.attn.shape[:2]
    assert (c.attn >= 0).all() and (c.attn_resid > 0).all() and (c.mlp > 0).all() and (c.mlp_resid > 0).all()
    torch.testing.assert_close(c.attn.sum(dim=(2, 3)) + c.attn_resid, torch.ones(n, t))
    torch.testing.assert_close(c.mlp + c.mlp_resid, torch.ones(n, t))
    future = ~torch.ones(t, t, dtype=torch.bool).tril()
    assert (c.attn[:, future] == 0).all()


def test_contributions_against_a_naive_loop(tiny_llama):
    """Recompute one node's importances from the model's weights with explicit loops."""
    model = tiny_llama
    layer, i = 1, 6
    c = flow_contributions(model, PROMPT)
    pre = f"blocks.{layer}."
    run = model.run(PROMPT, cache=[pre + s for s in ("attn.v", "attn.pattern", "resid_pre", "resid_mid",
                                                     "mlp_out", "resid_post")])
    w_o = model.W_O(layer).detach()
    y = run[pre + "resid_mid"][0, i]
    parts, keys = [], []
    for j in range(i + 1):
        for h in range(model.spec.n_heads):
            parts.append(run[pre + "attn.pattern"][0, h, i, j] * (run[pre + "attn.v"][0, j, h] @ w_o[h]))
            keys.append((j, h))
    parts.append(run[pre + "resid_pre"][0, i])
    prox = torch.stack([max(EPS, float(y.abs().sum() - (y - z).abs().sum())) * torch.ones(()) for z in parts])
    imp = prox / prox.sum()
    for (j, h), v in zip(keys, imp[:-1]):
        assert float(c.attn[layer, i, j, h]) == pytest.approx(float(v), abs=1e-5)
    assert float(c.attn_resid[layer, i]) == pytest.approx(float(imp[-1]), abs=1e-5)
    post = run[pre + "resid_post"][0, i]
    m_parts = [run[pre + "mlp_out"][0, i], y]
    m_prox = torch.tensor([max(EPS, float(post.abs().sum() - (post - z).abs().sum())) for z in m_parts])
    assert float(c.mlp[layer, i]) == pytest.approx(float(m_prox[0] / m_prox.sum()), abs=1e-5)


def test_route_graph_structure(tiny_llama):
    tau = 0.04
    res = flow(tiny_llama, PROMPT, threshold=tau)
    nodes = {n["id"]: n for n in res.meta["nodes"]}
    edges = res.meta["edges"]
    t = len(res.meta["tokens"])
    start = f"I{tiny_llama.spec.n_layers - 1}_{t - 1}"
    assert start in nodes
    assert all(e["source"] in nodes and e["target"] in nodes for e in edges)
    assert all(e["weight"] > tau for e in edges)
    # renormalised: the kept incoming edges of every node sum to 1
    incoming: dict[str, float] = {}
    for e in edges:
        incoming[e["target"]] = incoming.get(e["target"], 0.0) + e["weight"]
    assert all(abs(v - 1) < 1e-5 for v in incoming.values())
    # every node is reached from the start node
    children: dict[str, list] = {}
    for e in edges:
        children.setdefault(e["target"], []).append(e["source"])
    seen, stack = {start}, [start]
    while stack:
        for s in children.get(stack.pop(), []):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    assert seen == set(nodes)
    assert any(n["component"] == "embed" for n in nodes.values())
    assert res.values.shape == (len(edges),)
    # a route into an earlier position only has nodes at or before it
    early = flow(tiny_llama, PROMPT, position=3, threshold=tau)
    assert max(n["position"] for n in early.meta["nodes"]) == 3


def test_flow_bad_input(tiny_llama):
    for tau in (0, 1, -0.1, 1.5):
        with pytest.raises(InputError, match="between 0 and 1"):
            flow(tiny_llama, PROMPT, threshold=tau)
    with pytest.raises(InputError, match="out of range"):
        flow(tiny_llama, PROMPT, position=40)


@pytest.mark.real
def test_ioi_route_reaches_mary(smollm, tmp_path):
    from lmscope.cli.main import app

    path = tmp_path / "flow.json"
    result = CliRunner().invoke(app, ["flow", "--prompt", IOI, "--json", str(path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert doc["method"] == "flow" and doc["axes"][0]["name"] == "edge"
    tokens = doc["meta"]["tokens"]
    mary = [i for i, tok in enumerate(tokens) if tok == " Mary"]
    assert mary
    reached = {n["position"] for n in doc["meta"]["nodes"]}
    assert set(mary) <= reached
    # and through an attention edge from Mary's position into the last position
    last = len(tokens) - 1
    assert any(e["kind"] == "attn" and e["target"].endswith(f"_{last}") and e["source"].endswith(f"_{mary[0]}")
               for e in doc["meta"]["edges"])


@pytest.mark.real
def test_flow_on_64_tokens_of_the_real_model(smollm):
    # speed is measured in bench/bench_atp.py (information-flow routes, 64 tokens); here only the graph
    ids = smollm.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 8)).input_ids[0, :64]
    res = flow(smollm, smollm.decode(ids))
    assert len(res.meta["tokens"]) == 64
    pos = {n["id"]: n["position"] for n in res.meta["nodes"]}
    edges = res.meta["edges"]
    assert all(pos[e["source"]] <= pos[e["target"]] for e in edges)  # causal
    incoming: dict[str, float] = {}
    for e in edges:
        incoming[e["target"]] = incoming.get(e["target"], 0.0) + e["weight"]
    assert incoming and all(abs(v - 1) < 1e-4 for v in incoming.values())
