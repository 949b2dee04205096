"""Command-line commands of the attribution family (registered on the main app by register())."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli.common import HtmlOpt, JsonOpt, ModelOpt, PngOpt, friendly, load_model, out, write_result
from lmscope.errors import InputError

METHOD_HELP = ("saliency | input-x-gradient | integrated-gradients | occlusion | attention | rollout | "
               "attention-norm | alti | alti-logit | value-zeroing")


def token_table(result) -> Table:
    t = result.target or {}
    what = f"{t.get('target')!r}" + (f" vs {t['foil']!r}" if "foil" in t else "") if t else "last position"
    table = Table(title=f"{result.method} · {what}")
    table.add_column("#")
    table.add_column("token")
    table.add_column("score")
    for i, (label, value) in enumerate(zip(result.axes[0].labels, result.values.tolist())):
        table.add_row(str(i), repr(label), f"{value:+.4f}")
    return table


def generation_table(result) -> Table:
    table = Table(title=f"{result.method}: {result.meta['generated']!r}")
    table.add_column("step")
    table.add_column("token")
    table.add_column("p")
    table.add_column("top source")
    for s, label in enumerate(result.axes[1].labels):
        col = result.values[:, s]
        best = int(col.nan_to_num(float("-inf")).argmax())
        table.add_row(str(s), repr(label), f"{float(result.extras['step_probability'][s]):.3f}",
                      f"{result.axes[0].labels[best]!r} ({float(col[best]):+.3f})")
    return table


def attribute(prompt: str = typer.Option(..., help="The prompt."),
              target: str = typer.Option(None, help="Target token (mind the leading space), e.g. ' Mary' "
                                                    "(default: the model's top prediction)."),
              foil: str = typer.Option(None, help="Foil token for a contrastive target (target − foil)."),
              method: str = typer.Option("integrated-gradients", help=METHOD_HELP),
              metric: str = typer.Option(None, help="logit | probability | log_probability (with --generate: "
                                                       "default probability)."),
              steps: int = typer.Option(None, help="Integrated-gradients steps (default 64)."),
              baseline: str = typer.Option(None, help="IG/occlusion baseline: scaled | zero | pad | unk | eos | "
                                                          "a token."),
              generate: int = typer.Option(None, help="Generate N tokens and attribute each of them."),
              model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Which input tokens drive a prediction: a token heat map and the JSON result."""
    from lmscope.attribution import attribute as run_attribute
    from lmscope.attribution.methods import METHODS, MIXING_METHODS

    method = method.replace("_", "-")
    if method not in METHODS:
        raise InputError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}.")
    if steps is not None and method != "integrated-gradients":
        raise InputError("--steps applies to integrated-gradients only; drop it or use that method.")
    kwargs = {}
    if steps is not None:
        kwargs["steps"] = steps
    if baseline is not None:
        if method not in ("integrated-gradients", "occlusion"):
            raise InputError("--baseline applies to integrated-gradients and occlusion only.")
        kwargs["baseline"] = baseline
    if method not in MIXING_METHODS and method != "alti-logit":
        kwargs["metric"] = metric or ("probability" if generate is not None else "logit")
    elif metric is not None:
        raise InputError(f"--metric does not apply to {method} (alti-logit explains logits; the context-mixing "
                         "methods have no target); drop it.")
    m = load_model(model)
    result = run_attribute(m, prompt, target, foil, method=method, generate=generate, **kwargs)
    out.print(generation_table(result) if generate is not None else token_table(result))
    if "relative_delta" in result.meta:
        out.print(f"completeness: relative delta {result.meta['relative_delta']:.3g} at {result.meta['steps']} steps "
                  f"(baseline {result.meta['baseline']})")
    write_result(result, json, html, png)


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
    app.command()(friendly(attribute))
