"""``lmscope`` command line: one command per job; every method command writes ``--json PATH``.

The method commands are generated from the spec registry (:mod:`lmscope.cli.generated`), ``sae train |
eval | features | compare`` included; the commands here (listing models, the demo) are not methods.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli import cmd_clamp, generated
from lmscope.cli.common import DEMO_PROMPT, ModelOpt, OneLineErrors, console, friendly, out

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True,
                  help="lmscope: open up decoder language models (attribution, patching, lenses).")


@app.command()
@friendly
def models():
    """List the built-in models (weights from packages, and the small models lmscope trains itself at first use)
    and whether each is installed and prepared (trained and cached)."""
    from lmscope.models import list_models

    table = Table(title="lmscope built-in models")
    table.add_column("name", no_wrap=True)  # never shortened: it is what users type
    table.add_column("weights")
    table.add_column("description", overflow="fold")
    table.add_column("installed")
    table.add_column("prepared")
    table.add_column("install with", overflow="fold")  # wrapped, never cut, so it can be copied
    for m in list_models():
        table.add_row(m["name"], "package" if m["kind"] == "package" else "trained by lmscope", m["description"],
                      "yes" if m["installed"] else "no", "yes" if m["prepared"] else "no", m["install"])
    out.print(table)


@app.command()
@friendly
def demo(prompt: str = typer.Option(DEMO_PROMPT, help="The prompt to explain."),
         out_dir: Path = typer.Option(Path("lmscope-demo"), "--out", help="Folder for the HTML report."),
         model: str = ModelOpt):
    """Explain one prediction of the default model offline: top tokens, logit lens, DLA, report."""
    from lmscope.cli.demo import run_demo

    run_demo(prompt, out_dir, model, out, console)


@app.command("app")
@friendly
def app_cmd(model: str = ModelOpt,
            host: str = typer.Option("127.0.0.1", help="Address to bind; anything but localhost exposes the model "
                                                      "to the network (a warning is printed)."),
            port: int = typer.Option(8000, help="Port to serve on (0: any free port)."),
            max_tokens: int = typer.Option(512, "--max-tokens", help="Longest prompt the app accepts, in tokens."),
            requests: int = typer.Option(0, "--requests", help="Stop after this many requests (0: serve until "
                                                               "Ctrl-C); for scripted checks."),
            sae_dir: Path | None = typer.Option(None, "--sae-dir", help="A folder of SAE folders the SAE view may "
                                                                         "read (nothing outside it is read).")):
    """Serve the interactive explorer (contribution graph, node inspector, every method) and its JSON API."""
    from lmscope.app import App, make_server
    from lmscope.cli.common import load_model
    from lmscope.errors import InputError

    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: give a port from 0 to 65535 (0: any free port).")
    if max_tokens < 1 or requests < 0:
        raise InputError("--max-tokens must be at least 1 and --requests at least 0.")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning: binding {host} lets anyone who reaches this machine run the model "
                      "through the app; use the default 127.0.0.1 unless you mean it.[/yellow]")
    if sae_dir is not None and not sae_dir.is_dir():
        raise InputError(f"--sae-dir {sae_dir}: not a folder; give the folder that holds your SAE folders.")
    server = make_server(App(load_model(model), max_tokens=max_tokens, sae_dir=sae_dir), host, port, requests)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    out.print(f"lmscope app serving {url} (Starlette on uvicorn; Ctrl-C stops it)", soft_wrap=True)
    try:
        server.serve_forever()  # uvicorn stops on Ctrl-C, or after --requests requests
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


sae_app = typer.Typer(no_args_is_help=True, help="Sparse autoencoders: train, evaluate, inspect, compare.")
app.add_typer(sae_app, name="sae")
cmd_clamp.register(app)
generated.register(app, {"sae": sae_app})  # one command per registered method spec


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
