"""``lmscope`` command line: one command per job; every method command writes ``--json PATH``.

The method commands are generated from the spec registry (:mod:`lmscope.cli.generated`); the commands
here and in ``cmd_sae.py`` (listing models, the demo, managing SAE files) are not methods.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli import cmd_sae, generated
from lmscope.cli.common import DEMO_PROMPT, ModelOpt, OneLineErrors, console, friendly, out

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True,
                  help="lmscope: open up decoder language models (attribution, patching, lenses).")


@app.command()
@friendly
def models():
    """List the built-in models and whether each is installed and prepared."""
    from lmscope.models import list_models

    table = Table(title="lmscope built-in models")
    for col in ("name", "description", "installed", "prepared", "install with"):
        table.add_column(col)
    for m in list_models():
        table.add_row(m["name"], m["description"], "yes" if m["installed"] else "no",
                      "yes" if m["prepared"] else "no", m["install"])
    out.print(table)


@app.command()
@friendly
def demo(prompt: str = typer.Option(DEMO_PROMPT, help="The prompt to explain."),
         out_dir: Path = typer.Option(Path("lmscope-demo"), "--out", help="Folder for the HTML report."),
         model: str = ModelOpt):
    """Explain one prediction of the default model offline: top tokens, logit lens, DLA, report."""
    from lmscope.cli.demo import run_demo

    run_demo(prompt, out_dir, model, out, console)


cmd_sae.register(app)
generated.register(app, {"sae": cmd_sae.sae_app})  # one command per registered method spec


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
