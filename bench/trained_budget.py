"""What the self-trained models cost: train each registered recipe (``lmscope.models.trained.TRAINED``) from
scratch, as its first use does (reading the corpus, training the tokenizer, the steps), and report wall and CPU
seconds, tokens, parameters and the final loss; then check that the weights equal the cached copy bit for bit
(the recipe is deterministic). Nothing is written to the cache.

    nice -n 19 env OMP_NUM_THREADS=1 python bench/trained_budget.py [--models mamba-facts llama-facts]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmscope.models.loading import cache_dir, prepared
from lmscope.models.trained import TRAINED, train_small_lm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(TRAINED))
    args = ap.parse_args()
    for name in args.models:
        entry = TRAINED[name]
        wall, cpu = time.perf_counter(), time.process_time()
        model, tokenizer, log = train_small_lm(entry, progress=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out = {"model": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps": entry.steps,
               "train_tokens": log["train_tokens"], "params": sum(p.numel() for p in model.parameters()),
               "final_loss_mean_last_10": round(sum(log["losses"][-10:]) / 10, 3)}
        if prepared(name):
            from lmscope.models.loading import _trained_name
            from safetensors.torch import load_file

            cached = load_file(str(cache_dir() / _trained_name(entry) / "model.safetensors"))
            state = model.state_dict()
            out["equals_cached_weights"] = all(torch.equal(state[k], v) for k, v in cached.items())
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
