"""Direct logit attribution sums exactly to the model's own logits; the logit lens ends at the
model's own prediction."""

from __future__ import annotations

import pytest
import torch

from lmscope.decoding import lens_top, logit_lens
from lmscope.errors import InputError, TokenError
from lmscope.localization import dla

PROMPT = "when Mary and John went to the store John gave a drink to"


def _total(res):
    return res.values.sum().item() + sum(t.sum().item() for t in res.extras.values()) + res.meta["constant"]


@pytest.mark.parametrize("by", ["layer", "head", "neuron"])
def test_dla_sums_to_logit_difference(tiny, by):
    res = dla(tiny, PROMPT, "Mary", "John", by=by)
    logits = tiny.run(PROMPT).logits[0, -1]
    own = (logits[tiny.token_id("Mary")] - logits[tiny.token_id("John")]).item()
    assert res.meta["model_value"] == pytest.approx(own, abs=1e-5)
    assert _total(res) == pytest.approx(own, abs=1e-4 * max(1.0, abs(own)))
    assert res.meta["total"] == pytest.approx(_total(res), abs=1e-5)


def test_dla_single_logit_and_granularities_agree(tiny):
    by_layer = dla(tiny, PROMPT, "Mary", by="layer")
    by_head = dla(tiny, PROMPT, "Mary", by="head")
    by_neuron = dla(tiny, PROMPT, "Mary", by="neuron", position=4)
    own = tiny.run(PROMPT).logits[0, -1, tiny.token_id("Mary")].item()
    assert _total(by_layer) == pytest.approx(own, abs=1e-4)
    assert _total(by_head) == pytest.approx(own, abs=1e-4)
    for layer in range(tiny.spec.n_layers):
        attn = by_layer.values[1 + 2 * layer].item()
        assert attn == pytest.approx(by_head.values[layer].sum().item() + by_head.extras["attn_bias"][layer].item(), abs=1e-5)
    own4 = tiny.run(PROMPT).logits[0, 4, tiny.token_id("Mary")].item()
    assert _total(by_neuron) == pytest.approx(own4, abs=1e-4)


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
