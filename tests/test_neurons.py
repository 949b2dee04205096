"""Neuron analysis against brute force: the streamed top-k equals a top-k over all activations at once, the
vocabulary projection equals the gain-weighted unembedding by hand, and concept scores equal Cohen's d by hand."""

from __future__ import annotations

import torch

from lmscope.behaviors import NeuronsConfig, concept_scores, neuron_report, top_activations, vocab_projection


def test_streamed_top_k_equals_brute_force(tiny_llama):
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(3, 80, (7, 9), generator=g)
    best, where, wins = top_activations(tiny_llama, ctx, 1, k=3, batch=2, window=2)
    acts = tiny_llama.run(ctx, cache=["blocks.1.mlp.post"], logits="none")["blocks.1.mlp.post"]  # (7, 9, F)
    flat = acts.reshape(-1, acts.shape[-1]).T
    v, i = flat.topk(3, dim=1)
    torch.testing.assert_close(best, v)
    n_idx = torch.arange(flat.shape[0])[:, None]
    torch.testing.assert_close(acts[where[..., 0], where[..., 1], n_idx], best)  # the recorded places hold them
    assert (where[..., 0] * 9 + where[..., 1] == i).float().mean() > 0.95  # same places but for near-ties
    for n in (0, 5):  # windows: the activating token at index `window`, two before, two after
        r, p = where[n, 0].tolist()
        assert wins[n, 0, 2] == ctx[r, p]
        assert wins[n, 0, 1] == (ctx[r, p - 1] if p >= 1 else -1)
        assert wins[n, 0, 4] == (ctx[r, p + 2] if p + 2 < 9 else -1)


def test_vocab_projection_and_concepts_by_hand(tiny_llama):
    m = tiny_llama
    with torch.no_grad():
        want = (m.W_out(2)[[3, 7]] * m.norm_weight("ln_final")) @ m.W_U
    up, down, up_names, _ = vocab_projection(m, 2, [3, 7], k=4)
    torch.testing.assert_close(up, want.topk(4, dim=1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down, want.topk(4, dim=1, largest=False).values, atol=1e-5, rtol=1e-5)
    assert up_names[0][0] == m.decode([int(want[0].argmax())])
    texts = ["the cat sat", "a cat ran on the mat", "the dog sat", "a dog ran fast", "the cat", "big dog"]
    labels = ["cat", "cat", "dog", "dog", "cat", "dog"]
    d, classes = concept_scores(m, texts, labels, 1, batch=4)
    assert classes == ("cat", "dog")
    means = torch.stack([m.run(t, cache=["blocks.1.mlp.post"])["blocks.1.mlp.post"][0].mean(0) for t in texts])
    a, b = means[[0, 1, 4]], means[[2, 3, 5]]
    pooled = ((a.var(0) * 2 + b.var(0) * 2) / 4).sqrt()
    torch.testing.assert_close(d[0], (a.mean(0) - b.mean(0)) / pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d[1], -d[0], atol=1e-4, rtol=1e-4)


def test_report_shapes(tiny_llama, tmp_path):
    corpus = tmp_path / "c.txt"
    docs = ["the cat sat on the mat and the dog ran", "when Mary and John went to the store"] * 6
    corpus.write_text("\n\n".join(docs))
    res = neuron_report(tiny_llama, str(corpus), NeuronsConfig(layer=1, show=3, k=2, contexts=4, context=8,
                                                                window=3), progress=False)
    top = res["top_activations"]
    assert top.shape == (3, 2) and len(top.meta["contexts"]) == 3 and "[[" in top.meta["contexts"][0][0]
    assert (top.values[:, 0] >= top.values[:, 1]).all()
    assert res["vocab"].shape == (3, 2)
