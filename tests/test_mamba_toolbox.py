"""The toolbox on a tiny Mamba: logit lens (last layer = the model), tuned lens (training lowers the KL;
bits per byte), probes, CAA steering in cached generation (= recomputation), activation patching and
causal tracing of the residual, scan output, gate and block write, and DLA per block (sums to the
logit)."""

from __future__ import annotations

import pytest
import torch

from lmscope.decoding import logit_lens
from lmscope.localization.dla import dla
from lmscope.localization.tracing import causal_trace

from conftest import make_tiny
from toolbox_checks import check_caa_generation, check_patching_cells, check_probe, check_tuned_lens

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
    check_tuned_lens(mamba)


def test_probe_reads_the_last_token(mamba):
    check_probe(mamba)


def test_caa_steering_from_the_last_position_equals_recomputation(mamba):
    check_caa_generation(mamba, 4)


@pytest.mark.parametrize("site", ["resid_post", "ssm.out", "ssm.gate", "ssm_out"])
def test_patching_cells_equal_single_patched_runs(mamba, site):
    check_patching_cells(mamba, site)


@pytest.mark.parametrize("kind", ["hidden", "ssm", "gate"])
def test_causal_tracing(mamba, kind):
    res = causal_trace(mamba, "the cat sat on the", "cat", kind=kind, samples=3,
                       window=None if kind == "hidden" else 3)
    assert res.values.shape == (3, 5)
    assert res.meta["clean_prob"] != res.meta["corrupt_prob"]
    if kind in ("hidden", "ssm"):  # the last position's whole write restored: the clean prediction
        assert abs(float(res.values[-1 if kind == "hidden" else 1, -1]) - res.meta["clean_prob"]) < 1e-5
