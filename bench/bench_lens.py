"""Benchmark: tuned-lens training throughput on the default model (training tokens per second).

One step = a forward of the model with every hidden state cached (no gradient), then for each of
the 30 translators the frozen final norm and unembedding (49,152 words) forward and backward on
every token: the unembedding dominates. Measured over 2 steps of 4 contexts × 128 tokens
(first position left out), AdamW; also the throughput of the model forward alone, for scale.
Wall-clock figures on a shared machine mostly measure the load; tokens per CPU-second (all threads)
is the steadier figure.

``python bench_lens.py --kl-table [--tokens N --eval-tokens M --out DIR]`` instead trains a larger
lens on the default corpus and prints (and records) the held-out KL / CE per layer beside the
logit lens.
"""

from __future__ import annotations

import argparse
import time

import torch

import lmscope
from lmscope.data import token_contexts
from lmscope.decoding.tuned_lens import TunedLensConfig, evaluate_lens, train_tuned_lens

from common import best_time, record


def kl_table(tokens: int = 6144, eval_tokens: int = 1024, context: int = 128, batch: int = 4, out=None) -> None:
    """A larger training run on the default corpus, then the held-out KL/CE per layer beside the logit lens."""
    model = lmscope.load(progress=False)
    cfg = TunedLensConfig(tokens=tokens, context=context, batch_contexts=batch)
    c0, t0 = time.process_time(), time.perf_counter()
    lens = train_tuned_lens(model, "default", cfg, progress=True)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out:
        lens.save(out)
    ev = evaluate_lens(model, lens, "default", tokens=eval_tokens, context=context, progress=True)
    print("layer  KL logit  KL tuned  CE logit  CE tuned")
    for label, row in zip(ev.axes[0].labels, ev.values.tolist()):
        print(f"{label:>5}  " + "  ".join(f"{v:8.3f}" for v in row))
    below = bool((ev.values[:-1, 1] < ev.values[:-1, 0]).all())
    record("tuned_lens_kl", model=model.name, train_tokens=lens.info["tokens_seen"], steps=lens.info["steps"],
           seconds=round(elapsed, 1), cpu_seconds=round(cpu, 1), eval_tokens=ev.params["tokens"],
           ce_model=round(ev.meta["ce_model"], 3), tuned_below_logit_every_layer=below,
           table={label: [round(v, 3) for v in row] for label, row in zip(ev.axes[0].labels, ev.values.tolist())})


def main() -> None:
    model = lmscope.load(progress=False)
    context, batch, steps = 128, 4, 2
    ctx = token_contexts(model, "default", context=context, split="train", max_tokens=context * batch * steps)
    cfg = TunedLensConfig(tokens=context * batch * steps, context=context, batch_contexts=batch)
    c0, t0 = time.process_time(), time.perf_counter()
    lens = train_tuned_lens(model, contexts=ctx, config=cfg, progress=False)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = lens.info["steps"] * batch * (context - 1)

    def forward():
        with torch.no_grad():
            model.run(ctx[:batch], logits="all")

    t_fwd = best_time(forward, 3)
    record("tuned_lens_train", model=model.name, layers=len(lens.trained), steps=lens.info["steps"],
           tokens=tokens, seconds=round(elapsed, 2), tokens_per_s=round(tokens / elapsed, 1),
           cpu_seconds=round(cpu, 1), tokens_per_cpu_s=round(tokens / cpu, 2),
           forward_only_tokens_per_s=round(batch * (context - 1) / t_fwd, 1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl-table", action="store_true", help="Run the larger training + per-layer KL table.")
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--out", default=None, help="Folder to save the trained lens to.")
    args = parser.parse_args()
    if args.kl_table:
        kl_table(args.tokens, args.eval_tokens, out=args.out)
    else:
        main()
