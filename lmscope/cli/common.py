"""Shared pieces of the command line: consoles, common options, error handling, writing results."""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lmscope.errors import LmscopeError

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


def load_model(spec: str | None):
    import lmscope

    with console.status(f"Loading {spec or 'smollm2-135m'}…"):
        return lmscope.load(spec)


def write_result(result, json_path: Path | None, html: Path | None = None, png: Path | None = None) -> None:
    if json_path:
        result.save_json(json_path)
        console.print(f"wrote {json_path}")
    if html:
        result.to_html(html)
        console.print(f"wrote {html}")
    if png:
        result.to_png(png)
        console.print(f"wrote {png}")


def top_table(result, k: int, title: str) -> Table:
    """The k largest and 3 smallest cells of a result, with their labels."""
    table = Table(title=title)
    for name in (*result.axis_names, "value"):
        table.add_column(name)
    for labels, value in result.top(k) + result.top(min(3, k), largest=False):
        table.add_row(*labels, f"{value:+.3f}")
    return table


def write_outputs(written, json_path: Path | None, html: Path | None = None, png: Path | None = None) -> None:
    """Write a Result, or a mapping of named Results: the first to the paths given, each other one to
    ``<json stem>_<name>.json``."""
    if not isinstance(written, dict):
        write_result(written, json_path, html, png)
        return
    for i, (name, result) in enumerate(written.items()):
        if i == 0:
            write_result(result, json_path, html, png)
        elif json_path:
            path = json_path.with_name(f"{json_path.stem}_{name}{json_path.suffix}")
            result.save_json(path)
            console.print(f"wrote {path}")
