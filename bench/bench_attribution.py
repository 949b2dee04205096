"""Benchmarks of input attribution on the default model (a 20-token IOI prompt, ' Mary' − ' John').

(a) Integrated gradients at matched quality: each side's time to reach a relative completeness error
    |Σ IG − (f(x) − f(x'))| / |f(x) − f(x')| ≤ 1%, doubling Gauss-Legendre steps from 2, with the same
    baseline x' = 0.3 × the input embeddings and 16 path points per batch. Sides: lmscope
    (``integrated_gradients(tolerance=0.01)``, its own doubling), Captum's IntegratedGradients on HF's
    ``inputs_embeds`` (its convergence delta decides), and a naive loop of single forward/backward passes.
    The attributions (T × D) of all three must agree at lmscope's final step count. Targets: at least
    as fast as Captum, ≥ 3× the loop.
(b) Occlusion of every position: lmscope (batched, with work reuse), the same sets through
    ``run_sets(reuse=False)``, and a loop of single forwards with the token replaced. Target ≥ 3×.
"""

from __future__ import annotations

import numpy as np
import torch

import lmscope
from lmscope.attribution import integrated_gradients, occlusion
from lmscope.interventions import Patch
from lmscope.models import embed_parts

from common import Measured, check, finish, interleaved, quick, ratio, record

PROMPT = "When Mary and John went to the store after a long day at work, John gave a drink to"
TARGET, FOIL = " Mary", " John"
TOLERANCE = quick(0.01, 0.05)  # relative completeness error to reach (quick: 5%)
START_STEPS, MAX_STEPS, IBS, SCALE = 2, quick(512, 32), 16, 0.3
# Attributions (T × D) at the same Gauss-Legendre nodes: lmscope keeps the last position's logits only and sums
# the quadrature in float64, Captum in float32 over all-position logits; float32 gradients through 30 layers
# agree to ~2e-7 of the largest attribution (seen 5e-7 on entries up to 2.4). 1e-4 of it (plus 1e-6 for
# near-zero entries) leaves margin and still catches a wrong baseline, node or weight (≥ 1e-2 of it).
IG_RTOL, IG_ATOL = 1e-4, 1e-6
# Occlusion scores are differences of float32 logit differences (~5) from batches of other sizes.
OCC_ATOL = 1e-3


def main() -> None:
    model = lmscope.load(progress=False)
    batch = model.encode(PROMPT)
    bench_occlusion(model, batch)
    bench_ig(model, batch)


def bench_ig(model, batch) -> None:
    t = batch.input_ids.shape[1]
    tid, fid = model.token_id(TARGET), model.token_id(FOIL)
    special = set(model.tokenizer.all_special_ids or [])
    if any(int(i) in special for i in batch.input_ids[0]):
        raise RuntimeError("The bench prompt has special tokens; lmscope's baseline keeps them, so 0.3 × embed "
                           "would not be the same baseline on every side.")
    embed, _ = embed_parts(model, batch)
    embed = embed.float().detach()
    base = SCALE * embed

    def f_of(emb):  # SmolLM2 (Llama): the embed site is exactly HF's inputs_embeds
        lg = model.hf(inputs_embeds=emb, use_cache=False).logits[:, -1]
        return lg[:, tid] - lg[:, fid]

    def ours():
        # every setting explicit (baseline, quadrature, steps, refinement): the library's defaults may change
        r = integrated_gradients(model, batch.input_ids, TARGET, FOIL, metric="logit", steps=START_STEPS,
                                 method="gausslegendre", baseline="scaled", baseline_scale=SCALE, keep_first=False,
                                 refine="double", tolerance=TOLERANCE, max_steps=MAX_STEPS, internal_batch_size=IBS,
                                 warn_above=float("inf"))
        return r.extras["granular"], r.meta["steps"], r.meta["relative_delta"]

    def naive_at(steps):
        x, w = np.polynomial.legendre.leggauss(steps)
        total = torch.zeros_like(embed[0])
        for a, wt in zip((x + 1) / 2, w / 2):
            e = (base + float(a) * (embed - base)).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f_of(e).sum(), e)
            total += float(wt) * g[0]
        return (embed - base)[0] * total

    def naive():
        with torch.no_grad():
            gap = float(f_of(embed) - f_of(base))
        steps = START_STEPS
        while True:
            attr = naive_at(steps)
            rel = abs(float(attr.sum()) - gap) / abs(gap)
            if rel <= TOLERANCE or steps * 2 > MAX_STEPS:
                return attr, steps, rel
            steps *= 2

    sides = {"lmscope": ours, "naive_loop": naive}
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        captum_note = "not installed (pip install captum)"
    else:
        captum_note = None
        ig = IntegratedGradients(f_of)

        def captum_at(steps):
            attr, delta = ig.attribute(embed, baselines=base, n_steps=steps, method="gausslegendre",
                                       internal_batch_size=IBS, return_convergence_delta=True)
            return attr[0], float(delta[0])

        def captum():
            steps = START_STEPS
            while True:
                attr, delta = captum_at(steps)
                rel = abs(delta) / abs(float(attr.sum()) - delta)  # Σ attr − delta = f(x) − f(x')
                if rel <= TOLERANCE or steps * 2 > MAX_STEPS:
                    return attr, steps, rel
                steps *= 2

        sides["captum"] = captum
    times, out = interleaved(sides, warmup=False)  # each search starts with small step counts, which warm up
    a_ours, steps, rel = out["lmscope"]
    figures = {"tokens": t, "tolerance": TOLERANCE, "start_steps": START_STEPS, "internal_batch_size": IBS,
               "baseline": f"{SCALE} × input embeddings",
               "reached": {side: {"steps": o[1], "relative_delta": o[2]} for side, o in out.items()},
               "speedup_vs_loop": ratio(times["naive_loop"], times["lmscope"])}
    why = (f"float32 gradients through 30 layers, last-position vs all-position logits, float64 vs float32 "
           f"quadrature sums: seen ~2e-7 of the largest entry; {IG_RTOL} of it catches a wrong node, weight or "
           "baseline")
    a_naive = out["naive_loop"][0] if out["naive_loop"][1] == steps else naive_at(steps)
    checks = [check(f"IG (T x D) vs naive loop at {steps} steps", a_ours, a_naive, atol=IG_ATOL, rtol=IG_RTOL,
                    why=why)]
    if captum_note:
        figures["captum"] = captum_note
    else:
        a_captum = out["captum"][0] if out["captum"][1] == steps else captum_at(steps)[0]
        checks.append(check(f"IG (T x D) vs Captum at {steps} steps", a_ours, a_captum, atol=IG_ATOL, rtol=IG_RTOL,
                            why=why))
        figures["speedup_vs_captum"] = ratio(times["captum"], times["lmscope"])
    work = {
        "lmscope": f"integrated_gradients(tolerance={TOLERANCE}): every try of the doubling ({START_STEPS}, "
                   f"{2 * START_STEPS}, ... steps), each a batched forward + backward of the path points and both "
                   "end points, last-position logits only",
        "captum": "IntegratedGradients on HF inputs_embeds, the same doubling, each try with its convergence delta "
                  "(two extra forwards); logits of every position computed",
        "naive_loop": "the same doubling, one forward + backward per path point, logits of every position computed; "
                      "f(x) and f(x') once",
    }
    notes = {side: f"{o[1]} steps, completeness error {o[2]:.2%}" for side, o in out.items()}
    record("attribution_ig", work=work, timings=times, checks=checks, notes=notes, **figures,
           target="≤ Captum's time, ≥ 3× faster than the loop")


def bench_occlusion(model, batch):
    t = batch.input_ids.shape[1]
    tid, fid = model.token_id(TARGET), model.token_id(FOIL)
    unk = model.tokenizer.unk_token_id
    special = set(model.tokenizer.all_special_ids or [])
    positions = [s for s in range(t) if int(batch.input_ids[0, s]) not in special]  # occlusion skips specials
    with torch.no_grad():
        unk_embed = model.run(torch.full_like(batch.input_ids, unk), cache=["embed"], logits="none")["embed"]
    sets = [[]] + [[Patch("embed", value=unk_embed, positions=[s])] for s in positions]

    def occ_batched():
        return occlusion(model, batch.input_ids, TARGET, FOIL, baseline="unk").values[positions]

    def occ_no_reuse():  # the sets occlusion builds (an unpatched row, then each position), without reuse
        with torch.no_grad():
            lg = model.run_sets(batch, sets, logits="last", reuse=False).logits[:, 0]
        f = lg[:, tid] - lg[:, fid]
        return f[0] - f[1:]

    def occ_loop():
        with torch.no_grad():
            lg = model.run(batch.input_ids, logits="last").logits[0]
            clean = lg[tid] - lg[fid]
            out = []
            for s in positions:
                ids = batch.input_ids.clone()
                ids[0, s] = unk
                lg = model.run(ids, logits="last").logits[0]
                out.append(clean - (lg[tid] - lg[fid]))
        return torch.stack(out)

    times, out = interleaved({"lmscope": occ_batched, "lmscope_no_reuse": occ_no_reuse, "loop": occ_loop})
    why = "differences of float32 logit differences (~5) from batches of other sizes: summation order (seen ~1e-5)"
    checks = [check("occlusion scores vs loop", out["lmscope"], out["loop"], atol=OCC_ATOL, why=why),
              check("occlusion scores without reuse vs loop", out["lmscope_no_reuse"], out["loop"], atol=OCC_ATOL,
                    why=why)]
    work = {
        "lmscope": f"occlusion(): {len(positions)} replaced positions + the unpatched prompt in batched forwards; a "
                   "set replacing position p runs positions p.. only (earlier keys/values reused); last-position "
                   "logits only",
        "lmscope_no_reuse": "the same sets through run_sets(reuse=False): one batched forward over every position; "
                            "last-position logits only",
        "loop": f"{len(positions) + 1} single forwards with the token replaced by unk; logits of every position "
                "computed, the last kept",
    }
    record("attribution_occlusion", work=work, timings=times, checks=checks, tokens=t,
           speedup_vs_loop=ratio(times["loop"], times["lmscope"]),
           speedup_no_reuse_vs_loop=ratio(times["loop"], times["lmscope_no_reuse"]), target="speedup_vs_loop >= 3")


if __name__ == "__main__":
    main()
    finish()
