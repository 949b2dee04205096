"""The toolbox on a tiny Mamba: logit lens (last layer = the model), tuned lens (training lowers the KL;
bits per byte), probes, CAA steering in cached generation (= recomputation), activation patching and
causal tracing of the residual, scan output, gate and block write, and DLA per block (sums to the
logit)."""

from __future__ import annotations

import math

import pytest
import torch

from lmscope import Add, Patch
from lmscope.data import token_contexts
from lmscope.decoding import logit_lens
from lmscope.decoding.probes import probe_layers
from lmscope.decoding.steering import caa_vector, generate
from lmscope.decoding.tuned_lens import TunedLensConfig, evaluate_lens, train_tuned_lens
from lmscope.localization.dla import dla
from lmscope.localization.patching import activation_patching
from lmscope.localization.tasks import PromptPairs
from lmscope.localization.tracing import causal_trace

from conftest import WORDS, make_tiny

PROMPT = "the cat sat on the mat and the dog ran to the"


@pytest.fixture(scope="module")
def mamba():
    return make_tiny("mamba")


def test_logit_lens_last_layer_is_the_model_and_dla_adds_up(mamba):
    lens = logit_lens(mamba, PROMPT, k=3)
    logits = mamba.run(PROMPT, logits="last").logits[0]
    assert lens.values.shape[0] == mamba.spec.n_layers + 1
    top = torch.softmax(logits.float(), -1).topk(3)
    assert torch.allclose(lens.extras["top_probs"][-1, -1], top.values, atol=1e-5)
    assert lens.extras["top_ids"][-1, -1].tolist() == top.indices.tolist()
    res = dla(mamba, PROMPT, "mat", "dog")
    assert res.axes[0].labels == ("embed", "L0.ssm", "L1.ssm", "L2.ssm")
    diff = float(logits[mamba.token_id("mat")] - logits[mamba.token_id("dog")])
    assert abs(res.meta["total"] - diff) < 1e-4 and abs(res.meta["metric_value"] - diff) < 1e-4


def test_tuned_lens_trains_and_reports_bits_per_byte(mamba):
    from lmscope.data import Corpus

    g = torch.Generator().manual_seed(0)
    corpus = Corpus("words", tuple(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())
                                   for _ in range(200)))
    lens = train_tuned_lens(mamba, corpus, TunedLensConfig(tokens=16 * 8 * 10, context=16, batch_contexts=8, lr=3e-2),
                            progress=False)
    ev = evaluate_lens(mamba, lens, contexts=token_contexts(mamba, corpus, 16, "heldout"))
    assert (ev.values[:-1, 1] < ev.values[:-1, 0]).all(), ev.values
    bpt = ev.meta["bytes_per_token"]
    assert bpt > 1
    assert torch.allclose(ev.extras["bits_per_byte"], ev.values / math.log(2) / bpt)


def test_probe_reads_the_last_token(mamba):
    g = torch.Generator().manual_seed(1)
    texts, y = [], []
    for i in range(24):
        prefix = " ".join(WORDS[j] for j in torch.randint(0, 20, (4,), generator=g).tolist())
        texts.append(f"{prefix} {'cat' if i % 2 else 'dog'}")
        y.append(i % 2)
    res = probe_layers(mamba, texts, y, control=False)
    assert res.values.shape[0] == 3 and float(res.values[:, 0].min()) > 0.9


def test_caa_steering_from_the_last_position_equals_recomputation(mamba):
    vec = caa_vector(mamba, [("the cat sat", "the dog sat"), ("a cat ran", "a dog ran")], 1)
    assert vec.shape == (32,)
    prompts = ["the cat sat on the", "when Mary went to"]
    gen = generate(mamba, prompts, vec, 1, scale=4.0, from_position=-1, max_new_tokens=4)
    plain = generate(mamba, prompts, max_new_tokens=4)
    assert not torch.allclose(gen.log_probs, plain.log_probs)
    for row, prompt in enumerate(prompts):
        ids = mamba.encode(prompt).input_ids[0].tolist()
        p = len(ids)
        for step in range(4):
            delta = torch.zeros(1, len(ids), 32)
            delta[0, p - 1:] = vec
            run = mamba.run(torch.tensor([ids]), interventions=[Add("blocks.1.resid_pre", delta, scale=4.0)],
                            logits="last")
            assert torch.allclose(run.logits[0].float().log_softmax(-1), gen.log_probs[row, step], atol=1e-4)
            ids.append(int(gen.tokens[row, step]))


@pytest.mark.parametrize("site", ["resid_post", "ssm.out", "ssm.gate", "ssm_out"])
def test_patching_cells_equal_single_patched_runs(mamba, site):
    pairs = PromptPairs(["the cat sat on the"], ["the dog sat on the"], ["mat"], ["tree"])
    res = activation_patching(mamba, pairs, site, normalise=False)
    clean = mamba.run(pairs.clean, cache=[f"blocks.{l}.{site}" for l in range(3)])
    for layer, pos in ((0, 1), (2, 4)):
        name = f"blocks.{layer}.{site}"
        run = mamba.run(pairs.corrupt, interventions=[Patch(name, value=clean[name], positions=[pos])], logits="last")
        want = float(run.logits[0, mamba.token_id("mat")] - run.logits[0, mamba.token_id("tree")])
        assert abs(float(res.values[layer, pos]) - want) < 1e-4
    if site == "resid_post":  # restoring the last block's output everywhere restores the clean run
        assert abs(float(res.values[2, -1]) - res.meta["clean_metric"]) < 1e-4


@pytest.mark.parametrize("kind", ["hidden", "ssm", "gate"])
def test_causal_tracing(mamba, kind):
    res = causal_trace(mamba, "the cat sat on the", "cat", kind=kind, samples=3,
                       window=None if kind == "hidden" else 3)
    assert res.values.shape == (3, 5)
    assert res.meta["clean_prob"] != res.meta["corrupt_prob"]
    if kind in ("hidden", "ssm"):  # the last position's whole write restored: the clean prediction
        assert abs(float(res.values[-1 if kind == "hidden" else 1, -1]) - res.meta["clean_prob"]) < 1e-5
