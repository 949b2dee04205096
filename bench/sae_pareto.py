"""The larger SAE Pareto run: ReLU, Gated, TopK and JumpReLU SAEs on SmolLM2's layer-15 residual stream.

    python bench/sae_pareto.py [--store DIR] [--tokens 131072] [--d-sae 2304] [--epochs 3] [--knobs sweep|matched]
                               [--out DIR]

Harvests ``--tokens`` layer-15 ``resid_post`` activations from the built-in corpus (or reads ``--store``), leaves
out the massive-activation tokens (norm above 10× the median; see tests/test_sae_real.py), keeps the last
``--held`` rows for evaluation and trains every architecture at a few sparsity settings on the rest (same rows,
same order). Each SAE is evaluated on the held-out rows (L0, FVE, γ, centred γ) and spliced into the model on
held-out contexts (CE loss recovered against zero ablation, massive-activation positions left clean). Prints the
Pareto table, each architecture's FVE interpolated at L0 = 32 (linear in log L0 between the bracketing
runs), and writes ``pareto.json`` / ``pareto.png`` to ``--out``.

    python bench/sae_pareto.py --attention 11 [--tokens 40000] [--k 20] [--d-sae 2304] [--epochs 3]

The attention-output run instead: a TopK SAE on ``blocks.11.attn.z`` (all heads' z concatenated), CE loss
recovered against zero ablation of that z on held-out contexts, and the per-head attribution sums.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

SITE = "blocks.15.resid_post"
SWEEP = {"relu": [{"l1": 6.0}, {"l1": 10.0}, {"l1": 14.0}],
         "gated": [{"l1": 2.0}, {"l1": 3.0}, {"l1": 6.0}],
         "topk": [{"k": 16}, {"k": 32}, {"k": 64}],
         "jumprelu": [{"l0": 2.0, "threshold_init": 0.7}, {"l0": 2.0, "threshold_init": 1.0},
                      {"l0": 5.0, "threshold_init": 1.5}]}
# the knobs that land near L0 = 32 in the CI-sized run (tests/test_sae_real.py)
MATCHED = {"relu": [{"l1": 10.0}], "gated": [{"l1": 4.0}], "topk": [{"k": 32}],
           "jumprelu": [{"l0": 2.0, "threshold_init": 0.85}]}


def interpolate(points: list[tuple[float, float]], at: float) -> float:
    """y at x = ``at`` on the piecewise-linear curve through (log x, y); nan outside the measured range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= at <= x1 and x1 > x0:
            t = (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return float("nan")


def main() -> None:
    import lmscope
    from lmscope.data import ActivationStore, harvest, token_contexts
    from lmscope.sae import TensorSource, TrainConfig, compare, evaluate, evaluate_activations, make_sae, train
    from lmscope.results import Result
    from lmscope.sae.evaluation import METRICS, pareto_png

    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--held", type=int, default=8192)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ce-contexts", type=int, default=16)
    ap.add_argument("--archs", default="relu,gated,topk,jumprelu")
    ap.add_argument("--knobs", choices=("sweep", "matched"), default="sweep",
                    help="three sparsity settings per architecture, or only the CI test's L0 ≈ 32 ones")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sae_pareto")
    ap.add_argument("--attention", type=int, default=None, help="run the attention-output SAE on this layer")
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = lmscope.load(progress=False)
    if args.attention is not None:
        return attention_run(model, args)
    if args.store is not None:
        store = ActivationStore(args.store, allow_incomplete=True)
    else:
        ctx = token_contexts(model, "default", context=128, split="train", max_tokens=args.tokens * 128 // 127 + 256)
        store = harvest(model, SITE, ctx, args.out / "l15", n_tokens=args.tokens)
    acts = TensorSource.from_store(store, max_rows=args.tokens, max_norm_ratio=10).acts
    source, held = TensorSource(acts[:-args.held]), acts[-args.held:]
    contexts = token_contexts(model, "default", context=128, split="heldout", max_tokens=128 * args.ce_contexts)
    cfg = TrainConfig(tokens=args.epochs * len(source) // args.batch * args.batch, batch_size=args.batch,
                      lr=args.lr, checkpoint_every=0, init_sample=8192)
    print(f"{len(source)} training rows x {args.epochs} epochs, {len(held)} held-out rows, d_sae {args.d_sae}, "
          f"CE on {len(contexts)} held-out contexts")
    results, labels, rows = [], [], []
    for arch in args.archs.split(","):
        for knob in (SWEEP if args.knobs == "sweep" else MATCHED)[arch]:
            sae = make_sae(arch, d_in=model.spec.d_model, d_sae=args.d_sae, site=SITE, model=model.name, **knob)
            t = time.perf_counter()
            train(sae, source, cfg, progress=False)
            secs = time.perf_counter() - t
            rec = dict(zip(METRICS, evaluate_activations(sae, [held]).values.tolist()))
            r = evaluate(sae, model, contexts, max_norm_ratio=10)
            ce = dict(zip(METRICS, r.values.tolist()))
            for m in ("ce_clean", "ce_sae", "ce_zero", "ce_recovered", "delta_ce"):
                rec[m] = ce[m]
            label = f"{arch} " + ",".join(f"{k}={v:g}" for k, v in knob.items())
            results.append(Result(torch.tensor([rec[m] for m in METRICS]), r.axes, method=r.method,
                                  model=r.model, params=r.params))
            labels.append(label)
            rows.append((label, arch, rec, secs))
            print(f"{label:32} L0 {rec['l0']:6.1f}  FVE {rec['fve']:.3f}  gamma {rec['gamma']:.3f}  "
                  f"gamma_c {rec['gamma_centred']:.3f}  CE rec {rec['ce_recovered']:.3f}  dCE {rec['delta_ce']:.3f}  "
                  f"dead {rec['dead_frac']:.3f}  ({secs:.0f}s)", flush=True)
    comp = compare(results, labels)
    comp.save_json(args.out / "pareto.json")
    pareto_png(comp, args.out / "pareto.png")
    print("\nFVE / CE recovered interpolated at L0 = 32:")
    for arch in dict.fromkeys(a for _, a, _, _ in rows):
        pts = [(rec["l0"], rec["fve"]) for _, a, rec, _ in rows if a == arch]
        ce_pts = [(rec["l0"], rec["ce_recovered"]) for _, a, rec, _ in rows if a == arch]
        if len(pts) > 1:
            print(f"  {arch:9} FVE {interpolate(pts, 32):.3f}  CE rec {interpolate(ce_pts, 32):.3f}")
        else:
            print(f"  {arch:9} one run only (L0 {pts[0][0]:.1f}): no curve to interpolate")
    print(f"wrote {args.out / 'pareto.json'} and pareto.png")


def attention_run(model, args) -> None:
    from lmscope.data import harvest, token_contexts
    from lmscope.sae import TensorSource, TrainConfig, evaluate, head_attribution, make_sae, train
    from lmscope.sae.evaluation import METRICS

    site, sp = f"blocks.{args.attention}.attn.z", model.spec
    ctx = token_contexts(model, "default", context=128, split="train", max_tokens=args.tokens * 128 // 127 + 256)
    store = harvest(model, site, ctx, args.out / f"z{args.attention}", n_tokens=args.tokens)
    source = TensorSource.from_store(store, max_norm_ratio=10)
    sae = make_sae("topk", d_in=sp.n_heads * sp.d_head, d_sae=args.d_sae, k=args.k, site=site, model=model.name,
                   d_head=sp.d_head)
    cfg = TrainConfig(tokens=args.epochs * len(source) // args.batch * args.batch, batch_size=args.batch,
                      lr=args.lr, checkpoint_every=0, init_sample=8192)
    train(sae, source, cfg, progress=True)
    contexts = token_contexts(model, "default", context=128, split="heldout", max_tokens=128 * args.ce_contexts)
    r = dict(zip(METRICS, evaluate(sae, model, contexts, max_norm_ratio=10).values.tolist()))
    sums = head_attribution(sae, model).values.sum(1)
    print(f"{site}: {len(source)} rows x {args.epochs} epochs, TopK k={args.k}, d_sae {args.d_sae}; "
          f"{len(contexts)} held-out contexts")
    print(f"L0 {r['l0']:.1f}  FVE {r['fve']:.3f}  CE clean {r['ce_clean']:.4f}  SAE {r['ce_sae']:.4f}  "
          f"zero-ablated {r['ce_zero']:.4f} (gap {r['ce_zero'] - r['ce_clean']:.4f} nats)  "
          f"CE recovered {r['ce_recovered']:.3f}  dead {r['dead_frac']:.3f}")
    print(f"head attribution sums per latent: min {sums.min():.6f}, max {sums.max():.6f}")


if __name__ == "__main__":
    main()
