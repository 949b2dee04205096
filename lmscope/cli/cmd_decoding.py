"""Decoding commands: the logit lens (more lenses, Patchscopes, probes, steering join here)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli.common import HtmlOpt, JsonOpt, ModelOpt, PngOpt, friendly, load_model, out, write_result


def lens_table(result) -> Table:
    pos = result.meta["position"]
    table = Table(title=f"Logit lens at position {pos} ({result.meta['tokens'][pos]!r})")
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


def lens(prompt: str = typer.Option(..., help="The prompt."),
         target: str = typer.Option(None, help="Token whose rank and probability to follow."),
         k: int = typer.Option(5, help="Top tokens per layer."),
         position: int = typer.Option(None, help="Token position (default: last)."),
         model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Logit lens: decode the residual stream after every layer."""
    from lmscope.decoding import logit_lens

    m = load_model(model)
    result = logit_lens(m, prompt, target, k=k, position=position)
    out.print(lens_table(result))
    write_result(result, json, html, png)


def register(app: typer.Typer) -> None:
    app.command()(friendly(lens))
