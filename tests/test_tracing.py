"""Causal tracing: invariants on tiny models, one cell against a hand-built noised run, bad input,
and the real model's trace on a factual prompt."""

from __future__ import annotations

import pytest
import torch

from lmscope import Add, Patch
from lmscope.errors import InputError
from lmscope.localization.tracing import (causal_trace, default_noise_subjects, embedding_std, subject_embedding_std,
                                         subject_positions)

PROMPT = "when Mary and John went to the store John gave a drink to"


def test_trace_invariants_and_one_cell(tiny):
    res = causal_trace(tiny, PROMPT, "Mary and John", samples=3, seed=5)
    subj = subject_positions(tiny, PROMPT, "Mary and John")
    assert subj == [1, 2, 3]
    L, T = tiny.spec.n_layers, len(tiny.to_str_tokens(PROMPT))
    assert res.values.shape == (L, T)
    low, high = res.meta["corrupt_prob"], res.meta["clean_prob"]
    # restoring the last block's output at the last position gives the clean prediction back
    assert float(res.values[L - 1, T - 1]) == pytest.approx(high, abs=1e-5)
    # positions before the subject were never noised: restoring them changes nothing
    torch.testing.assert_close(res.values[:, 0], torch.full((L,), low), atol=1e-5, rtol=0)
    # one cell by hand: the same seeded noise, one clean state restored, a plain run
    g = torch.Generator().manual_seed(5)
    noise = torch.zeros(3, T, tiny.spec.d_model)
    noise[:, subj] = torch.randn(3, len(subj), tiny.spec.d_model, generator=g) * res.meta["noise_std"]
    assert res.meta["noise_std"] == pytest.approx(3 * subject_embedding_std(tiny, default_noise_subjects("Mary and John")))
    clean = tiny.run(PROMPT, cache=["blocks.1.resid_post"])
    tid = res.target["target_id"]
    batch = tiny.encode(PROMPT).repeat(3)
    run = tiny.run(batch, logits="last", interventions=[
        Add("embed", vector=noise), Patch("blocks.1.resid_post", value=clean["blocks.1.resid_post"], positions=[2])])
    p = float(torch.softmax(run.logits, -1)[:, tid].mean())
    assert float(res.values[1, 2]) == pytest.approx(p, abs=1e-5)
    assert torch.allclose(res.extras["indirect_effect"], res.values - low)


def test_noise_sigma_is_three_std_of_subject_embeddings(tiny_llama):
    """Meng et al.'s σ: the std over all entries of the subjects' token embeddings, by hand from W_E."""
    m = tiny_llama
    subjects = ["Mary", "John went", "the cat"]
    ids = [m.token_id(w) for w in ("Mary", "John", "went", "the", "cat")]
    assert subject_embedding_std(m, subjects) == pytest.approx(float(m.W_E[ids].detach().std()), rel=1e-5)
    res = causal_trace(m, PROMPT, "Mary", samples=2, noise_subjects=subjects)
    assert res.meta["noise_std"] == pytest.approx(3 * float(m.W_E[ids].detach().std()), rel=1e-5)
    vocab = causal_trace(m, PROMPT, "Mary", samples=2, noise_basis="vocab")
    assert vocab.meta["noise_std"] == pytest.approx(3 * embedding_std(m)) and vocab.params["noise_basis"] == "vocab"
    with pytest.raises(InputError, match="noise_basis"):
        causal_trace(m, PROMPT, "Mary", noise_basis="other")


def test_trace_windows(tiny_llama):
    res = causal_trace(tiny_llama, PROMPT, "John gave", kind="mlp", samples=2, window=2)
    assert res.params["window"] == 2 and res.method == "causal_trace.mlp"
    assert res.axes[1].labels[8].endswith("*")  # subject tokens are marked
    full = causal_trace(tiny_llama, PROMPT, "John gave", kind="attn", samples=2, window=3)
    # a window covering every layer restores the whole attention output at that position
    assert torch.allclose(full.values[0], full.values[2])


def test_trace_bad_input(tiny_llama):
    with pytest.raises(InputError, match="does not occur"):
        causal_trace(tiny_llama, PROMPT, "Alice")
    with pytest.raises(InputError, match="kind"):
        causal_trace(tiny_llama, PROMPT, "Mary", kind="neuron")


def test_trace_real_model(smollm):
    res = causal_trace(smollm, "The capital of France is", "France", " Paris", samples=4, layers=range(0, 30, 3))
    assert res.meta["clean_prob"] > 0.2 and res.meta["corrupt_prob"] < res.meta["clean_prob"] / 2
    ie = res.extras["indirect_effect"]
    subj = res.meta["subject_positions"]
    assert subj == [3]
    # early layers: the restorable information sits at the subject; late layers: at the last token
    assert int(ie[0].argmax()) == 3 and int(ie[-1].argmax()) == 4


def test_cli_trace(tiny_llama, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from lmscope.cli import common
    from lmscope.cli.main import app

    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    out = tmp_path / "t.json"
    res = CliRunner().invoke(app, ["trace", "--prompt", PROMPT, "--subject", "Mary", "--samples", "2",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [a["name"] for a in data["axes"]] == ["layer", "position"] and data["method"] == "causal_trace.hidden"
    res = CliRunner().invoke(app, ["trace", "--prompt", PROMPT, "--subject", "Alice"])
    assert res.exit_code == 2 and "does not occur" in res.output
