"""Command-line commands of the patching family: ``lmscope patch`` and ``lmscope trace``."""

from __future__ import annotations

from pathlib import Path

import typer

from lmscope.cli.common import HtmlOpt, JsonOpt, ModelOpt, PngOpt, friendly, load_model, out, top_table, write_result


def patch(clean: str = typer.Option(..., help="Clean prompt (the behaviour is present)."),
          corrupt: str = typer.Option(..., help="Corrupted prompt of the same token length."),
          target: str = typer.Option(..., help="Clean answer token, e.g. ' Mary' (mind the leading space)."),
          foil: str = typer.Option(..., help="Competing token, e.g. ' John'; metric: logit(target) − logit(foil)."),
          site: str = typer.Option("resid_pre", help="resid_pre | resid_mid | attn_out | mlp_out | "
                                                     "z (per head) | q | k | v | pattern | head_out"),
          denoise: bool = typer.Option(True, "--denoise/--noise",
                                       help="Denoise: clean values into the corrupted run (default); "
                                            "noise: the reverse."),
          source: str = typer.Option(None, help="clean | corrupt | zeros | mean (default: the other run)."),
          by_position: bool = typer.Option(False, "--by-position",
                                           help="For per-head sites: layer × head × position."),
          model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Activation patching sweep: layer × position (residual/block sites) or layer × head (z, q, k, v, ...)."""
    from lmscope.localization.patching import activation_patching
    from lmscope.localization.tasks import pair

    m = load_model(model)
    per_head = site in ("z", "q", "k", "v", "pattern", "head_out")
    result = activation_patching(m, pair(clean, corrupt, target, foil), site,
                                 direction="denoise" if denoise else "noise", source=source,
                                 by_position=True if not per_head else by_position, progress=True)
    meta = result.meta
    out.print(top_table(result, 10, f"{result.method} of {site} (clean {meta['clean_metric']:.3f}, corrupt "
                                    f"{meta['corrupt_metric']:.3f}; normalised)"))
    write_result(result, json, html, png)


def trace(prompt: str = typer.Option(..., help="Factual prompt, e.g. 'The Eiffel Tower is in'."),
          subject: str = typer.Option(..., help="Subject text as written in the prompt, e.g. 'The Eiffel Tower'."),
          target: str = typer.Option(None, help="Answer token (default: the clean top-1 token)."),
          kind: str = typer.Option("hidden", help="hidden | mlp | attn"),
          samples: int = typer.Option(10, help="Noised copies."),
          noise: float = typer.Option(3.0, help="Noise std as a multiple of the embedding std."),
          window: int = typer.Option(None, help="Layers restored together (default 1 for hidden, 10 otherwise)."),
          model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Causal tracing (Meng et al.): restore clean states into a subject-noised run, layer × position."""
    from lmscope.localization.tracing import causal_trace

    m = load_model(model)
    result = causal_trace(m, prompt, subject, target, kind=kind, samples=samples, noise=noise, window=window,
                          progress=True)
    meta = result.meta
    out.print(top_table(result, 10, f"Causal trace ({kind}) of {result.target['target']!r}: clean p="
                                    f"{meta['clean_prob']:.3f}, noised p={meta['corrupt_prob']:.3f}"))
    write_result(result, json, html, png)


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
    app.command()(friendly(patch))
    app.command()(friendly(trace))
