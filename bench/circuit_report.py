"""The figures of issue 17's circuit-score and tuned-lens parts on the default model (SmolLM2-135M), as JSON:

* ``atp``: AtP against exact head patching on IOI prompts (noising, logit difference; ``head_check``,
  the same as ``lmscope atp --task ioi --n 50 --noise --exact``);
* ``mib``: MIB circuit scores (CMD, CPR) on IOI for EAP, EAP-IG and AtP-derived circuits, each prompt seed
  with its own random-ranking baseline;
* ``lens``: held-out KL per layer of the logit lens, the least-squares lens and the least-squares lens
  fine-tuned with the KL objective.

    python bench/circuit_report.py atp --n 50 --out atp.json
    python bench/circuit_report.py mib --n 8 --seeds 0 1 2 --exact 100 --out mib.json
    python bench/circuit_report.py lens --lstsq-tokens 16384 --kl-tokens 4096 --out lens.json

Slow (minutes each on a CPU); run them one at a time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lmscope


def part_atp(model, args) -> dict:
    from lmscope.localization.atp_check import head_check
    from lmscope.localization.tasks import ioi

    t0 = time.process_time()
    check = head_check(model, ioi(model, args.n, seed=args.seed), direction="noise", batch_size=10)
    named = {}
    labels = check.axes[0].labels
    for head in args.heads:
        i = labels.index(head)
        named[head] = {k: float(check.values[i, j]) for j, k in enumerate(check.axes[1].labels)}
    return {"n_prompts": args.n, "seed": args.seed, "cpu_s": time.process_time() - t0, "named": named,
            "values": check.values.tolist(), "labels": list(labels), **check.meta}


def part_mib(model, args) -> dict:
    from dataclasses import replace

    from lmscope.localization.circuit_scores import circuit_scores
    from lmscope.localization.circuits import exact_top
    from lmscope.localization.eap import eap
    from lmscope.localization.node_circuits import atp_edge_scores
    from lmscope.localization.tasks import ioi

    out = []
    for seed in args.seeds:
        t0 = time.process_time()
        pairs = ioi(model, args.n, seed=seed)
        sets = [eap(model, pairs, method="eap", batch_size=8),
                eap(model, pairs, method="eap-ig", ig_steps=5, batch_size=8),
                atp_edge_scores(model, pairs, batch_size=8)]
        if args.exact:  # EAP with its top edges re-scored by exact single-edge patching
            sets.insert(1, replace(exact_top(model, pairs, sets[0], args.exact, batch_size=8),
                                   method=f"eap+exact{args.exact}"))
        res = circuit_scores(model, pairs, sets, how=args.how, random_seed=seed, batch_size=8)
        row = {"seed": seed, "n_prompts": args.n, "how": args.how, "cpu_s": time.process_time() - t0,
               "scores": list(res.axes[0].labels), "cmd_cpr": res.values.tolist(),
               "fraction": res.extras["fraction"].tolist(), "f_abs": res.extras["faithfulness_abs"].tolist(),
               "f_support": res.extras["faithfulness_support"].tolist(), **res.meta}
        out.append(row)
        print(json.dumps({k: row[k] for k in ("seed", "scores", "cmd_cpr", "cpu_s")}), flush=True)
    return {"runs": out}


def part_lens(model, args) -> dict:
    from lmscope.data import token_contexts
    from lmscope.decoding.lens_fit import fit_lens_least_squares
    from lmscope.decoding.tuned_lens import TunedLensConfig, evaluate_lens, train_tuned_lens

    held = token_contexts(model, "default", args.context, "heldout", max_tokens=args.eval_tokens)
    t0 = time.process_time()
    ls = fit_lens_least_squares(model, "default", tokens=args.lstsq_tokens, context=args.context)
    t_ls = time.process_time() - t0
    ev_ls = evaluate_lens(model, ls, contexts=held)
    print(json.dumps({"kl_lstsq": ev_ls.values[:, 1].tolist()}), flush=True)
    t0 = time.process_time()
    cfg = TunedLensConfig(tokens=args.kl_tokens, context=args.context, batch_contexts=args.batch, lr=args.lr)
    tuned = train_tuned_lens(model, "default", cfg, init=ls)
    t_kl = time.process_time() - t0
    ev = evaluate_lens(model, tuned, contexts=held)
    return {"layers": list(ev.axes[0].labels), "kl_logit": ev.values[:, 0].tolist(),
            "kl_lstsq": ev_ls.values[:, 1].tolist(), "kl_lstsq_kl": ev.values[:, 1].tolist(),
            "ce_logit": ev.values[:, 2].tolist(), "ce_lstsq": ev_ls.values[:, 3].tolist(),
            "ce_lstsq_kl": ev.values[:, 3].tolist(), "lstsq_tokens": ls.info["lstsq"]["tokens"],
            "kl_tokens": args.kl_tokens, "kl_steps": tuned.info.get("steps"), "batch_contexts": args.batch,
            "lr": args.lr, "cpu_s_lstsq": t_ls, "cpu_s_kl": t_kl, "eval_tokens": int(held[:, 1:].numel())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("atp", "mib", "lens"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--how", default="top")
    ap.add_argument("--exact", type=int, default=0, help="mib: also EAP with its top K edges re-scored exactly")
    ap.add_argument("--heads", nargs="*", default=["L16.H0", "L8.H1"])
    ap.add_argument("--lstsq-tokens", type=int, default=16384)
    ap.add_argument("--kl-tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = lmscope.load()
    out = {"atp": part_atp, "mib": part_mib, "lens": part_lens}[args.part](model, args)
    with open(args.out, "w") as f:
        json.dump({"part": args.part, "model": model.name, **out}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
