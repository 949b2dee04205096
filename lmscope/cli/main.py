"""``lmscope`` command line: one command per job; every method command writes ``--json PATH``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lmscope.errors import LmscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lmscope: open up decoder language models (attribution, patching, lenses).")
console = Console(stderr=True)
out = Console()

DEMO_PROMPT = "When Mary and John went to the store, John gave a drink to"
ModelOpt = typer.Option(None, "--model", "-m", help="Built-in name, HF folder, .gguf file or hub id "
                                                    "(default: smollm2-135m).")
JsonOpt = typer.Option(None, "--json", help="Write the result as JSON here.")
HtmlOpt = typer.Option(None, "--html", help="Write an interactive, self-contained HTML plot here.")
PngOpt = typer.Option(None, "--png", help="Write a PNG plot here.")


def friendly(fn):
    """Turn lmscope errors into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmscopeError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(2) from None

    return wrapper


def _load(spec: str | None):
    import lmscope

    with console.status(f"Loading {spec or 'smollm2-135m'}…"):
        return lmscope.load(spec)


def _write(result, json_path: Path | None, html: Path | None = None, png: Path | None = None) -> None:
    if json_path:
        result.save_json(json_path)
        console.print(f"wrote {json_path}")
    if html:
        result.to_html(html)
        console.print(f"wrote {html}")
    if png:
        result.to_png(png)
        console.print(f"wrote {png}")


def lens_table(result) -> Table:
    table = Table(title=f"Logit lens at position {result.meta['position']} "
                        f"({result.meta['tokens'][result.meta['position']]!r})")
    table.add_column("layer")
    table.add_column("top tokens (probability)")
    if "target_prob" in result.extras:
        table.add_column(f"{result.target['target']!r} rank / prob")
    for i, label in enumerate(result.axes[0].labels):
        tops = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(result.meta["top_tokens"][i], result.values[i].tolist()))
        row = [label, tops]
        if "target_prob" in result.extras:
            row.append(f"{int(result.extras['target_rank'][i])} / {float(result.extras['target_prob'][i]):.3f}")
        table.add_row(*row)
    return table


def top_table(result, k: int, title: str) -> Table:
    table = Table(title=title)
    for name in (*result.axis_names, "attribution"):
        table.add_column(name)
    for labels, value in result.top(k) + result.top(min(3, k), largest=False):
        table.add_row(*labels, f"{value:+.3f}")
    return table


@app.command()
@friendly
def models():
    """List the built-in models and whether each is installed and prepared."""
    from lmscope.models.loading import list_models

    table = Table(title="lmscope built-in models")
    for col in ("name", "description", "installed", "prepared", "install with"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m["name"], m["description"], "yes" if m["installed"] else "no",
                      "yes" if m["prepared"] else "no", m["install"])
    out.print(table)


@app.command()
@friendly
def dla(prompt: str = typer.Option(..., help="The prompt."),
        target: str = typer.Option(..., help="Target token, e.g. ' Mary' (mind the leading space)."),
        foil: str = typer.Option(None, help="Foil token: attribute the logit difference target − foil."),
        by: str = typer.Option("layer", help="layer | head | neuron"),
        position: int = typer.Option(None, help="Token position (default: last)."),
        model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Direct logit attribution by layer, head or neuron (final-norm scale frozen)."""
    from lmscope.localization import dla as run_dla

    m = _load(model)
    result = run_dla(m, prompt, target, foil, by=by, position=position)
    out.print(top_table(result, 10, f"DLA of {result.meta['metric']} (model: {result.meta['model_value']:.3f}, "
                                    f"constant {result.meta['constant']:.3f})"))
    _write(result, json, html, png)


@app.command()
@friendly
def lens(prompt: str = typer.Option(..., help="The prompt."),
         target: str = typer.Option(None, help="Token whose rank and probability to follow."),
         k: int = typer.Option(5, help="Top tokens per layer."),
         position: int = typer.Option(None, help="Token position (default: last)."),
         model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Logit lens: decode the residual stream after every layer."""
    from lmscope.decoding import logit_lens

    m = _load(model)
    result = logit_lens(m, prompt, target, k=k, position=position)
    out.print(lens_table(result))
    _write(result, json, html, png)


@app.command()
@friendly
def demo(prompt: str = typer.Option(DEMO_PROMPT, help="The prompt to explain."),
         out_dir: Path = typer.Option(Path("lmscope-demo"), "--out", help="Folder for the HTML report."),
         model: str = ModelOpt):
    """Explain one prediction of the default model offline: top tokens, logit lens, DLA, report."""
    from lmscope.cli.demo import run_demo

    run_demo(prompt, out_dir, model, out, console)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
