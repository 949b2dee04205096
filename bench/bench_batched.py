"""Benchmark: 64 patched variants of a 16-token prompt in one batched run, against a loop of 64 single
patched runs. Target: ≥ 4× faster. lmscope is timed with its work reuse (prefix keys/values, sets joining
at their own layer) and without it (``run_sets(reuse=False)``); both must give the loop's logits."""

from __future__ import annotations

import torch

import lmscope
from lmscope import Patch

from common import check, finish, interleaved, quick, ratio, record

CLEAN = "When Mary and John went to the store, John gave a drink to her friend Mary"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to her friend John"
# float32 logits of magnitude ~20 computed in batches of other sizes (and, with reuse, from cached keys and
# values on fewer positions): summation order differs, so agreement is to ~1e-5; 1e-3 leaves margin and is still
# far below any logit difference an experiment reads (≥ 0.01).
ATOL = 1e-3


def main() -> None:
    model = lmscope.load(progress=False)
    clean, corrupt = model.encode(CLEAN), model.encode(CORRUPT)
    t = clean.input_ids.shape[1]
    torch.set_grad_enabled(False)
    layers = list(range(0, model.spec.n_layers, max(1, model.spec.n_layers // 8)))[:8]
    cache = model.run(clean, cache=[f"blocks.{l}.resid_pre" for l in layers])
    sets = []
    n_sets = quick(64, 8)
    for i in range(n_sets):
        layer, pos = layers[i % len(layers)], (i // len(layers)) % t
        site = f"blocks.{layer}.resid_pre"
        sets.append([Patch(site, value=cache[site], positions=[pos])])

    sides = {
        "lmscope": lambda: model.run_sets(corrupt, sets, logits="last").logits,
        "lmscope_no_reuse": lambda: model.run_sets(corrupt, sets, logits="last", reuse=False).logits,
        "loop": lambda: torch.stack([model.run(corrupt, interventions=s, logits="last").logits for s in sets]),
    }
    times, out = interleaved(sides, warmup=["lmscope", "lmscope_no_reuse"])
    why = "float32 logits (~20) from batches of other sizes: summation order differs (seen ~1e-5)"
    checks = [check("lmscope vs loop, last-position logits", out["lmscope"], out["loop"], atol=ATOL, why=why),
              check("lmscope_no_reuse vs loop", out["lmscope_no_reuse"], out["loop"], atol=ATOL, why=why)]
    work = {
        "lmscope": f"{n_sets} sets in batched forwards; each set joins at its patched layer and runs only the positions from "
                   "its patched one on (earlier keys/values from one unpatched run); last-position logits only",
        "lmscope_no_reuse": f"{n_sets} sets in one batched forward over every layer and position; last-position logits only",
        "loop": f"{n_sets} single forwards (model.run with the patch): every layer and position, logits of all positions "
                "computed, the last kept",
    }
    record("batched_patching", work=work, timings=times, checks=checks, tokens=t, variants=len(sets),
           speedup_vs_loop=ratio(times["loop"], times["lmscope"]),
           speedup_no_reuse_vs_loop=ratio(times["loop"], times["lmscope_no_reuse"]), target="speedup_vs_loop >= 4")


if __name__ == "__main__":
    main()
    finish()
