"""SAEs on the default model's residual stream (layer 15), CI-sized (~2-3 min on 2 quiet cores).

The issue's claims, at matched sparsity (each architecture's knob set so that L0 lands near 32): Gated, TopK and
JumpReLU SAEs explain more variance than the ReLU SAE, and the ReLU SAE shrinks its reconstructions (relative
reconstruction bias γ < 1) while the Gated SAE's γ is closer to 1. Of the ~40k harvested tokens (stored in
context order) the last 4096 rows, about the last 32 contexts, are held out; all four SAEs train on the same rows
in the same order.

SmolLM2 has "massive activations": a few early-position tokens (about 1 in 5,000 here) reach ~100× the median
residual norm and carry most of the variance, so unfiltered FVE and the input scale are about those tokens alone.
They are left out (norm above 10× the median), as first positions are; the test checks that this is what they are.
"""

from __future__ import annotations

import pytest
import torch

from lmscope.data import harvest, token_contexts
from lmscope.sae import TensorSource, TrainConfig, evaluate_activations, make_sae, train
from lmscope.sae.evaluation import METRICS

pytestmark = pytest.mark.real

SITE = "blocks.15.resid_post"
TOKENS = 40_000
HELD = 4096
D_SAE = 1152
TARGET_L0 = 32
# Sparsity knobs calibrated once (same data, seed and budget) to land near L0 = 32.
KNOBS = {"relu": {"l1": 10.0}, "gated": {"l1": 4.0}, "topk": {"k": TARGET_L0},
         "jumprelu": {"l0": 2.0, "threshold_init": 0.85}}


@pytest.fixture(scope="module")
def layer15(smollm, tmp_path_factory):
    ctx = token_contexts(smollm, "default", context=128, split="train", max_tokens=TOKENS * 128 // 127 + 256)
    store = harvest(smollm, SITE, ctx, tmp_path_factory.mktemp("sae_real") / "l15", n_tokens=TOKENS,
                    progress=False)
    raw = TensorSource.from_store(store).acts
    kept = TensorSource.from_store(store, max_norm_ratio=10).acts
    return raw, kept


@pytest.fixture(scope="module")
def pareto(layer15, smollm):
    _, acts = layer15
    source, held = TensorSource(acts[:-HELD]), acts[-HELD:]
    cfg = TrainConfig(tokens=4 * len(source) // 256 * 256, batch_size=256, lr=1e-3, checkpoint_every=0,
                      init_sample=8192)
    rows = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 2-thread matmuls spin badly on a shared 2-core machine; fixes the summation order
    try:
        for arch, knob in KNOBS.items():
            sae = make_sae(arch, d_in=smollm.spec.d_model, d_sae=D_SAE, site=SITE, model=smollm.name, seed=0, **knob)
            train(sae, source, cfg, progress=False)
            rows[arch] = dict(zip(METRICS, evaluate_activations(sae, [held]).values.tolist()))
    finally:
        torch.set_num_threads(threads)
    print(f"\nlayer-15 resid_post, {len(source)} training rows x 4 epochs, d_sae {D_SAE}, {HELD} held-out rows")
    print(f"{'arch':9} {'L0':>6} {'FVE':>6} {'gamma':>6} {'gamma_c':>7} {'dead':>6}")
    for arch, r in rows.items():
        print(f"{arch:9} {r['l0']:6.1f} {r['fve']:6.3f} {r['gamma']:6.3f} {r['gamma_centred']:7.3f} "
              f"{r['dead_frac']:6.3f}")
    return rows


def test_massive_activations_are_few_and_dominate_the_variance(layer15):
    raw, kept = layer15
    dropped = len(raw) - len(kept)
    assert 0 < dropped < 0.002 * len(raw)
    var_raw = (raw - raw.mean(0)).pow(2).sum()
    var_kept = (kept - kept.mean(0)).pow(2).sum()
    assert var_kept < 0.5 * var_raw          # a handful of tokens hold most of the variance


def test_pareto_at_matched_l0(pareto):
    for arch, r in pareto.items():
        assert abs(r["l0"] - TARGET_L0) <= 0.25 * TARGET_L0, (arch, r["l0"])
        assert r["dead_frac"] < 0.2, (arch, r["dead_frac"])
    relu = pareto["relu"]
    for arch in ("gated", "topk", "jumprelu"):
        assert pareto[arch]["fve"] > relu["fve"] + 0.05, (arch, pareto[arch]["fve"], relu["fve"])


def test_relu_shrinks_and_gated_does_not(pareto):
    relu, gated = pareto["relu"], pareto["gated"]
    for gamma in ("gamma", "gamma_centred"):
        assert relu[gamma] < 1, (gamma, relu[gamma])
        assert abs(gated[gamma] - 1) < abs(relu[gamma] - 1), (gamma, gated[gamma], relu[gamma])
