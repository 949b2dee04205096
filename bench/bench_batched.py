"""Benchmark (b): 64 patched variants of a 16-token prompt in one batched run, against a loop of
64 single patched runs. Target: ≥ 4× faster. Also checks both give the same logits."""

from __future__ import annotations

import torch

import lmscope
from lmscope import Patch

from common import best_time, record

CLEAN = "When Mary and John went to the store, John gave a drink to her friend Mary"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to her friend John"


def main() -> None:
    model = lmscope.load(progress=False)
    clean, corrupt = model.encode(CLEAN), model.encode(CORRUPT)
    t = clean.input_ids.shape[1]
    torch.set_grad_enabled(False)
    layers = list(range(0, model.spec.n_layers, max(1, model.spec.n_layers // 8)))[:8]
    cache = model.run(clean, cache=[f"blocks.{l}.resid_pre" for l in layers])
    sets = []
    for i in range(64):
        layer, pos = layers[i % len(layers)], (i // len(layers)) % t
        site = f"blocks.{layer}.resid_pre"
        sets.append([Patch(site, value=cache[site], positions=[pos])])

    def batched():
        return model.run_sets(corrupt, sets, logits="last").logits

    def loop():
        return torch.stack([model.run(corrupt, interventions=s, logits="last").logits for s in sets])

    diff = (batched() - loop()).abs().max().item()
    t_batched, t_loop = best_time(batched, 3), best_time(loop, 3)
    record("batched_patching", tokens=t, variants=len(sets), batched_s=round(t_batched, 3), loop_s=round(t_loop, 3),
           speedup=round(t_loop / t_batched, 2), max_abs_diff=diff, target="speedup >= 4")


if __name__ == "__main__":
    main()
