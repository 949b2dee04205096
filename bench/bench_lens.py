"""Benchmark: tuned-lens training throughput on the default model (training tokens per second).

One step = a forward of the model with every hidden state cached (no gradient), then for each of
the 30 translators the frozen final norm and unembedding (49,152 words) forward and backward on
every token: the unembedding dominates. Measured over 2 steps of 4 contexts × 128 tokens
(first position left out), AdamW; also the throughput of the model forward alone, for scale.
"""

from __future__ import annotations

import time

import torch

import lmscope
from lmscope.data import token_contexts
from lmscope.decoding.tuned_lens import TunedLensConfig, train_tuned_lens

from common import best_time, record


def main() -> None:
    model = lmscope.load(progress=False)
    context, batch, steps = 128, 4, 2
    ctx = token_contexts(model, "default", context=context, split="train", max_tokens=context * batch * steps)
    cfg = TunedLensConfig(tokens=context * batch * steps, context=context, batch_contexts=batch)
    t0 = time.perf_counter()
    lens = train_tuned_lens(model, contexts=ctx, config=cfg, progress=False)
    elapsed = time.perf_counter() - t0
    tokens = lens.info["steps"] * batch * (context - 1)

    def forward():
        with torch.no_grad():
            model.run(ctx[:batch], logits="all")

    t_fwd = best_time(forward, 3)
    record("tuned_lens_train", model=model.name, layers=len(lens.trained), steps=lens.info["steps"],
           tokens=tokens, seconds=round(elapsed, 2), tokens_per_s=round(tokens / elapsed, 1),
           forward_only_tokens_per_s=round(batch * (context - 1) / t_fwd, 1))


if __name__ == "__main__":
    main()
