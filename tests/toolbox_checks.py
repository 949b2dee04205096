"""The toolbox checks that the recurrent families share (Mamba, RWKV), each against an independent computation:
tuned lens training lowers the KL (and reports bits per byte), a probe reads the last token, CAA steering in
cached generation equals recomputing each step with the vector added, and every patching cell equals one patched
run. Each takes a tiny model of width 32."""

from __future__ import annotations

import math

import torch

from conftest import WORDS
from lmscope import Add, Patch


def check_tuned_lens(model) -> None:
    from lmscope.data import Corpus, token_contexts
    from lmscope.decoding.tuned_lens import TunedLensConfig, evaluate_lens, train_tuned_lens

    g = torch.Generator().manual_seed(0)
    corpus = Corpus("words", tuple(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())
                                   for _ in range(200)))
    lens = train_tuned_lens(model, corpus, TunedLensConfig(tokens=16 * 8 * 10, context=16, batch_contexts=8, lr=3e-2),
                            progress=False)
    ev = evaluate_lens(model, lens, contexts=token_contexts(model, corpus, 16, "heldout"))
    assert (ev.values[:-1, 1] < ev.values[:-1, 0]).all(), ev.values
    bpt = ev.meta["bytes_per_token"]
    assert bpt > 1
    assert torch.allclose(ev.extras["bits_per_byte"], ev.values / math.log(2) / bpt)


def check_probe(model) -> None:
    from lmscope.decoding.probes import probe_layers

    g = torch.Generator().manual_seed(1)
    texts, y = [], []
    for i in range(24):
        prefix = " ".join(WORDS[j] for j in torch.randint(0, 20, (4,), generator=g).tolist())
        texts.append(f"{prefix} {'cat' if i % 2 else 'dog'}")
        y.append(i % 2)
    res = probe_layers(model, texts, y, control=False)
    assert res.values.shape[0] == 3 and float(res.values[:, 0].min()) > 0.9


def check_caa_generation(model, steps: int) -> None:
    from lmscope.decoding.steering import caa_vector, generate

    vec = caa_vector(model, [("the cat sat", "the dog sat"), ("a cat ran", "a dog ran")], 1)
    assert vec.shape == (32,)
    prompts = ["the cat sat on the", "when Mary went to"]  # of different lengths: the second is padded
    gen = generate(model, prompts, vec, 1, scale=4.0, from_position=-1, max_new_tokens=steps)
    plain = generate(model, prompts, max_new_tokens=steps)
    assert not torch.allclose(gen.log_probs, plain.log_probs)
    for row, prompt in enumerate(prompts):
        ids = model.encode(prompt).input_ids[0].tolist()
        p = len(ids)
        for step in range(steps):
            delta = torch.zeros(1, len(ids), 32)
            delta[0, p - 1:] = vec
            run = model.run(torch.tensor([ids]), interventions=[Add("blocks.1.resid_pre", delta, scale=4.0)],
                            logits="last")
            assert torch.allclose(run.logits[0].float().log_softmax(-1), gen.log_probs[row, step], atol=1e-4)
            ids.append(int(gen.tokens[row, step]))


def check_patching_cells(model, site: str) -> None:
    from lmscope.localization.patching import activation_patching
    from lmscope.localization.tasks import PromptPairs

    pairs = PromptPairs(["the cat sat on the"], ["the dog sat on the"], ["mat"], ["tree"])
    res = activation_patching(model, pairs, site, normalise=False)
    clean = model.run(pairs.clean, cache=[f"blocks.{l}.{site}" for l in range(3)])
    for layer, pos in ((0, 1), (2, 4)):
        name = f"blocks.{layer}.{site}"
        run = model.run(pairs.corrupt, interventions=[Patch(name, value=clean[name], positions=[pos])], logits="last")
        want = float(run.logits[0, model.token_id("mat")] - run.logits[0, model.token_id("tree")])
        assert abs(float(res.values[layer, pos]) - want) < 1e-4
    if site == "resid_post":  # restoring the last block's output everywhere restores the clean run
        assert abs(float(res.values[2, -1]) - res.meta["clean_metric"]) < 1e-4
