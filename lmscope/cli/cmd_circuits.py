"""Circuit commands: attribution patching (``atp``), circuit discovery (``circuit``: EAP, EAP-IG,
ACDC) and information-flow routes (``flow``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli.common import HtmlOpt, JsonOpt, ModelOpt, PngOpt, console, friendly, load_model, out, top_table, \
    write_result
from lmscope.errors import InputError

TASKS = ("ioi", "induction")


def _task_pairs(model, task: str, n: int, seed: int):
    from lmscope.localization import tasks

    if task == "ioi":
        return tasks.ioi(model, n, seed=seed)
    if task == "induction":
        return tasks.induction(model, n, seq_len=10, seed=seed)
    raise InputError(f"--task {task!r}: choose one of {TASKS}.")


def atp(clean: str = typer.Option(None, help="Clean prompt (the behaviour is present)."),
        corrupt: str = typer.Option(None, help="Corrupted prompt of the same token length."),
        target: str = typer.Option(None, help="Target token, e.g. ' Mary'."),
        foil: str = typer.Option(None, help="Foil token, e.g. ' John' (metric: logit difference)."),
        task: str = typer.Option(None, help="Instead of one pair: a built-in task (ioi | induction; default ioi "
                                            "when no pair is given)."),
        n: int = typer.Option(20, help="Prompts of the task."),
        node: str = typer.Option("head", help="Node kind written to --json: head | mlp | neuron | resid "
                                              "(with --star also head_q | head_k | head_v)."),
        star: bool = typer.Option(False, "--star", help="AtP*: QK fix and GradDrop."),
        denoise: bool = typer.Option(False, "--denoise/--noise", help="Denoising instead of noising (default)."),
        seed: int = typer.Option(0, help="Seed of the task generator."),
        model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Attribution patching (AtP / AtP*): every head, MLP, neuron and residual position at once."""
    from lmscope.localization.atp import NODES
    from lmscope.localization.atp import atp as run_atp
    from lmscope.localization.tasks import pair

    given = any(value is not None for value in (clean, corrupt, target, foil))
    if not task and given and not (clean and corrupt and target):
        raise InputError("A prompt pair needs all of --clean, --corrupt and --target (and --foil for a logit "
                         "difference); or leave them out and give --task ioi|induction.")
    task = task or (None if given else "ioi")
    if task is not None and task not in TASKS:
        raise InputError(f"--task {task!r}: choose one of {TASKS}.")
    kinds = list(NODES) + (["head_q", "head_k", "head_v"] if star else [])
    if node not in kinds:
        raise InputError(f"--node {node!r}: choose one of {', '.join(kinds)}.")
    m = load_model(model)
    pairs = _task_pairs(m, task, n, seed) if task else pair(clean, corrupt, target, foil)
    metric = "logit_diff" if pairs.foils[0] is not None else "logprob"
    nodes = [k for k in NODES if k != "resid"] if task and len(set(pairs.lengths(m))) > 1 else list(NODES)
    results = run_atp(m, pairs, nodes=nodes, direction="denoise" if denoise else "noise", metric=metric,
                      qk_fix=star, graddrop=star)
    if node not in results:
        raise InputError(f"--node {node!r}: choose one of {sorted(results)}.")
    res = results[node]
    out.print(top_table(res, 10, f"{res.method.upper()} ({res.params['direction']}) by {node}: clean "
                                 f"{res.meta['clean_metric']:.3f}, corrupt {res.meta['corrupt_metric']:.3f}"))
    if "mlp" in results and node != "mlp":
        out.print(top_table(results["mlp"], 5, "MLP layers"))
    write_result(res, json, html, png)


def circuit(task: str = typer.Option("ioi", help="ioi | induction"),
            method: str = typer.Option("eap", help="eap | eap-ig | clean-corrupted | acdc"),
            n: int = typer.Option(20, help="Prompts of the task."),
            edges: int = typer.Option(None, help="Circuit size in edges (default: --fraction of all edges)."),
            fraction: float = typer.Option(0.05, help="Circuit size as a fraction of the graph's edges."),
            select: str = typer.Option("pruned", help="top (largest |score|) | pruned (top, dangling edges "
                                                      "removed) | greedy (grown from the logits, pruned)."),
            rank: str = typer.Option("abs", help="abs (rank edges by |score|: edges that matter either way, aims at "
                                                 "F = 1) | support (edges pushing the metric towards clean; "
                                                 "recovers more, F may exceed 1)."),
            ig_steps: int = typer.Option(5, help="EAP-IG interpolation steps."),
            threshold: float = typer.Option(0.1, help="ACDC's τ (KL increase allowed per removed edge)."),
            curve: bool = typer.Option(False, "--curve", help="Also print the faithfulness curve."),
            seed: int = typer.Option(0, help="Seed of the task generator."),
            model: str = ModelOpt, json: Path = JsonOpt):
    """Find a circuit (EAP, EAP-IG, clean-corrupted EAP or ACDC) and check its faithfulness by patching
    everything else."""
    from lmscope.localization.acdc import acdc
    from lmscope.localization.circuits import evaluate_masks, extract, faithfulness_curve
    from lmscope.localization.eap import eap

    if task not in TASKS:
        raise InputError(f"--task {task!r}: choose one of {TASKS}.")
    if edges is not None and edges < 1:
        raise InputError(f"--edges {edges}: give a circuit size of at least 1 edge (or leave it out for --fraction).")
    if method not in ("eap", "eap-ig", "clean-corrupted", "acdc"):
        raise InputError(f"--method {method!r}: choose eap, eap-ig, clean-corrupted or acdc.")
    if not 0 < fraction <= 1:
        raise InputError(f"--fraction {fraction}: give a fraction in (0, 1].")
    if select not in ("top", "pruned", "greedy"):
        raise InputError(f"--select {select!r}: choose top, pruned or greedy.")
    if rank not in ("abs", "support"):
        raise InputError(f"--rank {rank!r}: choose abs or support.")
    if rank == "support" and method in ("eap", "clean-corrupted"):
        console.print(f"[yellow]note:[/] --rank support trusts the sign of each score; {method} can get it wrong "
                      "for strongly nonlinear edges (input → m0 on SmolLM2). --method eap-ig is safer.")
    m = load_model(model)
    pairs = _task_pairs(m, task, n, seed)
    if method == "acdc":
        with console.status("ACDC: one exact forward per edge…"):
            circ = acdc(m, pairs, threshold=threshold)
        scores = None
    else:
        with console.status(f"{method.upper()} edge scores…"):
            scores = eap(m, pairs, method=method, ig_steps=ig_steps)
        size = edges if edges is not None else max(1, round(fraction * scores.graph.n_edges))
        circ = extract(scores, size, select, absolute=rank == "abs")
    ev = evaluate_masks(m, pairs, [circ.mask])
    gap = ev["clean"] - ev["corrupt"]
    faith = (float(ev["circuit"][0]) - ev["corrupt"]) / gap if abs(gap) > 1e-6 else float("nan")
    circ.meta.update(faithfulness=faith, clean_metric=ev["clean"], corrupt_metric=ev["corrupt"],
                     circuit_metric=float(ev["circuit"][0]))
    table = Table(title=f"{method.upper()} circuit for {task}: {circ.n_edges} of {circ.graph.n_edges} edges, "
                        f"faithfulness {faith:.3f} (logit diff clean {ev['clean']:.3f}, corrupt {ev['corrupt']:.3f})")
    for col in ("source", "target", "score"):
        table.add_column(col)
    for e in circ.edges()[:15]:
        table.add_row(e["source"], e["target"], f"{e['score']:+.4f}")
    out.print(table)
    if curve and scores is not None:
        fc = faithfulness_curve(m, pairs, scores, how=select, absolute=rank == "abs")
        ct = Table(title="Faithfulness against circuit size (complement patched)")
        ct.add_column("edges")
        ct.add_column("fraction")
        ct.add_column("kept")
        ct.add_column("faithfulness")
        for label, frac, kept, f in zip(fc.axes[0].labels, fc.extras["fraction"].tolist(),
                                        fc.extras["kept"].tolist(), fc.values.tolist()):
            ct.add_row(label, f"{frac:.4f}", str(int(kept)), f"{f:.3f}")
        out.print(ct)
        circ.meta["curve"] = {"n_edges": [int(x) for x in fc.axes[0].labels], "kept": fc.extras["kept"].tolist(),
                              "faithfulness": fc.values.tolist()}
    write_result(circ.to_result(), json)


def flow(prompt: str = typer.Option(..., help="The prompt."),
         position: int = typer.Option(None, help="Token position to explain (default: last)."),
         threshold: float = typer.Option(0.04, help="Importance threshold τ in (0, 1)."),
         model: str = ModelOpt, json: Path = JsonOpt):
    """Information-flow routes (Ferrando & Voita 2024): the contribution graph into one position."""
    from lmscope.localization.flow import flow as run_flow

    if not 0 < threshold < 1:
        raise InputError(f"--threshold {threshold}: the threshold must lie strictly between 0 and 1.")
    m = load_model(model)
    res = run_flow(m, prompt, position=position, threshold=threshold)
    edges = res.meta["edges"]
    tokens = res.meta["tokens"]
    table = Table(title=f"Route into position {res.meta['position']} ({tokens[res.meta['position']]!r}): "
                        f"{len(res.meta['nodes'])} nodes, {len(edges)} edges at τ = {threshold}")
    for col in ("source", "target", "weight", "kind"):
        table.add_column(col)
    cross = sorted((e for e in edges if e["kind"] == "attn" and e["source"].split("_")[1] != e["target"].split("_")[1]),
                   key=lambda e: -e["weight"])
    for e in cross[:15]:
        src_pos = int(e["source"].split("_")[1])
        table.add_row(f"{e['source']} ({tokens[src_pos]!r})", e["target"], f"{e['weight']:.3f}", e["kind"])
    out.print(table)
    write_result(res, json)


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
    app.command()(friendly(atp))
    app.command()(friendly(circuit))
    app.command()(friendly(flow))
