"""Shared pieces of the command line: consoles, common options, error handling, writing results."""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmscope.errors import InputError, LmscopeError

console = Console(stderr=True)
out = Console()

DEMO_PROMPT = "When Mary and John went to the store, John gave a drink to"
ModelOpt = typer.Option(None, "--model", "-m", help="Built-in name, HF folder, .gguf file or hub id "
                                                    "(default: smollm2-135m).")
JsonOpt = typer.Option(None, "--json", help="Write the result as JSON here.")
HtmlOpt = typer.Option(None, "--html", help="Write an interactive, self-contained HTML plot here.")
PngOpt = typer.Option(None, "--png", help="Write a PNG plot here.")


# options naming something a command writes: checked before the command does any work
OUTPUT_FILES = {"json": "--json", "html": "--html", "png": "--png"}
OUTPUT_FOLDERS = {"out_dir": "--out"}


def friendly(fn):
    """Check the command's output paths first, then run it; lmscope errors become one line on stderr and
    exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            for name, flag in OUTPUT_FILES.items():
                if kwargs.get(name) is not None:
                    check_output(kwargs[name], flag)
            for name, flag in OUTPUT_FOLDERS.items():
                if kwargs.get(name) is not None:
                    check_output(kwargs[name], flag, folder=True)
            return fn(*args, **kwargs)
        except LmscopeError as err:
            console.print(f"[bold red]error:[/] {escape(' '.join(str(err).split()))}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


# click's own exception classes, wherever they live (typer ≥ 0.26 vendors click as typer._click)
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """The root command group: click's own usage errors (an unknown command or option, a missing or malformed
    value) print one line that names the fix and exit 2, like lmscope's errors (no usage box)."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line(self, None, args):
            ctx = super().make_context(info_name, list(args), parent=parent, **extra)
        ctx.meta["lmscope.args"] = list(args)
        return ctx

    def invoke(self, ctx):
        with _one_line(self, ctx, ctx.meta.get("lmscope.args", [])):
            return super().invoke(ctx)


def _command_words(group, ctx, args) -> list[str]:
    """The leading words of ``args`` that name a command (``["sae", "eval"]``), for the help hint."""
    words, command = [], group
    for word in args:
        sub = command.get_command(ctx, word) if ctx is not None and hasattr(command, "get_command") else None
        if sub is None:
            break
        words.append(word)
        command = sub
    return words


@contextlib.contextmanager
def _one_line(group, ctx, args):
    try:
        yield
    except _ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":   # `lmscope` alone shows the help, as it should
            raise
        message = " ".join(err.format_message().split())
        param = getattr(err, "param", None)
        if type(err).__name__ == "MissingParameter" and getattr(param, "help", None):
            message = f"{message.rstrip('.')}: {' '.join(param.help.split())}"
        if not message.endswith((".", "?", "!")):
            message += "."
        command = " ".join(["lmscope", *_command_words(group, ctx, args)])
        console.print(f"[bold red]error:[/] {escape(message)} Run `{escape(command)} --help` for the options.",
                      soft_wrap=True)
        raise typer.Exit(2) from None


def check_output(path: Path, flag: str, *, folder: bool = False) -> None:
    """Fail before any work if ``path`` cannot be written: it must not be a folder (a file for ``folder``),
    and its nearest existing parent must be a folder this process can create files in."""
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder; give a folder path (new or existing).")
    if not folder and path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file path such as {path / ('result' + _suffix(flag))}.")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path} cannot be written: {parent} is a file, not a folder. Choose another path.")
    if not _can_create_in(parent):
        raise InputError(f"{flag} {path} cannot be written: the folder {parent} is read-only for this user. "
                         "Choose a writable folder.")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried for real: permission bits do not bind root, and
    read-only mounts or special file systems do not show in them)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def at_least(value: int | None, flag: str, low: int = 1) -> None:
    """A count option must be at least ``low`` (None: not given)."""
    if value is not None and value < low:
        raise InputError(f"{flag} {value}: give {low} or more.")


def _suffix(flag: str) -> str:
    return {"--json": ".json", "--html": ".html", "--png": ".png"}.get(flag, "")


def load_model(spec: str | None):
    """Load a model behind a spinner (transformers' per-weight bars stay hidden; a first use that
    dequantises a GGUF still shows its bar)."""
    import lmscope

    with console.status(f"Loading {spec or 'smollm2-135m'}…"):
        return lmscope.load(spec, progress=False)


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
