"""Bad input to the library raises an lmscope error that names the problem and the fix, on a tiny model.

Out-of-range layers, heads and positions used to be wrapped around silently (layer 4, position 20 on a
3-layer, 13-token model became layer 1, position 7); token-id tensors were not range-checked; NaN in SAE
evaluation came back as NaN metrics. The CLI's side of the same cases is in ``test_cli_errors.py``.
"""

from __future__ import annotations

import pytest
import torch

from lmscope import Patch
from lmscope.decoding import logit_lens
from lmscope.decoding.projections import common_tokens, ov_circuit
from lmscope.decoding.tuned_lens import TunedLens
from lmscope.errors import InputError, RangeError, SiteError, TokenError
from lmscope.localization import dla
from lmscope.localization.flow import flow
from lmscope.localization.patching import activation_patching
from lmscope.localization.tasks import PromptPairs
from lmscope.localization.tracing import causal_trace
from lmscope.sae import make_sae
from lmscope.sae.evaluation import evaluate_activations
from lmscope.sites import resolve_count, resolve_layers, resolve_position, resolve_positions

PROMPT = "when Mary and John went to the store John gave a drink to"     # 13 tokens for the tiny models
PAIRS = PromptPairs([PROMPT], ["when John and Mary went to the store Mary gave a drink to"], ["Mary"], ["John"])
T = 13


def test_resolvers():
    assert resolve_layers(None, 3) == [0, 1, 2]
    assert resolve_layers([0, -1], 3) == [0, 2]
    assert resolve_positions([-13, 12], T) == [0, 12]
    assert resolve_position(None, T) == 12
    with pytest.raises(RangeError, match=r"Layer 4 is out of range: the model has 3 layers \(0\.\.2;"):
        resolve_layers([4], 3)
    with pytest.raises(RangeError, match=r"Layer -4 is out of range"):
        resolve_layers([-4], 3)
    with pytest.raises(RangeError, match=r"Position 20 is out of range: the prompt has 13 tokens \(0\.\.12;"):
        resolve_positions([20], T)
    with pytest.raises(RangeError, match="not an integer"):
        resolve_position(1.5, T)
    with pytest.raises(RangeError, match="at least one layer"):
        resolve_layers([], 3)
    with pytest.raises(RangeError, match="from 1 to 80"):
        resolve_count(0, 80, "top tokens")
    # one error for both kinds of handler that existed before
    assert issubclass(RangeError, SiteError) and issubclass(RangeError, InputError)


def test_activation_patching_does_not_wrap(tiny_llama):
    assert len(tiny_llama.to_str_tokens(PROMPT)) == T and tiny_llama.spec.n_layers == 3
    with pytest.raises(RangeError, match="Layer 4 is out of range"):
        activation_patching(tiny_llama, PAIRS, "resid_pre", layers=[4], positions=[0])
    with pytest.raises(RangeError, match="Position 20 is out of range.*13 tokens"):
        activation_patching(tiny_llama, PAIRS, "resid_pre", layers=[1], positions=[20])
    with pytest.raises(RangeError, match="Head 7 is out of range"):
        activation_patching(tiny_llama, PAIRS, "z", heads=[7])
    # negative indices count from the end: the same cell as the positive ones
    neg = activation_patching(tiny_llama, PAIRS, "resid_pre", layers=[-2], positions=[-6])
    pos = activation_patching(tiny_llama, PAIRS, "resid_pre", layers=[1], positions=[7])
    assert neg.axes[0].labels == ("1",) and neg.axes[1].labels == pos.axes[1].labels
    assert torch.equal(neg.values, pos.values)


def test_causal_trace_does_not_wrap(tiny_llama):
    with pytest.raises(RangeError, match="Layer 3 is out of range"):
        causal_trace(tiny_llama, PROMPT, "Mary", samples=1, layers=[3])
    for window in (0, -3, 4):
        with pytest.raises(InputError, match=r"window=.*between 1 and 3"):
            causal_trace(tiny_llama, PROMPT, "Mary", kind="mlp", samples=1, window=window)


def test_run_sets_positions_out_of_range(tiny_llama):
    """The prefix-reuse planner normalised positions with % T; now it refuses them."""
    cache = tiny_llama.run(PROMPT, cache=["blocks.1.resid_pre"]).cache
    value = cache["blocks.1.resid_pre"]
    with pytest.raises(RangeError, match="Position 20 is out of range"):
        tiny_llama.run_sets(PROMPT, [[Patch("blocks.1.resid_pre", value=value, positions=[20])]])
    with pytest.raises(InputError, match="out of range"):
        tiny_llama.run_sets(PROMPT, [[Patch("blocks.1.resid_pre", value=value, positions=[20])]], reuse=False)
    # in range, negative: the same as the positive position
    a = tiny_llama.run_sets(PROMPT, [[Patch("blocks.1.resid_pre", value=value * 0, positions=[-1])]]).logits
    b = tiny_llama.run_sets(PROMPT, [[Patch("blocks.1.resid_pre", value=value * 0, positions=[12])]]).logits
    torch.testing.assert_close(a, b)


def test_token_id_tensors_are_checked(tiny_llama):
    v = tiny_llama.W_E.shape[0]
    good = torch.tensor([[2, 5, 9]])
    assert tiny_llama.run(good, logits="last").logits.shape == (1, v)
    assert tiny_llama.encode(good.int()).input_ids.dtype == torch.long
    with pytest.raises(TokenError, match=rf"Token id {v} is outside the vocabulary .*\(0\.\.{v - 1}\)"):
        tiny_llama.run(torch.tensor([[2, v]]))
    with pytest.raises(TokenError, match="Token id -1 is outside"):
        tiny_llama.encode(torch.tensor([3, -1]))
    with pytest.raises(InputError, match="integer tensor"):
        tiny_llama.encode(torch.tensor([[2.0, 5.0]]))
    with pytest.raises(InputError, match="integer tensor"):
        tiny_llama.encode(torch.ones(1, 2, 3, dtype=torch.long))


def test_positions_and_counts_of_single_prompt_methods(tiny_llama):
    with pytest.raises(RangeError, match="Position 13 is out of range"):
        dla(tiny_llama, PROMPT, "Mary", position=13)
    with pytest.raises(RangeError, match="Position -14 is out of range"):
        logit_lens(tiny_llama, PROMPT, position=-14)
    with pytest.raises(RangeError, match="Position 99 is out of range"):
        flow(tiny_llama, PROMPT, position=99)
    with pytest.raises(RangeError, match="from 1 to"):
        logit_lens(tiny_llama, PROMPT, k=0)
    with pytest.raises(RangeError, match="from 1 to"):
        logit_lens(tiny_llama, PROMPT, k=10**6)
    with pytest.raises(RangeError, match="from 1 to"):
        ov_circuit(tiny_llama, 1, 1, ["Mary"], k=-1)


def test_default_projection_tokens_are_single_tokens(tiny_llama):
    """The default inputs of the OV/QK read-outs leave out words that split or are unknown."""
    ids = common_tokens(tiny_llama)
    assert ids and all(tiny_llama.tokenizer.unk_token_id != i for i in ids)
    assert ov_circuit(tiny_llama, 1, 1).axes[0].labels == tuple(tiny_llama.decode([i]) for i in ids)
    with pytest.raises(InputError, match="give the input tokens explicitly"):
        common_tokens(tiny_llama, [" zzzq xy"])


def test_sae_evaluation_is_never_silently_nan():
    sae = make_sae("relu", d_in=8, d_sae=16)
    x = torch.randn(64, 8)
    ok = evaluate_activations(sae, [x])
    assert torch.isfinite(ok.values[:3]).all()
    # metrics that need a model are named as not computed, not left as bare NaN
    assert set(ok.meta["undefined"]) == {"ce_clean", "ce_sae", "ce_zero", "ce_recovered", "delta_ce"}
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(InputError, match="activations to evaluate on hold NaN"):
        evaluate_activations(sae, [bad])
    with torch.no_grad():
        sae.W_dec.fill_(float("inf"))
    with pytest.raises(InputError, match="SAE's latents or reconstruction hold NaN"):
        evaluate_activations(sae, [x])


def test_unreadable_tuned_lens(tmp_path, tiny_llama):
    lens = TunedLens.for_model(tiny_llama)
    folder = lens.save(tmp_path / "lens")
    assert sorted(p.name for p in folder.iterdir()) == ["tuned_lens.json", "tuned_lens.safetensors"]  # no temp files
    TunedLens.load(folder, tiny_llama)
    (folder / "tuned_lens.json").write_text("{not json")
    with pytest.raises(InputError, match="is not a readable tuned lens.*lmscope lens train"):
        TunedLens.load(folder)
    lens.save(folder)
    (folder / "tuned_lens.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="is not a readable tuned lens"):
        TunedLens.load(folder)
