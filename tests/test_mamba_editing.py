"""ROME on a state-space model (Sen Sharma, Atkinson and Bau 2024): the memory is each block's ``out_proj``
(keys ``ssm.y = s ⊙ SiLU(g)``, values the block's write), the layer comes from tracing the blocks' writes.
On a tiny random Mamba: C against a naive accumulation, the edit writes v* into the forward and makes the
new object the top token, undo restores every weight bit for bit, and the traced layer is the trace's peak."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from test_editing import corpus  # noqa: F401  (the tiny word corpus fixture)
from lmscope import specs
from lmscope.editing import (EditConfig, Fact, RomeSettings, choose_layer, compute_key, compute_value,
                             rank_one_update, rome, second_moment, trace_curve)
from lmscope.errors import InputError

FACT = Fact("when Mary and John went to the store", "Mary and John", " tree")
# On a tiny random Mamba little flows from one position to later ones, so the exact tests edit a subject that ends
# the prompt, with ROME's δ free (no weight decay, a wide clamp): the real test of efficacy is the trained
# mamba-facts model (bench/mamba_rome.py).
END = Fact("the dog saw Mary and John", "Mary and John", " tree")
FREE = dict(weight_decay=0.0, clamp=100.0, steps=30)


@pytest.fixture(scope="module")
def mamba():
    return make_tiny("mamba")


def test_the_memory_is_out_proj_with_keys_at_ssm_y(mamba, corpus):
    mem = mamba.memory(1)
    assert (mem.kind, mem.key_site, mem.write_kind, mem.name) == ("ssm", "blocks.1.ssm.y", "ssm_out", "blocks.1.ssm")
    assert mem.param is mamba.hf.backbone.layers[1].mixer.out_proj.weight
    with pytest.raises(InputError, match="memory kind 'mlp'"):
        mamba.memory(1, "mlp")
    # the matrix maps its keys to the block's write
    cache = mamba.run("the cat sat", cache=["blocks.1.ssm.y", "blocks.1.ssm_out"]).cache
    torch.testing.assert_close(cache["blocks.1.ssm.y"][0] @ mem.weight().T, cache["blocks.1.ssm_out"][0],
                               rtol=1e-5, atol=1e-5)
    C = second_moment(mamba, 1, tokens=400, corpus=corpus, context=16, cache=False, progress=False)
    from lmscope.data.corpus import token_contexts

    total, count = 0, 0
    for row in token_contexts(mamba, corpus, 16, max_tokens=400):
        keys = mamba.run(row, cache=[mem.key_site], logits="none")[mem.key_site][0].double()
        for t in range(1, keys.shape[0]):
            total = total + torch.outer(keys[t], keys[t])
            count += 1
    torch.testing.assert_close(C, (total / count).float(), rtol=1e-5, atol=1e-6)


def test_rome_on_out_proj_writes_the_new_object_and_undoes_exactly(mamba, corpus):
    layer = 1
    C = second_moment(mamba, layer, tokens=1500, corpus=corpus, context=16, cache=False, progress=False)
    tmpls = ("{}",)  # one template: k* is this prompt's key, so the forward must carry v* exactly
    k = compute_key(mamba, END, layer, tmpls)
    v, info = compute_value(mamba, END, layer, k, tmpls, RomeSettings(prefixes=(), **FREE))
    assert info["nll"][-1] < 0.5 * info["nll"][0]
    mem = mamba.memory(layer)
    delta = rank_one_update(mem.weight(), C, k, v)
    before = {n: p.detach().clone() for n, p in mamba.hf.named_parameters()}
    tree = mamba.token_id(" tree")
    assert int(mamba.run(END.prompt, logits="last").logits[0].argmax()) != tree
    with mamba.edit({mem.name: delta}):
        torch.testing.assert_close(mamba.memory(layer).weight() @ k, v, rtol=1e-4, atol=1e-4)
        pos = mamba.to_str_tokens(END.prompt).index("John")
        run = mamba.run(END.prompt, cache=[f"blocks.{layer}.ssm_out"], logits="last")
        torch.testing.assert_close(run[f"blocks.{layer}.ssm_out"][0, pos], v, rtol=1e-4, atol=1e-4)
        assert int(run.logits[0].argmax()) == tree
        changed = [n for n, p in mamba.hf.named_parameters() if not torch.equal(p, before[n])]
        assert changed == [f"backbone.layers.{layer}.mixer.out_proj.weight"]
    for n, p in mamba.hf.named_parameters():
        assert torch.equal(p, before[n]), n
    # the full edit (prefix-averaged key) also raises the target, and undoes exactly
    edit = rome(mamba, END, layer, C, settings=RomeSettings(prefixes=((2, 3),), **FREE))
    assert set(edit.deltas) == {f"blocks.{layer}.ssm"}
    p0 = float(mamba.run(END.prompt, logits="last").logits[0].softmax(-1)[tree])
    handle = mamba.edit(edit)
    p1 = float(mamba.run(END.prompt, logits="last").logits[0].softmax(-1)[tree])
    handle.undo()
    assert p1 > 0.5 > p0
    for n, p in mamba.hf.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_layer_comes_from_tracing_the_block_writes(mamba, corpus, tmp_path, monkeypatch):
    from lmscope.localization import causal_trace

    curve = trace_curve(mamba, FACT, samples=3)  # 3 layers: a window of 1
    full = causal_trace(mamba, FACT.prompt, FACT.subject, kind="ssm", samples=3, window=1, noise=3.0, seed=1,
                        noise_basis="vocab")
    last = mamba.to_str_tokens(FACT.prompt).index("John")
    assert curve.params["window"] == 1
    torch.testing.assert_close(curve.values, full.extras["indirect_effect"][:, last])
    assert curve.meta["layer"] == int(full.extras["indirect_effect"][:, last].argmax())
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    res = specs.run(mamba, "edit", specs.Prompt(END.prompt, END.target),
                    EditConfig(subject=END.subject, tokens=600, corpus=corpus, steps=10))
    assert res.meta["traced"] and res.meta["layer"] == choose_layer(mamba, END)
    before, after = res.values[:, 0]
    assert float(after) > float(before)
