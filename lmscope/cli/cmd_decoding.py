"""Decoding commands: the logit and tuned lens (``lmscope lens``), tuned-lens training and evaluation.

``lmscope lens --prompt TEXT [--kind logit|tuned --lens DIR]`` decodes every layer at one position;
``lmscope lens train --tokens N --out DIR [--layers ...]`` trains a tuned lens (also under
``torchrun --nproc_per_node K -m lmscope.cli.main lens train ...``, data-parallel);
``lmscope lens eval --lens DIR`` tabulates held-out KL and cross-entropy per layer beside the logit lens.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli.common import (HtmlOpt, JsonOpt, ModelOpt, PngOpt, at_least, console, friendly, load_model, out,
                                write_result)
from lmscope.errors import InputError

lens_app = typer.Typer(help="Logit and tuned lens: decode the residual stream after every layer.",
                       no_args_is_help=False)


def lens_table(result) -> Table:
    pos = result.meta["position"]
    name = "Tuned lens" if result.method == "tuned_lens" else "Logit lens"
    table = Table(title=f"{name} at position {pos} ({result.meta['tokens'][pos]!r})")
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


def eval_table(result) -> Table:
    table = Table(title=f"Held-out lens quality ({result.params['tokens']} tokens; model CE "
                        f"{result.meta['ce_model']:.3f} nats)")
    for col in ("layer", "KL logit", "KL tuned", "CE logit", "CE tuned"):
        table.add_column(col)
    for label, row in zip(result.axes[0].labels, result.values.tolist()):
        table.add_row(label, *(f"{v:.3f}" for v in row))
    return table


@lens_app.callback(invoke_without_command=True)
@friendly
def lens(ctx: typer.Context,
         prompt: str = typer.Option(None, help="The prompt."),
         target: str = typer.Option(None, help="Token whose rank and probability to follow."),
         k: int = typer.Option(5, help="Top tokens per layer."),
         position: int = typer.Option(None, help="Token position (default: last)."),
         kind: str = typer.Option("logit", help="logit | tuned"),
         lens_path: Path = typer.Option(None, "--lens", help="Folder of a trained tuned lens (for --kind tuned)."),
         model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Logit or tuned lens: decode the residual stream after every layer (subcommands: train, eval)."""
    if ctx.invoked_subcommand is not None:
        return
    if prompt is None:
        raise InputError("Give --prompt TEXT (or a subcommand: `lmscope lens train`, `lmscope lens eval`).")
    if kind not in ("logit", "tuned"):
        raise InputError(f"--kind {kind!r}: use 'logit' or 'tuned'.")
    if kind == "tuned" and lens_path is None:
        raise InputError("--kind tuned needs --lens DIR (train one with `lmscope lens train --out DIR`).")
    from lmscope.decoding.tuned_lens import TunedLens, tuned_lens

    lens = TunedLens.load(lens_path) if kind == "tuned" else None   # an unreadable lens fails before loading
    m = load_model(model)
    if lens is None:
        from lmscope.decoding import logit_lens

        result = logit_lens(m, prompt, target, k=k, position=position)
    else:
        result = tuned_lens(m, prompt, lens, target, k=k, position=position)
    out.print(lens_table(result))
    write_result(result, json, html, png)


@lens_app.command("train")
@friendly
def train(tokens: int = typer.Option(..., help="Training tokens (steps = tokens / (batch·context))."),
          out_dir: Path = typer.Option(..., "--out", help="Folder to write the lens to."),
          layers: list[str] = typer.Option(None, "--layers", help="Layers to train: 'embed', 0, 1, ... (comma-"
                                                                   "separated or repeated); default all."),
          corpus: str = typer.Option("default", help="'default', a .txt file or a folder of text files."),
          context: int = typer.Option(128, help="Tokens per context."),
          batch: int = typer.Option(8, help="Contexts per step (global, split across torchrun processes)."),
          optimizer: str = typer.Option("adam", help="adam | sgd (the reference recipe)."),
          lr: float = typer.Option(None, help="Learning rate (default: adam 1e-4, sgd 0.1)."),
          seed: int = typer.Option(0, help="Random seed."),
          eval_tokens: int = typer.Option(0, help="Also evaluate on this many held-out tokens (0: skip)."),
          model: str = ModelOpt):
    """Train a tuned lens; run under `torchrun --nproc_per_node K -m lmscope.cli.main lens train` for DDP."""
    from lmscope.data import load_corpus
    from lmscope.decoding.tuned_lens import TunedLensConfig, evaluate_lens, train_tuned_lens

    rank = int(os.environ.get("RANK", "0"))
    cfg = TunedLensConfig(tokens=tokens, context=context, batch_contexts=batch, optimizer=optimizer, lr=lr,
                          seed=seed)
    text = load_corpus(corpus)
    m = load_model(model)
    chosen = [item for group in layers or [] for item in group.split(",") if item.strip()] or None
    lens = train_tuned_lens(m, text, cfg, layers=chosen, progress=rank == 0)
    if rank != 0:
        return
    lens.save(out_dir)
    console.print(f"wrote {out_dir} ({lens.info['tokens_seen']} tokens, {lens.info['steps']} steps, "
                  f"{lens.info['world_size']} process(es))")
    if eval_tokens:
        out.print(eval_table(evaluate_lens(m, lens, text, tokens=eval_tokens, context=context, progress=True)))


@lens_app.command("eval")
@friendly
def evaluate(lens_path: Path = typer.Option(None, "--lens", help="Tuned lens folder (default: logit lens only)."),
             tokens: int = typer.Option(4096, help="Held-out tokens."),
             corpus: str = typer.Option("default", help="'default', a .txt file or a folder of text files."),
             context: int = typer.Option(128, help="Tokens per context."),
             model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Held-out KL to the final distribution and next-token CE per layer, tuned lens beside the logit lens."""
    from lmscope.data import load_corpus
    from lmscope.decoding.tuned_lens import TunedLens, evaluate_lens

    at_least(tokens, "--tokens")
    at_least(context, "--context", 2)
    lens = None if lens_path is None else TunedLens.load(lens_path)
    text = load_corpus(corpus)
    m = load_model(model)
    if lens is not None:
        lens.check_model(m)
    result = evaluate_lens(m, lens, text, tokens=tokens, context=context, progress=True)
    out.print(eval_table(result))
    write_result(result, json, html, png)


def register(app: typer.Typer) -> None:
    app.add_typer(lens_app, name="lens")
