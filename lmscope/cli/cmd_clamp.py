"""``lmscope clamp run | plot``: train the clamping testbed (:mod:`lmscope.training.clamping`) and plot curves.

``clamp run`` trains one model under the clamps given and writes its curves as a Result (``--json``), a
PNG and an HTML page; ``--out`` keeps the trained model (``lmscope.load(OUT)`` opens it). ``clamp plot`` draws
the curves of several saved runs together. Every option has a default, so ``lmscope clamp run`` trains the
unclamped model on the fast schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmscope.cli.common import check_output, console, friendly, out

clamp_app = typer.Typer(no_args_is_help=True, help="Clamping testbed: watch an induction circuit form in training.")


@friendly
def run_cmd(steps: int = typer.Option(3000, help="Training steps (the paper: 6e5 at lr 1e-5)."),
            lr: float = typer.Option(3e-3, help="Adam learning rate (the paper: 1e-5)."),
            seed: int = typer.Option(0, help="Seed of initialisation and data."),
            classes: int = typer.Option(50, help="Training classes."),
            labels: int = typer.Option(5, help="Labels."),
            clamp: list[str] = typer.Option([], "--clamp", help="prev_token | layer1 | match | copy (repeatable)."),
            single_head: Optional[str] = typer.Option(None, help="Keep only this layer-1 head, e.g. 1.3."),
            ablate: list[str] = typer.Option([], "--ablate", help="Head ablated during training, e.g. 0.2 "
                                                                  "(repeatable)."),
            preserve: str = typer.Option("none", help="With --ablate: none | patterns | values | both."),
            eval_every: int = typer.Option(50, help="Steps between evaluations."),
            out_dir: Optional[Path] = typer.Option(None, "--out", help="Keep the trained model in this folder."),
            json: Path = typer.Option(Path("clamp.json"), "--json", help="Curves as a Result (JSON)."),
            png: Optional[Path] = typer.Option(None, "--png", help="Loss and strength plot (PNG)."),
            html: Optional[Path] = typer.Option(None, "--html", help="Curves page (HTML).")):
    """Train the 2-layer attention-only testbed under clamps; write its loss and induction-strength curves."""
    from lmscope.training import ClampConfig, curves_html, curves_png, train_clamped

    for path, flag in ((json, "--json"), (png, "--png"), (html, "--html")):
        if path is not None:
            check_output(path, flag)
    config = ClampConfig(steps=steps, lr=lr, seed=seed, classes=classes, labels=labels, clamps=tuple(clamp),
                         single_head=single_head, ablate=tuple(ablate), preserve=preserve, eval_every=eval_every,
                         out_dir=None if out_dir is None else str(out_dir))
    _, result = train_clamped(config)
    result.save_json(json)
    console.print(f"wrote {json}")
    if png is not None:
        curves_png([result], png)
        console.print(f"wrote {png}")
    if html is not None:
        curves_html([result], html)
        console.print(f"wrote {html}")
    out.print(_speed_table([result]))


@friendly
def plot_cmd(results: list[Path] = typer.Argument(..., help="Curve files written by `clamp run --json`."),
             series: str = typer.Option("loss", help="loss | accuracy | heldout_loss | heldout_accuracy | strength."),
             png: Optional[Path] = typer.Option(None, "--png", help="Write the plot here (PNG or .svg)."),
             html: Optional[Path] = typer.Option(None, "--html", help="Write loss and strength plots and speeds.")):
    """Plot several clamp runs together and print each run's speed (first step with loss < 0.4·ln 2)."""
    from lmscope.results import Result
    from lmscope.training import curves_html, curves_png

    loaded = [Result.load(p) for p in results]
    if png is None and html is None:
        png = Path("clamp.png")
    if png is not None:
        check_output(png, "--png")
        curves_png(loaded, png, series)
        console.print(f"wrote {png}")
    if html is not None:
        check_output(html, "--html")
        curves_html(loaded, html)
        console.print(f"wrote {html}")
    out.print(_speed_table(loaded))


def _speed_table(results) -> Table:
    table = Table(title="clamp runs (speed: first step with loss < 0.4·ln 2)")
    for col in ("condition", "seed", "speed", "final loss", "final accuracy", "steps/s"):
        table.add_column(col)
    for r in results:
        table.add_row(r.meta["condition"], str(r.params.get("seed")), str(r.meta["speed_step"]),
                      f"{float(r.sel(series='loss').values[-1]):.3f}",
                      f"{float(r.sel(series='accuracy').values[-1]):.3f}", f"{r.meta['steps_per_s']:.1f}")
    return table


def register(app: typer.Typer) -> None:
    clamp_app.command("run")(run_cmd)
    clamp_app.command("plot")(plot_cmd)
    app.add_typer(clamp_app, name="clamp")
