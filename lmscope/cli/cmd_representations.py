"""Command-line commands for reading representations: Patchscopes, probes, steering, projections."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.table import Table

from lmscope.cli.common import (HtmlOpt, JsonOpt, ModelOpt, PngOpt, at_least, console, friendly, load_model, out,
                                write_result)
from lmscope.errors import InputError


def parse_layers(text: str | None) -> list[int] | None:
    """'0,5,10', '0-10' (inclusive), '0:30:5' (Python range) or None for all layers."""
    if text is None or text.strip() in ("", "all"):
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:
                layers += list(range(*[int(x) for x in part.split(":")]))
            elif re.fullmatch(r"\d+-\d+", part):
                a, b = part.split("-")
                layers += list(range(int(a), int(b) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise InputError(f"Cannot read layers {text!r}: use '0,5,10', '0-10' or '0:30:5'.") from None
    return layers


def _pair(text: str, what: str) -> tuple[int, int]:
    try:
        a, b = text.split(".")
        return int(a), int(b)
    except ValueError:
        raise InputError(f"--{what} {text!r}: write LAYER.INDEX, e.g. 3.5.") from None


def patchscope(source: str = typer.Option(..., help="Source prompt whose hidden state is read."),
               layer: int = typer.Option(..., help="Source layer (input of this block; 0 = embeddings)."),
               position: int = typer.Option(-1, help="Source token position (default: last)."),
               target_prompt: str = typer.Option("identity", help="'identity', 'entity' or a prompt holding a "
                                                                   "placeholder '?' or 'x'."),
               target_layer: int = typer.Option(None, help="Target layer (default: the source layer)."),
               target_position: int = typer.Option(None, help="Target position (default: the placeholder)."),
               generate: int = typer.Option(0, "--generate", help="Also generate this many tokens greedily."),
               sweep: bool = typer.Option(False, help="Sweep all source layers × target layers instead."),
               k: int = typer.Option(10, help="Top tokens to show."),
               model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Patchscope: patch a hidden state into a target prompt and decode what it says."""
    from lmscope.decoding.patchscopes import patchscope as run_patchscope
    from lmscope.decoding.patchscopes import patchscope_sweep

    m = load_model(model)
    if sweep:
        result = patchscope_sweep(m, source, position=position, target=target_prompt,
                                  target_position=target_position)
        table = Table(title=f"Patchscope sweep: probability of {result.target['expected']!r} "
                            "(rows: source layer, columns: every 5th target layer; top-1 token)")
        table.add_column("source layer")
        cols = list(range(0, len(result.axes[1]), 5))
        for c in cols:
            table.add_column(f"→{result.axes[1].labels[c]}")
        for i, label in enumerate(result.axes[0].labels):
            table.add_row(label, *[f"{result.values[i, c]:.2f} {result.meta['top_tokens'][i][c]!r}" for c in cols])
    else:
        result = run_patchscope(m, source, layer, position=position, target=target_prompt, target_layer=target_layer,
                                target_position=target_position, k=k, max_new_tokens=generate)
        table = Table(title=f"Patchscope: {source!r} layer {layer} pos {result.meta['source_position']} → target "
                            f"layer {result.params['target_layer']} pos {result.meta['target_position']}")
        table.add_column("rank")
        table.add_column("token")
        table.add_column("probability")
        for r, (t, p) in enumerate(zip(result.meta["top_tokens"], result.values.tolist()), 1):
            table.add_row(str(r), repr(t), f"{p:.3f}")
    out.print(table)
    if "generated" in result.meta:
        out.print(f"generated: {result.meta['generated']!r}")
    write_result(result, json, html, png)


def probe(dataset: str = typer.Option(None, help="Built-in set (sst2, cola, spam, sae-probes:<stem>) or a "
                                                 "CSV/TSV/JSONL file with text and label columns."),
          site: str = typer.Option("resid_post", help="Site kind: resid_pre, resid_post, mlp_out, attn.z, ..."),
          layers: str = typer.Option(None, help="Layers: '0,5,10', '0-10' or '0:30:5' (default: all)."),
          position: str = typer.Option("last", help="last | mean | marked ([[...]] in the text) | an index."),
          kind: str = typer.Option("logistic", help="logistic | ridge | mean_diff"),
          limit: int = typer.Option(400, help="Use at most this many examples (class-balanced sample)."),
          folds: int = typer.Option(5, help="Cross-validation folds."),
          l2: float = typer.Option(1e-3, help="L2 penalty."),
          control: bool = typer.Option(True, help="Also run the control task (selectivity)."),
          text_field: str = typer.Option(None, help="Text column of the file (default: found by name)."),
          label_field: str = typer.Option(None, help="Label column of the file (default: found by name)."),
          list_sets: bool = typer.Option(False, "--list", help="List the built-in labelled sets and exit."),
          model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Linear probes per layer with cross-validation, a control task and selectivity."""
    from lmscope.data.labelled import builtin_names, load_labelled
    from lmscope.decoding.probes import ProbeConfig, probe_layers

    if list_sets:
        for name in builtin_names():
            out.print(name)
        return
    if dataset is None:
        raise InputError("Give --dataset NAME_OR_FILE (or --list to see the built-in sets).")
    pos: str | int = int(position) if position.lstrip("-").isdigit() else position
    config = ProbeConfig(kind=kind, l2=l2, folds=folds)
    data = load_labelled(dataset, limit=limit, text_field=text_field, label_field=label_field)
    m = load_model(model)
    with console.status(f"Probing {len(data)} examples…"):
        result = probe_layers(m, data.texts, data.y, site=site, layers=parse_layers(layers), position=pos,
                              config=config, control=control, classes=data.classes)
    table = Table(title=f"{kind} probe on {data.name} ({len(data)} examples, {site}, position {position}); "
                        f"majority baseline {result.meta['majority_baseline']:.3f}")
    for col in ("layer", "accuracy", "± std", "control", "selectivity"):
        table.add_column(col)
    for i, label in enumerate(result.axes[0].labels):
        acc, ctrl, sel = result.values[i].tolist()
        table.add_row(label, f"{acc:.3f}", f"{float(result.extras['accuracy_std'][i]):.3f}", f"{ctrl:.3f}",
                      f"{sel:+.3f}")
    out.print(table)
    write_result(result, json, html, png)


def steer(positive: str = typer.Option(..., help="Positive prompt, e.g. ' Love'."),
          negative: str = typer.Option(..., help="Negative prompt, e.g. ' Hate'."),
          layer: int = typer.Option(..., help="Layer whose input (resid_pre) receives the vector."),
          scale: float = typer.Option(4.0, help="Multiplier of the vector."),
          prompt: str = typer.Option(..., help="Prompt to continue."),
          method: str = typer.Option("actadd", help="actadd: per-position h(+) − h(−) added at the first "
                                                    "positions; mean: last-token difference added everywhere."),
          max_new_tokens: int = typer.Option(20, help="Tokens to generate."),
          model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Steering: generate with and without a vector from a prompt pair added to the residual stream."""
    import torch

    from lmscope.decoding.steering import actadd_vector, direction_from_texts, generate
    from lmscope.results import Axis, Result

    if method not in ("actadd", "mean"):
        raise InputError(f"--method {method!r}: use actadd or mean.")
    at_least(max_new_tokens, "--max-new-tokens")
    m = load_model(model)
    if method == "actadd":
        vec = actadd_vector(m, positive, negative, layer)
    else:
        vec = direction_from_texts(m, [positive], [negative], layer)
    plain = generate(m, prompt, max_new_tokens=max_new_tokens)
    steered = generate(m, prompt, vec, layer, scale=scale, max_new_tokens=max_new_tokens)
    out.print(f"[bold]unsteered:[/] {prompt}{plain.texts[0]}", markup=True, highlight=False)
    out.print(f"[bold]steered ({method}, layer {layer}, scale {scale}):[/] {prompt}{steered.texts[0]}",
              markup=True, highlight=False)
    chosen = [g.log_probs[0].gather(-1, g.tokens[0][:, None])[:, 0] for g in (plain, steered)]
    result = Result(torch.stack(chosen), (Axis("variant", ("unsteered", "steered")),
                                          Axis("step", tuple(str(i) for i in range(max_new_tokens)))),
                    "steer", m.name, {"positive": positive, "negative": negative},
                    {"layer": layer, "scale": scale, "method": method, "max_new_tokens": max_new_tokens},
                    {"vector": vec}, {"prompt": prompt, "texts": [plain.texts[0], steered.texts[0]],
                                      "tokens": [[m.decode([i]) for i in g.tokens[0].tolist()] for g in (plain, steered)]})
    write_result(result, json, html, png)


def project(head: str = typer.Option(None, help="Head as LAYER.HEAD, e.g. 5.3."),
            neuron: str = typer.Option(None, help="Neuron as LAYER.NEURON, e.g. 10.1234."),
            tokens: str = typer.Option(None, help="Comma-separated input tokens for a head (mind leading spaces), "
                                                  "e.g. ' Paris, London'. Default: those of a few common words "
                                                  "that are single tokens for the model."),
            k: int = typer.Option(10, help="Tokens per row."),
            model: str = ModelOpt, json: Path = JsonOpt, html: Path = HtmlOpt, png: Path = PngOpt):
    """Weight projections: a head's OV/QK circuits or a neuron's output direction in vocabulary space."""
    from lmscope.decoding.projections import neuron_tokens, ov_circuit, qk_circuit

    if (head is None) == (neuron is None):
        raise InputError("Give exactly one of --head LAYER.HEAD or --neuron LAYER.NEURON.")
    layer, index = _pair(neuron, "neuron") if neuron is not None else _pair(head, "head")
    m = load_model(model)
    if neuron is not None:
        result = neuron_tokens(m, layer, index, k=k)
        table = Table(title=f"Neuron {layer}.{index}: tokens its output direction promotes / suppresses")
        table.add_column("side")
        table.add_column("tokens (direct logit per unit activation)")
        for i, side in enumerate(result.axes[0].labels):
            table.add_row(side, ", ".join(f"{t!r} {v:+.2f}" for t, v in zip(result.meta["tokens"][i],
                                                                              result.values[i].tolist())))
        out.print(table)
        write_result(result, json, html, png)
        return
    words = None if tokens is None else [t for t in tokens.split(",") if t]
    ov = ov_circuit(m, layer, index, words, k=k)
    qk = qk_circuit(m, layer, index, words, k=k)
    for res, title in ((ov, "OV circuit: tokens promoted when attending to"), (qk, "QK circuit: keys matched by")):
        table = Table(title=f"Head {layer}.{index} {title} each token")
        table.add_column("token")
        table.add_column("top tokens")
        for i, label in enumerate(res.axes[0].labels):
            table.add_row(repr(label), ", ".join(repr(t) for t in res.meta["top_tokens"][i]))
        out.print(table)
    write_result(ov, json, html, png)
    if json:
        qk_path = json.with_name(json.stem + "_qk" + json.suffix)
        qk.save_json(qk_path)
        console.print(f"wrote {qk_path}")


def register(app: typer.Typer) -> None:
    """Add this family's commands to `app`."""
    app.command()(friendly(patchscope))
    app.command()(friendly(probe))
    app.command()(friendly(steer))
    app.command()(friendly(project))
