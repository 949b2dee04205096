"""``lmscope`` command line: one command per job; every method command writes ``--json PATH``.

Each method family registers its commands from its own ``cmd_<family>.py`` module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli import cmd_attribution, cmd_circuits, cmd_decoding, cmd_patching, cmd_representations, cmd_sae
from lmscope.cli.common import (DEMO_PROMPT, HtmlOpt, JsonOpt, ModelOpt, PngOpt, console, friendly, load_model,
                                out, top_table, write_result)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="lmscope: open up decoder language models (attribution, patching, lenses).")


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

    m = load_model(model)
    result = run_dla(m, prompt, target, foil, by=by, position=position)
    meta = result.meta
    capped = f", {meta['model_value']:.3f} after the soft-cap" if meta["softcap"] is not None else ""
    out.print(top_table(result, 10, f"DLA of {meta['metric']} (model: {meta['metric_value']:.3f}{capped}, "
                                    f"constant {meta['constant']:.3f})"))
    write_result(result, json, html, png)


@app.command()
@friendly
def demo(prompt: str = typer.Option(DEMO_PROMPT, help="The prompt to explain."),
         out_dir: Path = typer.Option(Path("lmscope-demo"), "--out", help="Folder for the HTML report."),
         model: str = ModelOpt):
    """Explain one prediction of the default model offline: top tokens, logit lens, DLA, report."""
    from lmscope.cli.demo import run_demo

    run_demo(prompt, out_dir, model, out, console)


for _family in (cmd_attribution, cmd_patching, cmd_circuits, cmd_decoding, cmd_representations, cmd_sae):
    _family.register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
