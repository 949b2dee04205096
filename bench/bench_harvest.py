"""Benchmark: activation harvest throughput on the default model (vectors per second).

``harvest`` of ``blocks.15.resid_post`` (the forward stops after block 15 and shards go to disk,
checksummed) against a plain loop that runs the whole model (all 30 blocks and the unembedding)
with the site cached and keeps the vectors in memory. Target (issue 6): ratio ≥ 2.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

import lmscope
from lmscope.data import harvest, token_contexts

from common import best_time, record

SITE = "blocks.15.resid_post"


def main() -> None:
    model = lmscope.load(progress=False)
    torch.set_grad_enabled(False)
    ctx = token_contexts(model, "default", context=128, split="train", max_tokens=128 * 16)
    batch_size = 8
    n_vectors = len(ctx) * (ctx.shape[1] - 1)
    root = Path(tempfile.mkdtemp(prefix="lmscope-bench-harvest-"))
    runs = iter(range(1000))

    def store():
        harvest(model, SITE, ctx, root / f"run{next(runs)}", batch_size=batch_size, shard_tokens=4096,
                progress=False)

    def plain():
        kept = []
        for b in range(0, len(ctx), batch_size):
            run = model.run(ctx[b:b + batch_size], cache=[SITE], logits="all")
            kept.append(run[SITE][:, 1:].reshape(-1, model.spec.d_model).clone())
        return torch.cat(kept)

    try:
        t_store, t_plain = best_time(store, 3), best_time(plain, 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    record("harvest", model=model.name, site=SITE, vectors=n_vectors, context=ctx.shape[1], batch=batch_size,
           harvest_s=round(t_store, 3), plain_full_forward_s=round(t_plain, 3),
           harvest_vectors_per_s=round(n_vectors / t_store, 1), plain_vectors_per_s=round(n_vectors / t_plain, 1),
           speedup=round(t_plain / t_store, 2), target="speedup >= 2")


if __name__ == "__main__":
    main()
