"""Direct logit attribution sums exactly to the model's own logits (before the final soft-cap on a
soft-capped model, and says so); the logit lens ends at the model's own prediction."""

from __future__ import annotations

import pytest
import torch

from conftest import logit_references, make_tiny, unembedding_output

from lmscope.decoding import lens_top, logit_lens
from lmscope.errors import InputError, TokenError
from lmscope.localization import dla

PROMPT = "when Mary and John went to the store John gave a drink to"


def _total(res):
    return res.values.sum().item() + sum(t.sum().item() for t in res.extras.values()) + res.meta["constant"]


@pytest.mark.parametrize("by", ["layer", "head", "neuron"])
def test_dla_sums_to_logit_difference(tiny, by):
    """The parts sum to the model's logit difference (before the soft-cap on Gemma 2, and the result says so)."""
    res = dla(tiny, PROMPT, "Mary", "John", by=by)
    metric, decomposed, own = logit_references(tiny, PROMPT, "Mary", "John")
    assert res.meta["metric"] == metric
    assert res.meta["model_value"] == pytest.approx(own, abs=1e-5)
    assert res.meta["metric_value"] == pytest.approx(decomposed, abs=1e-5)
    assert _total(res) == pytest.approx(decomposed, abs=1e-4 * max(1.0, abs(decomposed)))
    assert res.meta["total"] == pytest.approx(_total(res), abs=1e-5)


def test_dla_single_logit_and_granularities_agree(tiny):
    by_layer = dla(tiny, PROMPT, "Mary", by="layer")
    by_head = dla(tiny, PROMPT, "Mary", by="head")
    by_neuron = dla(tiny, PROMPT, "Mary", by="neuron", position=4)
    metric, decomposed, own = logit_references(tiny, PROMPT, "Mary")
    for res in (by_layer, by_head):
        assert res.meta["metric"] == metric and res.meta["model_value"] == pytest.approx(own, abs=1e-5)
        assert _total(res) == pytest.approx(decomposed, abs=1e-4)
    for layer in range(tiny.spec.n_layers):
        attn = by_layer.values[1 + 2 * layer].item()
        assert attn == pytest.approx(by_head.values[layer].sum().item() + by_head.extras["attn_bias"][layer].item(), abs=1e-5)
    _, decomposed4, own4 = logit_references(tiny, PROMPT, "Mary", position=4)
    assert by_neuron.meta["model_value"] == pytest.approx(own4, abs=1e-5)
    assert _total(by_neuron) == pytest.approx(decomposed4, abs=1e-4)


@pytest.mark.parametrize("by", ["layer", "head", "neuron"])
def test_dla_on_a_soft_capped_model_decomposes_the_pre_soft_cap_logit(by):
    """Gemma 2 outputs c·tanh(z / c): DLA sums exactly to z's difference, names it, and gives the output beside it."""
    model = make_tiny("gemma2")
    c = model.hf.config.final_logit_softcapping
    assert model.logit_softcap == c == 3.0
    res = dla(model, PROMPT, "Mary", "John", by=by)
    z, logits = unembedding_output(model, PROMPT)
    t, f = model.token_id("Mary"), model.token_id("John")
    assert res.meta["metric"] == "pre-soft-cap logit difference" and res.meta["softcap"] == c
    assert _total(res) == pytest.approx(float(z[-1, t] - z[-1, f]), abs=1e-5)
    assert res.meta["metric_value"] == pytest.approx(float(z[-1, t] - z[-1, f]), abs=1e-5)
    capped = c * torch.tanh(z[-1] / c)
    assert res.meta["model_value"] == pytest.approx(float(logits[-1, t] - logits[-1, f]), abs=1e-6)
    assert res.meta["model_value"] == pytest.approx(float(capped[t] - capped[f]), abs=1e-5)
    assert abs(_total(res) - res.meta["model_value"]) > 1e-3  # the two are different numbers on this model


def test_dla_bad_input(tiny_llama):
    with pytest.raises(InputError, match="foil"):
        dla(tiny_llama, PROMPT, "Mary", "Mary")
    with pytest.raises(TokenError):
        dla(tiny_llama, PROMPT, "Mary John")
    with pytest.raises(InputError, match="by="):
        dla(tiny_llama, PROMPT, "Mary", by="block")


def test_logit_lens_last_row_is_the_model(tiny):
    res = lens_top(logit_lens(tiny, PROMPT, "Mary", k=3))
    probs = tiny.run(PROMPT).logits[0, -1].softmax(-1)
    top = probs.topk(3)
    torch.testing.assert_close(res.values[-1], top.values, atol=1e-5, rtol=1e-4)
    assert res.extras["target_prob"][-1].item() == pytest.approx(probs[tiny.token_id("Mary")].item(), abs=1e-5)
    rank = int((probs > probs[tiny.token_id("Mary")]).sum()) + 1
    assert int(res.extras["target_rank"][-1]) == rank
    assert res.values.shape == (tiny.spec.n_layers + 1, 3)


def test_cli_dla_names_the_pre_soft_cap_logit(tmp_path, monkeypatch):
    """``lmscope dla`` on a soft-capped model says what its parts sum to and gives the model's output beside it."""
    import json

    from typer.testing import CliRunner

    from lmscope.cli import common, main

    model = make_tiny("gemma2")
    monkeypatch.setattr(common, "load_model", lambda spec: model)
    path = tmp_path / "dla.json"
    result = CliRunner().invoke(main.app, ["dla", "--prompt", PROMPT, "--target", "Mary", "--foil", "John",
                                           "--json", str(path)])
    assert result.exit_code == 0, result.output
    meta = json.loads(path.read_text())["meta"]
    assert meta["metric"] == "pre-soft-cap logit difference" and meta["softcap"] == 3.0
    assert f"model: {meta['metric_value']:.3f}, {meta['model_value']:.3f} after the soft-cap" in " ".join(result.output.split())
