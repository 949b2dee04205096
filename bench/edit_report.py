"""Editing measurements on a real model, written as they go (a killed run resumes where it stopped).

    python bench/edit_report.py eval --n 100 --layer 4 --tokens 200000 --prefixes 4
    python bench/edit_report.py sequential --n 100 --layer 4 --tokens 200000 --prefixes 4 --every 10
    python bench/edit_report.py recall --model gemma3-270m --n 100 --localise 30
    python bench/edit_report.py layers --n 10 --layers 0,2,4,6,8,12,16,20 --tokens 20000 --prefixes 4
    python bench/edit_report.py memit --n 50 --layers 3,4,5 --tokens 200000 --prefixes 4

``eval``: ROME on the first n known counterfactual facts, one at a time (each undone), one JSON line per
fact (its metrics after and before, seconds taken), then the summary (``lmscope edit eval``'s numbers).
``sequential``: ``lmscope edit sequential``'s curve, one line per checkpoint. ``recall``: ``lmscope recall``
(memorised vs in-context). ``layers``: efficacy/paraphrase/specificity by edit layer on the same facts, with
the mean causal-trace curve. ``memit``: all n facts written at once into ``--layers`` by MEMIT, each
fact's metrics (without generations) on the one edited model, beside the unedited model's; facts whose
subject appears in another fact's neighbourhood prompts are skipped, so that specificity is not measured
on an edited subject. Outputs go to bench/results/editing/. Timings here are wall-clock seconds on
whatever machine runs it (under load they say little about speed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]  # this checkout's lmscope, as bench/run.py does

import torch  # noqa: E402

import lmscope  # noqa: E402
from lmscope.data import token_contexts  # noqa: E402
from lmscope.editing import RomeSettings, second_moment  # noqa: E402
from lmscope.editing import memit  # noqa: E402
from lmscope.editing.evaluate import METRICS, fact_metrics  # noqa: E402
from lmscope.editing.layer import NOISE, trace_curve  # noqa: E402
from lmscope.editing.recall import RecallConfig, recall  # noqa: E402
from lmscope.editing.sequential import edit_sequence  # noqa: E402
from lmscope.editing.workflow import edit_rows, prefix_counts, select_facts, summarise  # noqa: E402

OUT = Path(__file__).parent / "results" / "editing"
NAMES = [*METRICS, *(f"pre_{m}" for m in METRICS)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run_eval(model, args, path: Path) -> dict:
    facts = select_facts(model, args.n, args.seed)
    done = [r for r in _lines(path) if "fact" in r]
    C = second_moment(model, args.layer, tokens=args.tokens)
    settings = RomeSettings(steps=args.steps, seed=args.seed, prefixes=prefix_counts(args.prefixes))
    with path.open("a") as fh:
        t = time.time()
        for cf, row in zip(facts[len(done):], edit_rows(model, facts[len(done):], args.layer, C, settings,
                                                        args.gen_tokens, args.seed)):
            rec = {"fact": f"{cf.subject} -> {cf.new.strip()}", "relation": cf.relation, **dict(zip(NAMES, row)),
                   "seconds": time.time() - t}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done.append(rec)
            t = time.time()
    values = torch.tensor([[r[m] for m in NAMES] for r in done])
    return {"facts": len(done), "seconds_per_fact": sum(r["seconds"] for r in done) / len(done),
            **summarise(values)}


def run_sequential(model, args, path: Path) -> dict:
    path.unlink(missing_ok=True)
    facts = select_facts(model, args.n, args.seed)
    C = second_moment(model, args.layer, tokens=args.tokens)
    held = token_contexts(model, "default", 128, "heldout", max_tokens=args.ppl_tokens)
    settings = RomeSettings(steps=args.steps, seed=args.seed, prefixes=prefix_counts(args.prefixes))
    t0 = time.time()

    def write(row):
        with path.open("a") as fh:
            fh.write(json.dumps({**row, "seconds": time.time() - t0}) + "\n")

    rows, immediate, _, infos = edit_sequence(model, facts, args.layer, C, settings, held, args.every,
                                              on_checkpoint=write)
    return {"rows": rows, "immediate_efficacy": sum(immediate) / len(immediate),
            "mean_v_steps": sum(i["steps"] for i in infos) / len(infos)}


def run_recall(model, args, path: Path) -> dict:
    res = recall(model, None, RecallConfig(n=args.n, localise=args.localise, window=args.window, seed=args.seed))
    res.save_json(path.with_suffix(".json"))
    return dict(res.meta)


def run_layers(model, args, path: Path) -> dict:
    facts = select_facts(model, args.n, args.seed)
    curve = torch.stack([trace_curve(model, cf.fact, noise=NOISE).values for cf in facts]).mean(0)
    settings = RomeSettings(steps=args.steps, seed=args.seed, prefixes=prefix_counts(args.prefixes))
    out = {"trace_curve": curve.tolist(), "by_layer": {}}
    for layer in (int(x) for x in args.layers.split(",")):
        C = second_moment(model, layer, tokens=args.tokens)
        values = torch.tensor(list(edit_rows(model, facts, layer, C, settings, 0, args.seed)))
        out["by_layer"][layer] = summarise(values)
        with path.open("a") as fh:
            fh.write(json.dumps({"layer": layer, **out["by_layer"][layer]}) + "\n")
    return out


def run_memit(model, args, path: Path) -> dict:
    pool = select_facts(model, 3 * args.n, args.seed)
    facts = []
    for cf in pool:  # no edited subject may appear in another edited fact's neighbourhood prompts
        nb = [p for f in facts for p, _ in f.neighbours]
        if not any(cf.subject in p for p in nb) and not any(f.subject in p for f in facts for p, _ in cf.neighbours):
            facts.append(cf)
        if len(facts) == args.n:
            break
    layers = [int(x) for x in args.layers.split(",")]
    C = {layer: second_moment(model, layer, tokens=args.tokens) for layer in layers}
    settings = RomeSettings(steps=args.steps, seed=args.seed, prefixes=prefix_counts(args.prefixes))
    pre = [fact_metrics(model, cf, 0, args.seed) for cf in facts]
    t = time.time()
    edit = memit(model, [cf.fact for cf in facts], layers, C, settings=settings)
    t_edit = time.time() - t
    with model.edit(edit):
        post = [fact_metrics(model, cf, 0, args.seed) for cf in facts]
    with path.open("w") as fh:
        for cf, a, b in zip(facts, post, pre):
            fh.write(json.dumps({"fact": f"{cf.subject} -> {cf.new.strip()}", "relation": cf.relation, **a,
                                 **{f"pre_{k}": v for k, v in b.items()}}) + "\n")
    values = torch.tensor([[r.get(m, float("nan")) for m in METRICS] + [q.get(m, float("nan")) for m in METRICS]
                           for r, q in zip(post, pre)])
    return {"facts": len(facts), "layers": layers, "edit_seconds": t_edit, **summarise(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("eval", "sequential", "recall", "layers", "memit"))
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--layer", type=int, default=4)
    p.add_argument("--layers", default="0,2,4,6,8,12,16,20")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prefixes", type=int, default=20)
    p.add_argument("--gen-tokens", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--localise", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = lmscope.load(args.model, progress=False)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.what}-{model.name}{args.tag}.jsonl"
    t = time.time()
    summary = {"run": args.what, "model": model.name, "args": vars(args),
               **globals()[f"run_{args.what}"](model, args, path), "seconds": time.time() - t}
    (OUT / f"{args.what}-{model.name}{args.tag}.summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
