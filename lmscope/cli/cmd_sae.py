"""Sparse-autoencoder commands: ``lmscope sae eval | features | compare`` (``sae train`` is generated from the
``sae-train`` spec, :mod:`lmscope.sae.train_site`).

Training harvests the site's activations into ``OUT/activations`` (or reads ``--store``) and writes the SAE
in SAELens's layout to OUT; a killed run resumes from OUT's checkpoint when started again with the same
arguments. Under ``torchrun --nproc_per_node N -m lmscope.cli.main sae train ...`` it trains data-parallel.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli.common import JsonOpt, ModelOpt, at_least, check_output, console, friendly, load_model, out
from lmscope.errors import InputError

sae_app = typer.Typer(no_args_is_help=True, help="Sparse autoencoders: train, evaluate, inspect, compare.")

_SHOWN = ("l0", "fve", "gamma", "gamma_centred", "ce_recovered", "delta_ce", "dead_frac", "dense_frac", "tokens")


def _undefined_notes(rows: list) -> None:
    """Say why a shown metric is NaN (recorded by the evaluation in ``meta["undefined"]``)."""
    for label, result in rows:
        for metric, why in result.meta.get("undefined", {}).items():
            if metric in _SHOWN:
                console.print(f"note: {metric} of {label} is undefined (nan): {why}.")


def _metrics_table(rows: list[tuple[str, dict]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("sae")
    for m in _SHOWN:
        table.add_column(m)
    for label, vals in rows:
        table.add_row(label, *(f"{vals[m]:.4g}" for m in _SHOWN))
    return table


@friendly
def eval_cmd(sae_dir: Path = typer.Argument(..., help="SAE folder (cfg.json + sae_weights.safetensors)."),
             contexts: int = typer.Option(32, help="Held-out contexts of 128 tokens to evaluate on."),
             max_norm_ratio: float = typer.Option(None, help="Leave positions whose activation norm exceeds this "
                                                  "multiple of the median out of the metrics (kept clean)."),
             model: str = ModelOpt, json: Path = JsonOpt):
    """L0, variance explained, CE loss recovered (vs zero ablation), dead/dense latents, shrinkage γ."""
    from lmscope.data import token_contexts
    from lmscope.sae import load_sae
    from lmscope.sae.evaluation import METRICS, evaluate
    from lmscope.sae.io import check_fits

    at_least(contexts, "--contexts")
    sae = load_sae(sae_dir)
    check_output(sae_dir / "eval.json", "SAE folder")
    m = load_model(model or sae.cfg.model or None)
    check_fits(sae, m)                # a wrong-width SAE fails before the held-out text is tokenised
    held = token_contexts(m, "default", context=128, split="heldout", max_tokens=128 * contexts)
    result = evaluate(sae, m, held, max_norm_ratio=max_norm_ratio, progress=True)
    result.save_json(sae_dir / "eval.json")
    out.print(_metrics_table([(str(sae_dir), dict(zip(METRICS, result.values.tolist())))],
                             f"{sae.cfg.arch} SAE on {sae.cfg.site} ({m.name})"))
    _undefined_notes([(str(sae_dir), result)])
    if json:
        result.save_json(json)


@friendly
def features_cmd(sae_dir: Path = typer.Argument(..., help="SAE folder."),
                 top: int = typer.Option(10, "--top", help="Top-activating contexts per latent."),
                 latents: int = typer.Option(20, help="How many latents (the densest live ones)."),
                 contexts: int = typer.Option(64, help="Held-out contexts of 128 tokens to search."),
                 html: Path = typer.Option(..., "--html", help="Write the feature dashboards here."),
                 model: str = ModelOpt, json: Path = JsonOpt):
    """Feature dashboards: top-activating contexts (token marked), density, promoted/suppressed tokens."""
    import torch

    from lmscope.data import token_contexts
    from lmscope.sae import load_sae
    from lmscope.sae.features import feature_report, features_html, top_activations
    from lmscope.sae.io import check_fits

    for value, flag in ((top, "--top"), (latents, "--latents"), (contexts, "--contexts")):
        at_least(value, flag)
    sae = load_sae(sae_dir)
    m = load_model(model or sae.cfg.model or None)
    check_fits(sae, m)                # a wrong-width SAE fails before the held-out text is tokenised
    held = token_contexts(m, "default", context=128, split="heldout", max_tokens=128 * contexts)
    _, _, _, density = top_activations(sae, m, held[:8], k=1)
    order = density.argsort(descending=True)
    chosen = order[density[order] > 0][:latents]
    fallback = torch.arange(min(latents, sae.cfg.d_sae))
    report = feature_report(sae, m, held, latents=chosen if chosen.numel() else fallback, k=top, progress=True)
    features_html(report, html)
    console.print(f"wrote {html}")
    if json:
        report.save_json(json)


@friendly
def compare_cmd(sae_dirs: list[Path] = typer.Argument(..., help="SAE folders (evaluated with `sae eval` first, "
                                                               "or evaluated now)."),
                png: Path = typer.Option(None, "--png", help="Write the Pareto plot here."),
                contexts: int = typer.Option(32, help="Held-out contexts for SAEs without eval.json."),
                max_norm_ratio: float = typer.Option(None, help="As in `sae eval`, for SAEs without eval.json."),
                model: str = ModelOpt, json: Path = JsonOpt):
    """Compare SAEs: L0 against variance explained and CE loss recovered (Pareto plot)."""
    from lmscope.data import token_contexts
    from lmscope.errors import ResultFormatError
    from lmscope.results import Result
    from lmscope.sae import load_sae
    from lmscope.sae.evaluation import METRICS, compare, evaluate, pareto_png

    at_least(contexts, "--contexts")
    saes, saved = {}, {}
    for d in sae_dirs:             # every folder is checked before any evaluation runs
        if (d / "eval.json").exists():
            try:
                res = Result.load(d / "eval.json")
            except ResultFormatError:
                raise InputError(f"{d / 'eval.json'} is not a readable evaluation result; delete it, or write it "
                                 f"again with `lmscope sae eval {d}`.") from None
            if res.method != "sae_eval":
                raise InputError(f"{d / 'eval.json'} holds a {res.method!r} result, not an SAE evaluation; delete "
                                 f"it, or write it again with `lmscope sae eval {d}`.")
            if list(res.axes[0].labels) == list(METRICS):   # else written by an older version: evaluate again
                saved[d] = res
        if d not in saved:
            saes[d] = load_sae(d)
    results, m = [], None
    for d in sae_dirs:
        if d in saved:
            results.append(saved[d])
            continue
        sae = saes[d]
        m = m or load_model(model or sae.cfg.model or None)
        held = token_contexts(m, "default", context=128, split="heldout", max_tokens=128 * contexts)
        r = evaluate(sae, m, held, max_norm_ratio=max_norm_ratio)
        r.save_json(d / "eval.json")
        results.append(r)
    comp = compare(results, [d.name for d in sae_dirs])
    out.print(_metrics_table([(lab, dict(zip(METRICS, row.tolist())))
                              for lab, row in zip(comp.axes[0].labels, comp.values)], "SAE comparison"))
    _undefined_notes(list(zip(comp.axes[0].labels, results)))
    if png:
        pareto_png(comp, png)
        console.print(f"wrote {png}")
    if json:
        comp.save_json(json)


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
    sae_app.command("eval")(eval_cmd)
    sae_app.command("features")(features_cmd)
    sae_app.command("compare")(compare_cmd)
    app.add_typer(sae_app, name="sae")
