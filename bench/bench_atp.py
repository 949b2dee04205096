"""Benchmark: AtP over all heads (and MLPs) of the default model for IOI prompt pairs, against one
plain forward + backward of the same clean prompts (with parameter gradients, as in training, and
without: the gradient at the activations only, which is all AtP needs). Target: AtP ≤ 3× the
forward + backward.
Also times AtP* (QK fix + GradDrop, about L extra backward passes) and the information-flow
route of a 64-token prompt (target: seconds).

``ranking()`` is the measurement behind issue 4's check "AtP and exact head patching have Spearman
correlation ≥ 0.7 on ≥ 50 IOI prompts": the exact noising effect of every head (its ``attn.z``
patched at every position, :func:`exact_head_effects`, the full layer × head sweep) against AtP's
estimate of the same quantity; it records the correlation and the heads with the largest exact
effects. Slow (minutes): BENCH_IOI_PROMPTS sets the number of prompts (default 50);
BENCH_ATP_PARTS=timing or ranking runs one part only.
"""

from __future__ import annotations

import os
import time

import torch

import lmscope
from lmscope.localization.atp import atp, atp_star, encode_pairs, exact_head_effects, spearman
from lmscope.localization.flow import flow
from lmscope.localization.metrics import Metric
from lmscope.localization.tasks import ioi

from common import best_time, record


def timing(model, n_prompts: int = 4) -> None:
    pairs = ioi(model, n_prompts, seed=0)
    clean, _ = encode_pairs(model, pairs)
    targets, foils = pairs.token_ids(model)
    metric = Metric("logit_diff", targets, foils)

    def forward_backward_full():
        model.hf.zero_grad(set_to_none=True)
        out = model.forward(clean)
        metric(out.logits[:, -1]).backward()
        model.hf.zero_grad(set_to_none=True)

    def forward_backward_acts():  # backward to the activations only (no parameter gradients), as AtP does
        run = model.run(clean, cache=["embed"], grad=True, logits="last")
        torch.autograd.grad(metric(run.logits), [run.cache["embed"]])

    def run_atp():
        return atp(model, pairs, nodes=("head",), batch_size=n_prompts, direction="noise")

    def run_atp_nodes():
        return atp(model, pairs, nodes=("head", "mlp", "neuron", "resid"), batch_size=n_prompts,
                   direction="noise")

    # interleaved rounds (the machine is shared): best of each, and the ratio within each round
    t_fb, t_fba, t_atp, ratios, ratios_a = [], [], [], [], []
    for _ in range(5):
        t_fb.append(best_time(forward_backward_full, repeats=1, warmup=0 if t_fb else 1))
        t_fba.append(best_time(forward_backward_acts, repeats=1, warmup=0 if t_fba else 1))
        t_atp.append(best_time(run_atp, repeats=1, warmup=0 if t_atp else 1))
        ratios.append(t_atp[-1] / t_fb[-1])
        ratios_a.append(t_atp[-1] / t_fba[-1])
    t_all = best_time(run_atp_nodes, repeats=2)
    t_star = best_time(lambda: atp_star(model, pairs, nodes=("head",), batch_size=n_prompts, direction="noise"), repeats=1, warmup=0)
    tokens = int(clean.input_ids.shape[1])
    fb, fba, at = min(t_fb), min(t_fba), min(t_atp)
    record("atp", prompts=n_prompts, tokens=tokens, forward_backward_s=round(fb, 3), atp_heads_s=round(at, 3),
           ratio=round(at / fb, 2), ratio_median_of_rounds=round(sorted(ratios)[len(ratios) // 2], 2),
           forward_backward_activations_s=round(fba, 3), ratio_vs_activations=round(at / fba, 2),
           ratio_vs_activations_median=round(sorted(ratios_a)[len(ratios_a) // 2], 2),
           atp_all_nodes_s=round(t_all, 3), atp_all_ratio=round(t_all / fb, 2),
           atp_star_heads_s=round(t_star, 3), atp_star_ratio=round(t_star / fb, 2), target="ratio <= 3")

    ids = model.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 8)).input_ids[0, :64]
    prompt = model.decode(ids)
    t_flow = best_time(lambda: flow(model, prompt), repeats=2)
    record("flow", tokens=64, layers=model.spec.n_layers, flow_s=round(t_flow, 3), target="seconds")


def ranking(model, n_prompts: int = 50) -> None:
    pairs = ioi(model, n_prompts, seed=0)
    t0 = time.perf_counter()
    exact = exact_head_effects(model, pairs, batch_size=10, direction="noise")
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = atp(model, pairs, nodes=("head",), batch_size=10, direction="noise", normalise=False)["head"]
    t_atp = time.perf_counter() - t0
    star = atp_star(model, pairs, nodes=("head",), batch_size=10, direction="noise", normalise=False)
    rho = spearman(est.values, exact.values)
    rho_abs = spearman(est.values.abs(), exact.values.abs())
    # AtP*: the QK-fixed query/key/value estimates, and GradDrop magnitudes, against |exact|
    rho_star = spearman(star["head"].values, exact.values.abs())
    s = model.spec
    order = exact.values.flatten().abs().argsort(descending=True)[:12].tolist()
    top = [{"head": f"L{i // s.n_heads}.H{i % s.n_heads}", "exact": round(float(exact.values.flatten()[i]), 4),
            "atp": round(float(est.values.flatten()[i]), 4)} for i in order]
    record("atp_spearman", prompts=n_prompts, task="ioi ABC, noising, attn.z of one head at every position",
           metric="logit_diff", clean_metric=round(est.meta["clean_metric"], 4),
           corrupt_metric=round(est.meta["corrupt_metric"], 4), spearman=round(rho, 4),
           spearman_abs=round(rho_abs, 4), spearman_graddrop_vs_abs_exact=round(rho_star, 4),
           exact_sweep_s=round(t_exact, 1), atp_s=round(t_atp, 1), top_heads_exact=top, target="spearman >= 0.7")


def main() -> None:
    torch.manual_seed(0)
    model = lmscope.load(progress=False)
    parts = os.environ.get("BENCH_ATP_PARTS", "timing,ranking").split(",")
    if "timing" in parts:
        timing(model)
    if "ranking" in parts:
        ranking(model, int(os.environ.get("BENCH_IOI_PROMPTS", "50")))


if __name__ == "__main__":
    main()
