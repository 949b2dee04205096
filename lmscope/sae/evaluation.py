"""Evaluating SAEs: sparsity, fidelity, shrinkage, and the model's loss with the SAE spliced in.

Metrics (METHODS §11.6; the first position of every context is excluded, as in the activation store —
first-token activations have outsized norms):

* ``l0``: mean number of active latents per token; ``fve``: fraction of variance explained
  ``1 − Σ‖x − x̂‖² / Σ‖x − E x‖²``; ``mse``: mean ``‖x − x̂‖²``.
* ``gamma``: relative reconstruction bias (Gated SAE paper, eq. 10; SAELens and dictionary_learning compute it
  the same way, on raw activations) ``argmin_γ E‖x̂/γ − x‖² = E‖x̂‖² / E[x·x̂]``; γ < 1 means the SAE shrinks
  its reconstructions. ``gamma_centred`` is the same fit after subtracting the mean activation ``μ = E x`` from
  both x and x̂: ``E‖x̂ − μ‖² / E[(x − μ)·(x̂ − μ)]``. Where activations have a large mean (SmolLM2's residual
  stream: ‖μ‖² is about half of E‖x‖²), the decoder bias reproduces μ exactly and raw γ is pulled towards 1
  whatever the features do; the centred γ measures the shrinkage of the part the latents have to explain.
* ``ce_clean``, ``ce_sae``, ``ce_zero``: next-token cross-entropy of the clean model, with the reconstruction
  patched in at the site (positions ≥ 1, in the same forward: the SAE reads the clean activation, which is
  what the patched run sees there), and with the site zero-ablated; ``ce_recovered`` =
  ``(ce_zero − ce_sae) / (ce_zero − ce_clean)`` (zero-ablation baseline), ``delta_ce = ce_sae − ce_clean``.
* ``max_norm_ratio``: tokens whose activation norm exceeds this multiple of the median norm ("massive
  activations", attention-sink tokens: in SmolLM2 some second-position tokens reach 100× the median norm and
  carry most of the variance) are left out of the metrics and left clean in the spliced run, like position 0.
* ``dead_frac`` (never fired on the evaluation tokens), ``dense_frac`` (fires on > ``dense`` of tokens);
  the per-latent density and a histogram of log10 density are extras of the result.

:func:`compare` stacks evaluations of several SAEs into one result and :func:`pareto_png` plots L0 against
variance explained and against loss recovered.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmscope.errors import InputError
from lmscope.interventions import Ablate, Patch
from lmscope.results import Axis, Result, atomic_write_bytes
from lmscope.sae.base import SAE, typical_mask
from lmscope.sae.io import check_fits

METRICS = ("l0", "fve", "mse", "gamma", "gamma_centred", "ce_clean", "ce_sae", "ce_zero", "ce_recovered", "delta_ce",
           "dead_frac", "dense_frac", "tokens")
HIST_EDGES = torch.linspace(-7, 0, 29)


class _Acc:
    """Running sums for the reconstruction metrics over (N, D) chunks."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.l0 = 0.0
        self.err = 0.0
        self.sx = None
        self.sxx = 0.0
        self.sxh = None
        self.xhat2 = 0.0
        self.xdot = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    @torch.no_grad()
    def add(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise InputError("The activations to evaluate on hold NaN or infinite values, so every metric would be "
                             "NaN. Check the model (load it in float32) or the activation store (harvest it again).")
        if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(x_hat).all())):
            raise InputError("The SAE's latents or reconstruction hold NaN or infinite values on finite inputs, so "
                             "its weights are broken or overflow; re-train it (or re-save it in float32).")
        x, x_hat = x.double(), x_hat.double()
        active = f > 0
        self.n += x.shape[0]
        self.l0 += active.sum().item()
        self.err += (x - x_hat).pow(2).sum().item()
        self.sx = x.sum(0) if self.sx is None else self.sx + x.sum(0)
        self.sxh = x_hat.sum(0) if self.sxh is None else self.sxh + x_hat.sum(0)
        self.sxx += x.pow(2).sum().item()
        self.xhat2 += x_hat.pow(2).sum().item()
        self.xdot += (x * x_hat).sum().item()
        self.fires += active.sum(0).cpu()

    def metrics(self, dense: float) -> dict[str, float]:
        if self.n == 0:
            raise InputError("No tokens to evaluate on; give more contexts or activations.")
        var = self.sxx - self.sx.pow(2).sum().item() / self.n
        density = self.fires.double() / self.n
        mu, mu_hat = self.sx / self.n, self.sxh / self.n
        # Σ‖x̂ − μ‖² and Σ(x − μ)·(x̂ − μ) from the running sums (Σx = nμ)
        c_hat2 = self.xhat2 - 2 * self.n * (mu * mu_hat).sum().item() + self.n * mu.pow(2).sum().item()
        c_dot = self.xdot - self.n * (mu * mu_hat).sum().item()
        return {"l0": self.l0 / self.n, "fve": 1 - self.err / max(var, 1e-30), "mse": self.err / self.n,
                "gamma": self.xhat2 / self.xdot if self.xdot else float("nan"),
                "gamma_centred": c_hat2 / c_dot if c_dot else float("nan"),
                "dead_frac": (density == 0).double().mean().item(), "dense_frac": (density > dense).double().mean().item(),
                "tokens": float(self.n)}

    def density(self) -> torch.Tensor:
        return self.fires.double() / max(self.n, 1)


def density_histogram(density: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Counts of log10(density) in HIST_EDGES bins (live latents) and the number of dead latents."""
    live = density[density > 0].double().log10().clamp(HIST_EDGES[0].item(), HIST_EDGES[-1].item())
    counts = torch.histogram(live.float(), bins=HIST_EDGES).hist if live.numel() else torch.zeros(len(HIST_EDGES) - 1)
    return counts, int((density == 0).sum())


_UNDEFINED = {"gamma": "the reconstructions are orthogonal to the activations (E[x·x̂] = 0)",
              "gamma_centred": "the centred reconstructions are orthogonal to the centred activations",
              "ce_recovered": "zero-ablating the site does not change the loss, so there is nothing to recover"}


def _result(sae: SAE, values: dict[str, float], acc: _Acc, model_name: str, params: dict) -> Result:
    """The metrics as a Result; a metric that is undefined (NaN) is named with the reason in
    ``meta["undefined"]``, and any other non-finite value is an error (never silent NaN)."""
    undefined = {}
    for name, value in values.items():
        if value != value or abs(value) == float("inf"):
            if name not in _UNDEFINED:
                raise InputError(f"The SAE evaluation produced {value} for {name}: the model's outputs are not "
                                 "finite on these contexts. Check the model (load it in float32) and the contexts.")
            undefined[name] = _UNDEFINED[name]
    for name in METRICS:
        if name not in values:
            undefined[name] = "not computed: the evaluation had no model (activations only)"
    counts, dead = density_histogram(acc.density())
    return Result(torch.tensor([values.get(m, float("nan")) for m in METRICS]), (Axis("metric", METRICS),),
                  method="sae_eval", model=model_name or sae.cfg.model,
                  params={"arch": sae.cfg.arch, "site": sae.cfg.site, "d_sae": sae.cfg.d_sae, **params},
                  extras={"density": acc.density().float(), "density_hist": counts.float(),
                          "hist_edges": HIST_EDGES.clone()},
                  meta={"dead_latents": dead, "sae_config": sae.cfg.to_dict(), "undefined": undefined})


@torch.no_grad()
def evaluate_activations(sae: SAE, batches, *, max_tokens: int | None = None, dense: float = 0.1,
                         max_norm_ratio: float | None = None) -> Result:
    """Reconstruction metrics (no model) over an iterable of (B, D) activations, e.g. ``store.batches(4096)``.

    ``max_norm_ratio``: leave out rows whose norm exceeds this multiple of the batch's median norm.
    """
    acc = _Acc(sae.cfg.d_sae)
    for x in batches:
        x = x.float()
        x = x[typical_mask(x, max_norm_ratio)]
        f = sae.encode(x)
        acc.add(x, f, sae.decode(f))
        if max_tokens and acc.n >= max_tokens:
            break
    return _result(sae, acc.metrics(dense), acc, sae.cfg.model, {"source": "activations",
                                                                  "max_norm_ratio": max_norm_ratio})


@torch.no_grad()
def evaluate(sae: SAE, model, contexts: torch.Tensor, *, batch_size: int = 4, dense: float = 0.1,
             max_norm_ratio: float | None = None, progress: bool = False) -> Result:
    """All metrics, including CE loss recovered with the SAE spliced into ``model`` at its site.

    ``contexts``: (N, T) token ids (e.g. held-out ``lmscope.data.token_contexts``), T ≥ 3.
    ``max_norm_ratio``: positions whose activation norm exceeds this multiple of the batch's median norm are
    left out of the reconstruction metrics and keep their clean activation in the spliced run.
    """
    site = check_fits(sae, model)
    if contexts.ndim != 2 or contexts.shape[1] < 3:
        raise InputError(f"contexts must be (N, T) token ids with T ≥ 3, got shape {tuple(contexts.shape)}.")
    acc = _Acc(sae.cfg.d_sae)
    ce = torch.zeros(3, dtype=torch.float64)
    n_ce = 0
    T = contexts.shape[1]
    later = list(range(1, T))
    for start in tqdm(range(0, len(contexts), batch_size), desc="evaluate SAE", disable=not progress):
        ids = contexts[start:start + batch_size]
        clean = model.run(ids, cache=[site.name], logits="all")
        act = clean[site.name]
        x = act.reshape(*act.shape[:2], -1).float()
        f = sae.encode(x[:, 1:])
        x_hat = sae.decode(f)
        keep = typical_mask(x[:, 1:], max_norm_ratio)
        acc.add(x[:, 1:][keep], f[keep], x_hat[keep])
        x_hat = torch.where(keep[..., None], x_hat, x[:, 1:])
        patched = torch.cat([x[:, :1], x_hat], dim=1).reshape(act.shape).to(act.dtype)
        runs = model.run_sets(ids, [[Patch(site.name, patched, positions=later)],
                                    [Ablate(site.name, "zero", positions=later)]], logits="all")
        targets = ids[:, 2:].reshape(-1).to(clean.logits.device)
        for i, logits in enumerate((clean.logits, runs.logits[0], runs.logits[1])):
            ce[i] += F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]).float(), targets,
                                     reduction="sum").item()
        n_ce += targets.numel()
    ce_clean, ce_sae, ce_zero = (ce / n_ce).tolist()
    values = acc.metrics(dense)
    values.update(ce_clean=ce_clean, ce_sae=ce_sae, ce_zero=ce_zero, delta_ce=ce_sae - ce_clean,
                  ce_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"))
    return _result(sae, values, acc, model.name, {"contexts": int(len(contexts)), "context": int(T),
                                                   "baseline": "zero ablation", "max_norm_ratio": max_norm_ratio})


def compare(results: list[Result], labels: list[str] | None = None) -> Result:
    """Stack several ``sae_eval`` results into one (sae, metric) result."""
    if not results:
        raise InputError("compare needs at least one evaluation result.")
    if any(r.method != "sae_eval" for r in results):
        raise InputError("compare takes results of lmscope.sae.evaluate / evaluate_activations.")
    labels = labels or [f"{r.params.get('arch')}-{i}" for i, r in enumerate(results)]
    if len(set(labels)) != len(labels):
        labels = [f"{lab}-{i}" for i, lab in enumerate(labels)]
    return Result(torch.stack([r.values for r in results]), (Axis("sae", labels), Axis("metric", METRICS)),
                  method="sae_compare", model=results[0].model,
                  params={"archs": [r.params.get("arch") for r in results],
                          "sites": [r.params.get("site") for r in results]})


def pareto_png(comparison: Result, path: str | os.PathLike) -> Path:
    """L0 against variance explained and against CE loss recovered, one point per SAE, coloured by arch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = list(METRICS)
    vals = comparison.values
    archs = comparison.params["archs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, name in ((axes[0], "fve", "variance explained"), (axes[1], "ce_recovered", "CE loss recovered")):
        for arch in sorted(set(archs)):
            rows = [i for i, a in enumerate(archs) if a == arch]
            pts = sorted((vals[i, m.index("l0")].item(), vals[i, m.index(metric)].item()) for i in rows)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=arch)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(name)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SAE Pareto frontier ({comparison.model})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
