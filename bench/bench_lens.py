"""Benchmark: tuned-lens training throughput on the default model (training tokens per second).

One step = a forward of the model with every hidden state cached (no gradient), then for each of
the 30 translators the frozen final norm and unembedding (49,152 words) forward and backward on
every token: the unembedding dominates. Measured over 2 steps of 4 contexts × 128 tokens
(first position left out), AdamW, against the same training written plainly (HF hidden states,
log-softmax + ``kl_div``, autograd; :func:`plain_lens`), which must give the same KL per step and
translators; also the throughput of the model forward alone, for scale.

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

from common import check, finish, interleaved, ratio, record


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
    record("tuned_lens_kl", work={"lmscope": "train_tuned_lens() on the default corpus, then evaluate_lens() on "
                                             "held-out contexts (one run: a quality table, not a timing)"},
           model=model.name, train_tokens=lens.info["tokens_seen"], steps=lens.info["steps"],
           seconds=round(elapsed, 1), cpu_seconds=round(cpu, 1), eval_tokens=ev.params["tokens"],
           ce_model=round(ev.meta["ce_model"], 3), tuned_below_logit_every_layer=below,
           table={label: [round(v, 3) for v in row] for label, row in zip(ev.axes[0].labels, ev.values.tolist())})


def plain_lens(model, contexts: torch.Tensor, batch: int, steps: int, lr: float = 1e-4, weight_decay: float = 1e-3):
    """The reference: tuned-lens training written plainly. HF hidden states, one (D, D) + (D,) translator per
    hidden state 0..L−1 (zero init), KL(p_final ‖ p_lens) through log-softmax and autograd, one backward per
    translator, AdamW with lmscope's schedule for this budget (no warm-up below 5 steps, linear decay).
    Returns the translators (L, D, D), biases (L, D) and the mean KL per step."""
    L, D = model.spec.n_layers, model.spec.d_model
    A = torch.zeros(L, D, D, requires_grad=True)
    b = torch.zeros(L, D, requires_grad=True)
    opt = torch.optim.AdamW([A, b], lr=lr, weight_decay=weight_decay)
    warmup = min(1000, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else 1 - (s - warmup) / max(1, steps - warmup))
    norm, unembed = model.hf.model.norm, model.hf.lm_head
    losses = []
    for step in range(steps):
        ids = contexts[step * batch:(step + 1) * batch]
        with torch.no_grad():
            out = model.hf(ids, output_hidden_states=True, use_cache=False)
            target = out.logits[:, 1:].reshape(-1, out.logits.shape[-1]).float().log_softmax(-1)
        n_tok = target.shape[0]
        opt.zero_grad()
        total = 0.0
        for k in range(L):
            h = out.hidden_states[k][:, 1:].reshape(-1, D)
            logq = unembed(norm(h + h @ A[k].T + b[k])).float().log_softmax(-1)
            loss = torch.nn.functional.kl_div(logq, target, log_target=True, reduction="sum") / n_tok
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        losses.append(total / L)
    return A.detach(), b.detach(), losses


def main() -> None:
    model = lmscope.load(progress=False)
    for p in model.hf.parameters():  # the reference backpropagates through the frozen norm and unembedding
        p.requires_grad_(False)
    context, batch, steps = 128, 4, 2
    ctx = token_contexts(model, "default", context=context, split="train", max_tokens=context * batch * steps)
    cfg = TunedLensConfig(tokens=context * batch * steps, context=context, batch_contexts=batch)

    def ours():
        return train_tuned_lens(model, contexts=ctx, config=cfg, progress=False)

    def forward():
        with torch.no_grad():
            model.run(ctx[:batch], logits="all")

    times, out = interleaved({"lmscope": ours, "plain": lambda: plain_lens(model, ctx, batch, steps),
                              "forward_only": forward}, warmup=["forward_only"])
    lens, (A, b, plain_kl) = out["lmscope"], out["plain"]
    tokens = lens.info["steps"] * batch * (context - 1)
    # The KL sums ~25M float32 terms per step (508 tokens × 49,152 words) in another order on each side: seen
    # 1.4e-4 relative at step 0, where both are the logit lens. 1e-3 relative catches a wrong loss, gradient or
    # schedule (each changes the step-1 KL by ≥ 1%).
    checks = [check("mean KL per step vs plain tuned-lens training", lens.info["mean_kl_per_step"], plain_kl,
                    atol=1e-6, rtol=1e-3, why="float32 sums of ~25M terms per step in another order: seen 1.4e-4 "
                                              "relative at step 0 (the logit lens on both sides)")]
    # AdamW's first update is ±lr per entry (m/√v = sign g): the few entries whose gradient is at rounding level
    # (seen 2 of 10M) may move the other way, so compare the translators as a whole, ‖W − W_ref‖ / ‖W_ref‖
    # (seen ~1e-5). 1e-3 catches a wrong learning rate, schedule or gradient, each of which is off by ≥ 10%.
    trained = torch.stack([lens.translators[i].weight.detach() for i in lens.trained])
    checks.append(check("translator weights vs plain training, relative Frobenius difference",
                        float((trained - A).norm() / A.norm()), 0.0, atol=1e-3,
                        why="first AdamW step is ±lr per entry, so rounding-level gradients (seen 2 of 10M entries) "
                            "may flip; relative norm of the difference seen ~1e-5"))
    work = {"lmscope": f"train_tuned_lens(): {steps} steps of {batch} × {context} tokens: a forward caching every "
                       "hidden state, then for each of the 30 translators the frozen norm + unembedding forward and "
                       "backward in 512-token chunks, the KL gradient formed directly (softmax − p)",
            "plain": "the same training with HF hidden states, log-softmax + kl_div and autograd, one backward per "
                     "translator",
            "forward_only": f"one model forward of {batch} × {context} tokens (scale)"}
    record("tuned_lens_train", work=work, timings=times, checks=checks, model=model.name, layers=len(lens.trained),
           steps=lens.info["steps"], tokens=tokens, tokens_per_s=round(tokens / times["lmscope"].median, 1),
           plain_tokens_per_s=round(tokens / times["plain"].median, 1),
           speedup_vs_plain=ratio(times["plain"], times["lmscope"]),
           forward_only_tokens_per_s=round(batch * (context - 1) / times["forward_only"].median, 1))


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
        finish()
