"""``lmscope demo``: explain one prediction of a model end to end, offline, with an HTML report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from lmscope.results import Axis, Result, atomic_write_bytes


def next_tokens(model, prompt: str, k: int = 10) -> Result:
    """The model's top-k next tokens and their probabilities after ``prompt``."""
    probs = model.run(prompt, logits="last").logits[0].float().softmax(-1)
    top = probs.topk(k)
    labels = tuple(model.decode([i]) for i in top.indices.tolist())
    return Result(top.values, (Axis("token", labels),), "next_tokens", model.name,
                  params={"k": k}, meta={"prompt": prompt, "token_ids": top.indices.tolist()})


def run_demo(prompt: str, out_dir: Path, model_spec: str | None, out: Console, console: Console) -> Path:
    import lmscope
    from lmscope.cli.views import lens_table
    from lmscope.cli.common import top_table
    from lmscope.decoding import lens_top, logit_lens
    from lmscope.localization import dla
    from lmscope.plot import report_html

    console.print(f"[bold]lmscope demo[/] — model {model_spec or 'smollm2-135m'}, prompt {prompt!r}")
    model = lmscope.load(model_spec, progress=True)
    with torch.no_grad():
        nxt = next_tokens(model, prompt)
    table = Table(title="Top next-token predictions")
    table.add_column("token")
    table.add_column("probability")
    for label, p in zip(nxt.axes[0].labels, nxt.values.tolist()):
        table.add_row(repr(label), f"{p:.3f}")
    out.print(table)

    top1, top2 = nxt.meta["token_ids"][:2]
    lens = lens_top(logit_lens(model, prompt, top1))
    out.print(lens_table(lens))

    by_head = dla(model, prompt, top1, top2, by="head")
    by_layer = dla(model, prompt, top1, top2, by="layer")
    metric = f"logit({model.decode([top1])!r}) − logit({model.decode([top2])!r})"
    if by_head.meta["softcap"] is not None:
        metric = f"pre-soft-cap {metric}"
    out.print(top_table(by_head, 8, f"Top heads by DLA of {metric} = {by_head.meta['metric_value']:.2f}"))
    mlp = Result(by_head.extras["mlp"], (Axis("mlp_layer", by_head.axes[0].labels),), "dla", model.name,
                 by_head.target, {"by": "mlp"})
    out.print(top_table(mlp, 5, "Top MLP layers by DLA"))

    out_dir.mkdir(parents=True, exist_ok=True)
    lens_df = pd.DataFrame({
        "layer": lens.axes[0].labels,
        "top tokens": [", ".join(repr(t) for t in row) for row in lens.meta["top_tokens"]],
        "top-1 prob": [f"{p:.3f}" for p in lens.values[:, 0].tolist()],
        f"rank of {model.decode([top1])!r}": lens.extras["target_rank"].tolist(),
    })
    page = report_html([
        ("Next-token predictions", nxt),
        ("Logit lens (last position)", lens_df),
        (f"Direct logit attribution by layer: {metric}", by_layer),
        (f"Direct logit attribution by head: {metric}", by_head),
        ("Direct logit attribution by MLP layer", mlp),
    ], title=f"lmscope demo — {model.name}: {prompt!r}")
    report = out_dir / "report.html"
    atomic_write_bytes(report, page.encode("utf-8"))
    for name, res in (("next_tokens", nxt), ("logit_lens", lens), ("dla_head", by_head), ("dla_layer", by_layer)):
        res.save_json(out_dir / f"{name}.json")
    by_head.to_png(out_dir / "dla_head.png")
    console.print(f"[green]report written to {report}[/]")
    return report
