"""Benchmarks of input attribution on the default model.

(a) Integrated gradients, 64 Gauss-Legendre steps, a 20-token prompt: lmscope (steps in batches of
    16) against Captum's IntegratedGradients on the same embeddings, baseline and target (when
    captum is installed) and a naive loop of single forward/backward passes. Targets: at least as
    fast as Captum, ≥ 3× the loop; same attributions (max abs difference reported).
(b) Occlusion over all positions: lmscope's batched run against a loop of single forwards with the
    token replaced. Target ≥ 3×.
"""

from __future__ import annotations

import time

import numpy as np
import torch

import lmscope
from lmscope.attribution import integrated_gradients, occlusion
from lmscope.models import embed_parts

from common import interleaved_best, record

PROMPT = "When Mary and John went to the store after a long day at work, John gave a drink to"
TARGET, FOIL = " Mary", " John"


def main(repeats: int = 1) -> None:
    model = lmscope.load(progress=False)
    batch = model.encode(PROMPT)
    t = batch.input_ids.shape[1]
    tid, fid = model.token_id(TARGET), model.token_id(FOIL)
    steps, ibs = 64, 16
    bench_occlusion(model, batch, t, tid, fid, repeats)
    embed, _ = embed_parts(model, batch)
    embed = embed.float()
    scale = 0.3  # lmscope's default scaled-input baseline
    base = scale * embed

    def f_of(emb):  # SmolLM2 (Llama): the embed site is exactly HF's inputs_embeds
        lg = model.hf(inputs_embeds=emb, use_cache=False).logits[:, -1]
        return lg[:, tid] - lg[:, fid]

    def ours():
        return integrated_gradients(model, batch.input_ids, TARGET, FOIL, steps=steps, internal_batch_size=ibs,
                                    baseline_scale=scale, warn_above=float("inf")).extras["granular"]

    def naive():
        x, w = np.polynomial.legendre.leggauss(steps)
        total = torch.zeros_like(embed[0])
        for a, wt in zip((x + 1) / 2, w / 2):
            e = (base + float(a) * (embed - base)).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f_of(e).sum(), e)
            total += float(wt) * g[0]
        return (embed - base)[0] * total

    a_ours, t_ours = timed(ours, repeats)
    a_naive, t_naive = timed(naive, repeats)
    figures = dict(tokens=t, steps=steps, internal_batch_size=ibs, lmscope_s=round(t_ours, 2),
                   naive_loop_s=round(t_naive, 2), speedup_vs_loop=round(t_naive / t_ours, 2),
                   max_abs_diff_vs_loop=float((a_ours - a_naive).abs().max()))
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        figures["captum"] = "not installed (pip install captum)"
    else:
        ig = IntegratedGradients(f_of)

        def captum():
            return ig.attribute(embed, baselines=base, n_steps=steps, method="gausslegendre",
                                internal_batch_size=ibs)[0]

        a_captum, t_captum = timed(captum, repeats)
        figures.update(captum_s=round(t_captum, 2), speedup_vs_captum=round(t_captum / t_ours, 2),
                       max_abs_diff_vs_captum=float((a_ours - a_captum).abs().max()))
    record("attribution_ig", **figures, target="≥ Captum speed, ≥ 3× loop")


def timed(fn, repeats):
    """fn's result and its best time over ``repeats`` runs; the first run is timed too (IG is slow)."""
    out, best = _time_once(fn)
    for _ in range(repeats - 1):
        best = min(best, _time_once(fn)[1])
    return out, best


def _time_once(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_occlusion(model, batch, t, tid, fid, repeats):
    unk = model.tokenizer.unk_token_id

    def occ_batched():
        return occlusion(model, batch.input_ids, TARGET, FOIL, baseline="unk").values

    def occ_loop():
        with torch.no_grad():
            lg = model.run(batch.input_ids, logits="last").logits[0]
            clean = lg[tid] - lg[fid]
            out = []
            for s in range(t):
                ids = batch.input_ids.clone()
                ids[0, s] = unk
                lg = model.run(ids, logits="last").logits[0]
                out.append(clean - (lg[tid] - lg[fid]))
        return torch.stack(out)

    diff = float((occ_batched() - occ_loop()).abs().max())
    times = interleaved_best({"batched": occ_batched, "loop": occ_loop}, max(repeats, 3))
    t_b, t_l = times["batched"], times["loop"]
    record("attribution_occlusion", tokens=t, batched_s=round(t_b, 3), loop_s=round(t_l, 3),
           speedup=round(t_l / t_b, 2), max_abs_diff=diff, target="speedup >= 3")



if __name__ == "__main__":
    main()
