"""The specs behind the app's head inspector, drag-to-patch and SAE views, against independent computations:
the head's pattern and write from the model's own sites, the patched cell against the patching sweep and the
causal cone, the SAE features against the SAE's own encoder and the exact DFA decomposition."""

from __future__ import annotations

import pytest
import torch

from lmscope import specs
from lmscope.errors import InputError

P = "when Mary and John went to the store John gave a drink to"
C = "when Mary and John went to the store Mary gave a drink to"


def test_head_inspect_on_every_family(tiny):
    m, layer, head, pos = tiny, 1, 2, 9
    res = specs.run_json(m, "head-inspect", P, {"layer": layer, "head": head, "position": pos, "k": 4})
    run = m.run(P, cache=[f"blocks.{layer}.attn.pattern", f"blocks.{layer}.attn.head_out", f"blocks.{layer}.attn_out"])
    t = run.batch.input_ids.shape[1]
    torch.testing.assert_close(res.values, run[f"blocks.{layer}.attn.pattern"][0, head].float())
    assert torch.triu(res.values, 1).abs().max() == 0  # causal
    torch.testing.assert_close(res.values.sum(-1), torch.ones(t), atol=1e-5, rtol=0)
    assert res.extras["qk"].shape == (t, t) and res.target == {"layer": layer, "head": head, "position": pos}
    # the write is the head's own: the same promoted tokens as the graph's edge inspector reads for this head
    node = specs.run_json(m, "flow-node", P, {"component": "attn_heads", "layer": layer, "position": pos, "k": 4})
    assert [x[0] for x in res.meta["write"]["promotes"]] == [x[0] for x in node.meta["promotes"][head]]
    # the OV rows: one per distinct prompt token, its top token the argmax of its direct logits
    ids = run.batch.input_ids[0].tolist()
    assert [o["token"] for o in res.meta["ov"]] == [m.decode([i]) for i in dict.fromkeys(ids)]
    assert all(res.meta["ov"][res.meta["ov_index"][j]]["token"] == m.decode([ids[j]]) for j in range(t))


def test_head_inspect_qk_is_the_score_of_embedded_tokens(tiny_llama):
    """QK on the prompt: the weights-only score q(t_i)·k(t_j)/sqrt(dh) from the normalised embeddings, computed
    here from W_E, the block's norm and the per-head W_Q, W_K."""
    m, layer, head = tiny_llama, 0, 3
    res = specs.run_json(m, "head-inspect", P, {"layer": layer, "head": head})
    ids = m.encode(P).input_ids[0]
    x = m.norm(f"blocks.{layer}.ln1", m.W_E[ids].float())
    q, k = x @ m.W_Q(layer)[head].float(), x @ m.W_K(layer)[head].float()
    torch.testing.assert_close(res.extras["qk"], q @ k.T / m.spec.d_head ** 0.5, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="head"):
        specs.run_json(m, "head-inspect", P, {"layer": 0, "head": 99})


def test_patch_cell_equals_the_sweep_and_stays_in_its_cone(tiny_llama):
    m = tiny_llama
    pair = [{"clean": P, "corrupt": C, "target": "Mary", "foil": "John"}]
    sweep = specs.run_json(m, "patch", pair, {"site": "resid_pre"})
    for layer, pos in ((0, 8), (1, 8), (2, 12)):
        res = specs.run_json(m, "patch-cell", pair, {"layer": layer, "position": pos})
        assert res.meta["effect"] == pytest.approx(float(sweep.values[layer, pos]), abs=1e-5)
        outside = torch.ones_like(res.values, dtype=torch.bool)
        outside[layer:, pos:] = False
        assert res.values[outside].abs().max() == 0  # nothing changes outside the causal cone
        assert (res.values[layer:, pos] > 0).all()   # the patched position changes from its layer on
        assert res.meta["cone"] == {"layers": [layer, m.spec.n_layers - 1], "positions": [pos, len(res.axes[1]) - 1]}
    # another position: the clean " John" (8) written over the corrupted " store" (7)
    moved = specs.run_json(m, "patch-cell", pair, {"layer": 1, "position": 8, "to_position": 7})
    assert moved.values[:1].abs().max() == 0 and moved.values[1:, :7].abs().max() == 0 and moved.values[1, 7] > 0
    plain = specs.run_json(m, "patch-cell", [{**pair[0], "foil": None}], {"layer": 1, "position": 8})
    assert plain.meta["metric"] == "log_prob"
    with pytest.raises(InputError, match="one prompt pair"):
        specs.run_json(m, "patch-cell", pair * 2, {"layer": 1})


@pytest.fixture(scope="module")
def saes(tiny_llama, tmp_path_factory):
    from lmscope.sae import make_sae, save_sae

    root, s = tmp_path_factory.mktemp("saes"), tiny_llama.spec
    return (str(save_sae(make_sae("relu", d_in=s.d_model, d_sae=24, site="blocks.1.resid_post", seed=3), root / "r")),
            str(save_sae(make_sae("relu", d_in=s.n_heads * s.d_head, d_sae=16, d_head=s.d_head,
                                  site="blocks.1.attn.z", seed=4), root / "z")))


def test_sae_prompt_is_the_saes_own_encoding(tiny_llama, saes):
    from lmscope.sae import load_sae

    m = tiny_llama
    res = specs.run_json(m, "sae-prompt", saes[0], {"prompt": P, "latents": 5, "position": 6})
    sae = load_sae(saes[0])
    acts = sae.encode(m.run(P, cache=["blocks.1.resid_post"])["blocks.1.resid_post"][0].float())  # (T, F)
    top = acts[6].topk(5)
    assert [int(x) for x in res.axes[0].labels] == top.indices.tolist()
    torch.testing.assert_close(res.values, top.values)
    torch.testing.assert_close(res.extras["by_token"], acts[:, top.indices].T)
    assert res.meta["active"] == int((acts[6] > 0).sum()) and "heads" not in res.meta["features"][0]
    lat = top.indices[0]
    logits = (sae.W_dec[lat].float() / sae.scale) @ m.W_U.float()
    assert res.meta["features"][0]["promoted"][0][0] == m.decode([int(logits.argmax())])


def test_sae_prompt_heads_of_an_attention_sae(tiny_llama, saes):
    res = specs.run_json(tiny_llama, "sae-prompt", {"saes": saes[1]}, {"prompt": P, "latents": 3})
    for f, act in zip(res.meta["features"], res.values.tolist()):
        h = f["heads"]
        assert len(h["dfa"]) == tiny_llama.spec.n_heads and sum(h["weight_share"]) == pytest.approx(1, abs=1e-5)
        assert sum(h["dfa"]) + h["constant"] == pytest.approx(h["pre_activation"], abs=1e-4)  # DFA is exact
        if act > 0:  # a ReLU latent's activation is its pre-activation
            assert act == pytest.approx(h["pre_activation"], abs=1e-4)
    with pytest.raises(InputError, match="prompt"):
        specs.run_json(tiny_llama, "sae-prompt", saes[1], {"prompt": ""})
