"""Watch an induction circuit form: train the clamping testbed and record its progress measures.

Singh, Moskovitz, Hill, Chan, Saxe (ICML 2024), "What needs to go right for an induction head?": a
2-layer, 8-head, d=64 attention-only transformer (RoPE, pre-LayerNorm, causal) learns bursty few-shot
classification (:mod:`lmscope.training.fewshot`). Its loss sits at the ln 2 plateau ("answer one of the two
labels in context"), then drops when induction heads form; the timing moves when parts of the circuit are
clamped to their ideal values during training (:mod:`lmscope.training.clamps`).

Training: Adam, batch 32, cross-entropy over the K label logits at the query. The paper uses lr 1e-5 for
6e5–1e6 steps; the default here is a faster schedule (lr 3e-3, 3000 steps). With few training classes it
shows the plateau and the drop within a few hundred steps; with more classes the drop comes later (it was not
measured at 50 classes on this schedule). Recorded every ``eval_every`` steps on fixed evaluation batches (with the
training interventions applied): loss and accuracy on training sequences and on held-out relabelings, and
each layer-2 head's (``blocks.1``) induction strength (query attention to the correct label minus the other label).
**Speed** is the first evaluation step with training loss < 0.4·ln 2.

Differences from the paper: the data (Gaussian prototypes, see :mod:`lmscope.training.fewshot`); the
clamp runs keep all eight layer-2 heads unless ``single_head`` is given (the paper's clamp runs use the
single head 1:3 with the others ablated: ``single_head="1.3"``); the fast schedule.

The result is a :class:`~lmscope.results.Result` of curves (series × step); the trained model is a plain
lmscope model (``save_model``/``lmscope.load``), so every inference method runs on it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.errors import InputError
from lmscope.interventions import Ablate, Patch
from lmscope.models import Model, new_attn_only, parameters, save_model
from lmscope.results import Axis, Result
from lmscope.training.clamps import CLAMPS, PRESERVE, Conditions, as_batch, interventions, parse_head
from lmscope.training.fewshot import FewShotTask

LN2 = math.log(2)
N_HEADS = 8
PAPER_SCHEDULE = {"lr": 1e-5, "steps": 600_000}  # clamp runs (1e6 for the main run), batch 32


@dataclass(frozen=True)
class ClampConfig:
    """One training run of the clamping testbed (task, model, schedule, clamps)."""

    steps: int = specs.option(3000, "Training steps (the paper: 6e5 for clamp runs at lr 1e-5).")
    lr: float = specs.option(3e-3, "Adam learning rate (the paper: 1e-5; the default is the fast schedule).")
    batch: int = specs.option(32, "Sequences per step.")
    seed: int = specs.option(0, "Seed of initialisation and data.")
    classes: int = specs.option(50, "Training classes.")
    labels: int = specs.option(5, "Labels (label pairs are split 8:2 into training and held-out relabelings).")
    noise: float = specs.option(0.1, "Exemplar noise around each Gaussian class prototype.")
    clamps: tuple[str, ...] = specs.option((), f"Clamps applied during training: {', '.join(CLAMPS)}.")
    single_head: str | None = specs.option(None, "Keep only this layer-1 head (e.g. 1.3); ablate the others.")
    ablate: tuple[str, ...] = specs.option((), "Heads ablated (v = 0) during training, e.g. 0.1 0.2.")
    preserve: str = specs.option("none", "With --ablate: keep the next layer's patterns/values from an "
                                         "unablated run.", choices=PRESERVE)
    pt_head: str = specs.option("0.2", "Head clamped by the prev_token clamp.")
    ih_head: str = specs.option("1.3", "Head clamped by the match and copy clamps.")
    eval_every: int = specs.option(50, "Steps between evaluations.")
    eval_batch: int = specs.option(512, "Sequences per evaluation batch.")
    out_dir: str | None = specs.option(None, "Folder for the trained model (lmscope.load opens it); none: not saved.")

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or self.eval_every < 1 or self.eval_batch < 2 or self.lr <= 0:
            raise InputError("steps, batch, eval_every, eval_batch and lr must be positive.")
        self.conditions()

    def conditions(self) -> Conditions:
        ablate = tuple(self.ablate)
        if self.single_head is not None:
            layer, head = parse_head(self.single_head)
            ablate += tuple(f"{layer}.{h}" for h in range(N_HEADS) if h != head)
        return Conditions(ablate=ablate, preserve=self.preserve, clamps=tuple(self.clamps), pt_head=self.pt_head,
                          ih_head=self.single_head or self.ih_head)

    def task(self) -> FewShotTask:
        return FewShotTask(classes=self.classes, labels=self.labels, noise=self.noise, seed=self.seed)


def new_testbed(task: FewShotTask, seed: int = 0) -> Model:
    """The paper's model: 2 layers × 8 heads, d = 64, attention-only, RoPE, pre-LayerNorm, causal."""
    return new_attn_only(task.words(), d_model=64, n_layers=2, n_heads=N_HEADS, norm="layer", features=task.features(),
                         n_ctx=16, seed=seed, name=f"clamp-testbed-s{seed}")


def label_logits(model: Model, batch: dict[str, torch.Tensor], ivs, task: FewShotTask, cache=()):
    """(B, K) logits of the K label tokens at the query (the linear readout over labels), and the run."""
    out = model.run(as_batch(batch["ids"]), interventions=ivs, cache=cache, grad=torch.is_grad_enabled(), logits="last")
    return out.logits[:, : task.labels], out


def evaluate(model: Model, cond: Conditions, task: FewShotTask, batch: dict[str, torch.Tensor]) -> dict:
    """Loss, accuracy and every layer-1 head's induction strength on ``batch`` under the conditions."""
    with torch.no_grad():
        ivs = interventions(model, cond, batch)
        logits, out = label_logits(model, batch, ivs, task, cache=["blocks.1.attn.pattern"])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["target"]).item()
        acc = (logits.argmax(-1) == batch["target"]).float().mean().item()
        q = out["blocks.1.attn.pattern"][:, :, -1]  # (B, H, T) the query's row
        rows = torch.arange(q.shape[0])
        strength = (q[rows, :, batch["correct"]] - q[rows, :, batch["other"]]).mean(0)
    return {"loss": loss, "accuracy": acc, "strength": strength.tolist()}


def train_clamped(config: ClampConfig, *, progress: bool = True, on_eval=None) -> tuple[Model, Result]:
    """Train the testbed under ``config``'s clamps; the model and its curves (series × step).

    ``on_eval(step, row)``, optional, is called after each evaluation with that row of the curves."""
    task = config.task()
    cond = config.conditions()
    model = new_testbed(task, config.seed)
    cond.check(model)
    opt = torch.optim.Adam(list(parameters(model)), lr=config.lr)
    g = torch.Generator().manual_seed(10_000 + config.seed)
    g_eval = torch.Generator().manual_seed(20_000 + config.seed)
    evals = {s: task.sample(config.eval_batch, g_eval, s) for s in ("train", "heldout_labels")}
    steps, rows = [], []
    t0 = time.perf_counter()

    def record(step):
        tr, ho = (evaluate(model, cond, task, evals[s]) for s in ("train", "heldout_labels"))
        steps.append(step)
        rows.append([tr["loss"], tr["accuracy"], ho["loss"], ho["accuracy"], *tr["strength"]])
        if on_eval is not None:
            on_eval(step, rows[-1])

    record(0)
    for step in tqdm(range(1, config.steps + 1), desc=f"clamp {cond.label}", disable=not progress):
        batch = task.sample(config.batch, g, "train")
        with torch.enable_grad():
            ivs = interventions(model, cond, batch)
            logits, _ = label_logits(model, batch, ivs, task)
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % config.eval_every == 0 or step == config.steps:
            record(step)
    seconds = time.perf_counter() - t0
    series = ("loss", "accuracy", "heldout_loss", "heldout_accuracy",
              *(f"strength.H{h}" for h in range(model.spec.n_heads)))
    values = torch.tensor(rows).T
    meta = {"speed_step": speed(steps, values[0].tolist()), "threshold": 0.4 * LN2, "ln2": LN2,
            "conditions": asdict(cond), "condition": cond.label, "steps_per_s": config.steps / seconds,
            "data": "Gaussian class prototypes in 512-d + exemplar noise (not the paper's Omniglot features)",
            "paper_schedule": PAPER_SCHEDULE}
    if config.out_dir:
        meta["model_dir"] = str(save_model(model, config.out_dir))
    result = Result(values, (Axis("series", series), Axis("step", steps)), "clamp", model.name, None,
                    specs.config_to_json(config), {}, meta)
    return model, result


def speed(steps: list[int], losses: list[float], threshold: float = 0.4 * LN2) -> int | None:
    """The first recorded step whose loss is below ``threshold`` (None if never)."""
    return next((s for s, v in zip(steps, losses) if v < threshold), None)


def preserved_ablation(model: Model, task: FewShotTask, batch: dict[str, torch.Tensor], layer: int = 0) -> dict:
    """Accuracy with every head of ``layer`` ablated: plainly, and with the next layer's patterns and values
    kept from the unablated run (only the direct path of the ablated heads is removed)."""
    ids, out = batch["ids"], {}
    nxt = [f"blocks.{layer + 1}.attn.pattern", f"blocks.{layer + 1}.attn.v"]
    with torch.no_grad():
        clean = model.run(as_batch(ids), cache=nxt, logits="none")
        ablate = [Ablate(f"blocks.{layer}.attn.v")]
        for name, ivs in (("intact", []), ("ablated", ablate),
                          ("ablated_preserved", ablate + [Patch(s, value=clean[s]) for s in nxt])):
            logits, _ = label_logits(model, batch, ivs, task)
            out[name] = (logits.argmax(-1) == batch["target"]).float().mean().item()
    return out


def curves_png(results: list[Result], path: str | Path, series: str = "loss", title: str | None = None) -> Path:
    """Line plot of one series of several clamp Results (loss curves get the ln 2 and 0.4·ln 2 lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps = [int(s) for s in r.axes[1].labels]
        cols = [i for i, s in enumerate(r.axes[0].labels) if s == series or s.startswith(series + ".")]
        for i in cols:
            label = f"{r.meta.get('condition', '')} s{r.params.get('seed', '')} {r.axes[0].labels[i]}"
            ax.plot(steps, r.values[i].tolist(), label=label, lw=1)
    if series.endswith("loss"):
        ax.axhline(LN2, color="grey", ls="--", lw=0.8)
        ax.axhline(0.4 * LN2, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(series)
    ax.set_title(title or f"clamping testbed: {series}")
    if len(results) * max(1, len(cols)) <= 16:
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="svg" if path.suffix == ".svg" else None, dpi=120)
    plt.close(fig)
    return path


def curves_html(results: list[Result], path: str | Path, series: tuple[str, ...] = ("loss", "strength")) -> Path:
    """An HTML page with one inline SVG plot per series and a table of speeds."""
    parts = []
    for s in series:
        buf = Path(path).with_suffix(f".{s}.svg")
        curves_png(results, buf, s)
        parts.append(buf.read_text())
        buf.unlink()
    rows = "".join(f"<tr><td>{r.meta.get('condition')}</td><td>{r.params.get('seed')}</td>"
                   f"<td>{r.meta.get('speed_step')}</td><td>{r.meta.get('steps_per_s', 0):.1f}</td></tr>"
                   for r in results)
    page = ("<html><head><meta charset='utf-8'><title>lmscope clamp</title></head><body>"
            "<h1>Clamping testbed</h1><p>Data: Gaussian class prototypes + exemplar noise, not Omniglot.</p>"
            "<table border=1><tr><th>condition</th><th>seed</th><th>speed (first step with loss &lt; 0.4 ln 2)"
            f"</th><th>steps/s</th></tr>{rows}</table>{''.join(parts)}</body></html>")
    Path(path).write_text(page)
    return Path(path)
