"""Gradient attribution: saliency, input × gradient and integrated gradients.

Which tokens drive a prediction, read from the gradient of a target (see :mod:`.targets`) with
respect to the input embeddings ``e`` (T, D):

* saliency (Simonyan et al., 2014): ``‖∂f/∂e_t‖₂`` per token (raw gradient in ``extras``);
* input × gradient: ``Σ_k e_{t,k} ∂f/∂e_{t,k}`` (signed; its L2 norm in ``extras["norm"]``);
* integrated gradients (Sundararajan et al., 2017):
  ``IG = (e − e') ⊙ ∫₀¹ ∇f(e' + α(e − e')) dα`` with Gauss-Legendre or Riemann quadrature; the
  steps are evaluated in batches of ``internal_batch_size`` rows. The convergence delta
  ``Σ IG − (f(e) − f(e'))`` is always returned (``meta``).

Where the gradient is taken: at the ``embed`` site, the vector the first block sees. For Gemma
that is after its √d embedding scaling (the scaling happens inside the embedding module). For
GPT-2 the ``embed`` site is token + position embedding; ``e`` is then the *token* part only
(baselines replace the token part and keep the positions), so positions are never attributed.

Baselines ``e'`` (special-token positions such as BOS, and by default the first position, always
keep their own embedding):

* ``"neutral"`` (default): a neutral token's embedding at every other position: the tokenizer's UNK,
  else PAD, else EOS (Inseq's rule). It removes each token's identity, so IG answers "what does this
  token add over a neutral token here". The first position is kept (``keep_first``): in models
  without BOS it is the attention sink, and replacing it moves the baseline far from any input the
  model sees (completeness then fails badly). The choice among token-removing baselines (neutral
  token, EOS, mean embedding) was made by measurement; the figures are in the README ("Integrated
  gradients' baseline").
* ``"scaled"``: ``baseline_scale × e`` (0.3 by default). It keeps each token's identity: on a
  pre-norm model the first block sees the same normalised input along the whole path, so it asks
  "what if the embeddings were smaller" (how the residual stream's magnitude matters), not "what if
  the token were absent". It converges in few steps (the path avoids the first RMSNorm's
  singularity at zero), which makes it a cheap check, not a removal attribution.
* ``"zero"``, ``"pad"``, ``"unk"``, ``"bos"``, any single token (``" the"``, an id), or a tensor
  (T, D) given at the ``embed`` site (used as is).

Steps. With ``steps=None`` (default) the path starts as one segment of 32 Gauss-Legendre nodes and
is refined by bisection (:func:`integrate_adaptive`) until the relative completeness error
``|Σ IG − (f(e) − f(e'))| / |f(e) − f(e')|`` is at most ``tolerance`` (1% by default) or ``max_steps``
(512) nodes are spent: completeness holds on every piece of the path, so each segment's own error
says where to refine. Each round's new nodes run in batches of ``internal_batch_size``. An explicit
``steps=N`` runs N steps on one segment (refined only if ``tolerance`` is given). The measured error
is always in ``meta`` (``relative_delta``, with every round in ``refinement``); above the tolerance
(or ``warn_above`` for fixed steps) a :class:`ConvergenceWarning` says so.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.models import Batch, Model, embed_parts
from lmscope.attribution.targets import Target, resolve_position, resolve_target, token_result

QUADRATURES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
NAMED_BASELINES = ("neutral", "scaled", "zero", "pad", "unk", "eos", "bos")
DEFAULT_BASELINE = "neutral"
DEFAULT_TOLERANCE = 0.01
FIRST_STEPS = 32


class ConvergenceWarning(UserWarning):
    """Integrated gradients did not reach completeness within the tolerance."""


# ---------------------------------------------------------------------------------------- shared core
def _prepare(model: Model, prompt, target, foil, metric, position) -> tuple[Batch, Target]:
    batch = model.encode(prompt)
    if batch.input_ids.shape[0] != 1:
        raise InputError("Attribution explains one prompt at a time; pass a single string.")
    pos = resolve_position(position, batch.input_ids.shape[1])
    return batch, resolve_target(model, target, foil, metric, pos)


def target_gradients(model: Model, batch: Batch, embeds: torch.Tensor, target: Target, *,
                     internal_batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """f (N,) and ∂f/∂embed (N, T, D) for N embedding inputs (N, T, D) of one prompt, in batches."""
    n_tok = batch.input_ids.shape[1]
    keep = n_tok - resolve_position(target.position, n_tok)
    values, grads = [], []
    for start in range(0, embeds.shape[0], internal_batch_size):
        emb = embeds[start:start + internal_batch_size].detach().clone().requires_grad_(True)
        with model.hooks(interventions=[Patch("embed", value=emb)], grad=True), torch.enable_grad():
            out = model.forward(batch.repeat(emb.shape[0]), logits_to_keep=keep)  # logits from position on
        f = target.score(out.logits[:, 0])
        (g,) = torch.autograd.grad(f.sum(), emb)
        values.append(f.detach().cpu())
        grads.append(g.detach().float().cpu())
    return torch.cat(values), torch.cat(grads)


def _special_mask(model: Model, batch: Batch, keep_first: bool = False) -> torch.Tensor:
    """(T,) True at special-token positions (BOS and the like), which keep their embedding in baselines;
    with ``keep_first`` the first position too (the attention sink of models without BOS)."""
    special = set(model.tokenizer.all_special_ids or [])
    mask = torch.tensor([int(i) in special for i in batch.input_ids[0].tolist()])
    if keep_first:
        mask[0] = True
    return mask


def _named_token_id(model: Model, name: str) -> int:
    tok = model.tokenizer
    if name == "neutral":  # Inseq's rule: UNK, else PAD, else EOS
        for other in ("unk", "pad", "eos"):
            if getattr(tok, f"{other}_token_id", None) is not None:
                return int(getattr(tok, f"{other}_token_id"))
    tid = getattr(tok, f"{name}_token_id", None)
    if tid is None:
        raise InputError(f"{model.name}'s tokenizer has no {name} token; use baseline='scaled', 'zero', "
                         "'eos' or a token such as ' the'.")
    return int(tid)


def make_baseline(model: Model, batch: Batch, embed: torch.Tensor, token: torch.Tensor, baseline,
                  baseline_scale: float = 0.3, keep_first: bool = False) -> tuple[torch.Tensor, str]:
    """Baseline at the ``embed`` site (T, D) and its description. ``embed``/``token`` are (T, D).

    Special-token positions (and with ``keep_first`` the first position) keep ``embed``."""
    pos_part = embed - token
    keep = _special_mask(model, batch, keep_first)[:, None]
    if isinstance(baseline, torch.Tensor):
        b = baseline.detach().float().cpu().reshape(-1, embed.shape[-1])
        if b.shape != embed.shape:
            raise InputError(f"A baseline tensor must have the prompt's embedding shape {tuple(embed.shape)} "
                             f"(tokens × d_model), got {tuple(baseline.shape)}.")
        return b, "tensor"
    if baseline == "scaled":
        if not baseline_scale >= 0:
            raise InputError(f"baseline_scale={baseline_scale} must be ≥ 0 (0.3 is the default).")
        new_token, desc = baseline_scale * token, f"{baseline_scale} × input"
    elif baseline == "zero":
        new_token, desc = torch.zeros_like(token), "zero embedding"
    else:
        tid = _named_token_id(model, baseline) if baseline in NAMED_BASELINES else model.token_id(baseline)
        _, tok_emb = embed_parts(model, model.encode(torch.full_like(batch.input_ids, tid)))
        new_token, desc = tok_emb[0].float().cpu(), f"token {model.decode([tid])!r} (id {tid})"
    if keep_first:
        desc += ", first position kept"
    return torch.where(keep, embed, pos_part + new_token), desc


def _inputs(model: Model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    embed, token = embed_parts(model, batch)
    return embed[0].float().cpu(), token[0].float().cpu()


# ---------------------------------------------------------------------------------------- methods
def saliency(model: Model, prompt, target, foil=None, *, metric: str = "logit", position: int | None = None):
    """‖∂f/∂e_t‖₂ per token; the raw gradient (T, D) is in ``extras["gradient"]``."""
    batch, tgt = _prepare(model, prompt, target, foil, metric, position)
    embed, _ = _inputs(model, batch)
    f, g = target_gradients(model, batch, embed[None], tgt)
    return token_result(model, batch.str_tokens[0], g[0].norm(dim=-1), "saliency", tgt, {"metric": tgt.metric},
                        {"gradient": g[0]}, {"f": float(f[0]), "aggregation": "L2 norm over d_model"})


def input_x_gradient(model: Model, prompt, target, foil=None, *, metric: str = "logit",
                     position: int | None = None):
    """Signed ``Σ_k e_{t,k} ∂f/∂e_{t,k}`` per token; ``extras``: ``norm`` (T,), ``granular`` (T, D).

    ``e`` is the token embedding as the first block sees it (token part only for GPT-2)."""
    batch, tgt = _prepare(model, prompt, target, foil, metric, position)
    embed, token = _inputs(model, batch)
    f, g = target_gradients(model, batch, embed[None], tgt)
    a = token * g[0]
    return token_result(model, batch.str_tokens[0], a.sum(dim=-1), "input_x_gradient", tgt,
                        {"metric": tgt.metric}, {"norm": a.norm(dim=-1), "granular": a},
                        {"f": float(f[0]), "aggregation": "sum over d_model"})


def quadrature(steps: int, method: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes α (m,) in [0, 1] and weights (m,) of an m-point rule for ∫₀¹."""
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps={steps!r}: integrated gradients needs at least 1 step (64 is the default).")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.tensor((x + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)
    k = torch.arange(steps, dtype=torch.float64)
    if method == "riemann_left":
        return k / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if method == "riemann_right":
        return (k + 1) / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if method == "riemann_middle":
        return (k + 0.5) / steps, torch.full((steps,), 1 / steps, dtype=torch.float64)
    if method == "riemann_trapezoid":
        if steps < 2:
            raise InputError("The trapezoid rule needs steps ≥ 2.")
        w = torch.full((steps,), 1 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return k / (steps - 1), w
    raise InputError(f"method={method!r} is unknown; use one of {QUADRATURES}.")


def integrate_path(grad_fn, x: torch.Tensor, x0: torch.Tensor, steps: int, method: str = "gausslegendre"):
    """IG along the straight path from ``x0`` to ``x`` (both (T, D)) for any function given by
    ``grad_fn(points (N, T, D)) -> (f (N,), ∇f (N, T, D))``.

    Returns ``(ig (T, D), f(x), f(x0), delta, relative delta)``; the two end points are evaluated in
    the same batch as the quadrature nodes."""
    alphas, weights = quadrature(steps, method)
    diff = x - x0
    path = x0[None] + alphas[:, None, None].float() * diff[None]
    f, g = grad_fn(torch.cat([torch.stack([x, x0]), path]))
    avg = (weights[:, None, None] * g[2:].double()).sum(dim=0)
    ig = (diff.double() * avg).float()
    gap = float(f[0] - f[1])
    delta = float(ig.double().sum()) - gap
    return ig, float(f[0]), float(f[1]), delta, abs(delta) / max(abs(gap), 1e-12)


def integrate_adaptive(grad_fn, x: torch.Tensor, x0: torch.Tensor, steps: int, method: str, tolerance: float,
                       max_steps: int):
    """IG from ``x0`` to ``x`` by adaptive subdivision of the path, refined until the relative
    completeness error is at most ``tolerance`` or ``max_steps`` quadrature nodes are spent.

    Completeness holds on every piece of the path: ``Σ IG over [a, b] = f(x(b)) − f(x(a))``, so each
    segment's own delta measures its quadrature error. Each round bisects the segments whose delta
    exceeds their share of the budget (``tolerance · |f(x) − f(x0)| · (b − a)``) and evaluates the new
    segments' ``steps`` nodes each, and their end points, in one batched call of ``grad_fn``.
    Returns ``(ig (T, D), f(x), f(x0), delta, relative delta, rounds)``."""
    nodes, weights = quadrature(steps, method)
    diff = x - x0
    f_at: dict[float, float] = {}
    done: dict[tuple[float, float], torch.Tensor] = {}  # segment -> its IG (T, D) in float64
    todo, rounds = [(0.0, 1.0)], []
    while True:
        ends = sorted({a for seg in todo for a in seg} - set(f_at))
        alphas = [a + (b - a) * float(t) for a, b in todo for t in nodes] + ends
        f, g = grad_fn(x0[None] + torch.tensor(alphas, dtype=torch.float64)[:, None, None].float() * diff[None])
        f_at.update({a: float(v) for a, v in zip(ends, f[len(alphas) - len(ends):].tolist())})
        for i, (a, b) in enumerate(todo):
            block = g[i * steps:(i + 1) * steps].double()
            done[(a, b)] = diff.double() * ((b - a) * weights[:, None, None] * block).sum(dim=0)
        gap = f_at[1.0] - f_at[0.0]
        seg_delta = {s: float(ig.sum()) - (f_at[s[1]] - f_at[s[0]]) for s, ig in done.items()}
        delta = sum(seg_delta.values())
        rel = abs(delta) / max(abs(gap), 1e-12)
        spent = steps * len(done)
        rounds.append({"steps": spent, "segments": len(done), "relative_delta": rel})
        budget = tolerance * max(abs(gap), 1e-12)
        todo = [s for s, d in seg_delta.items() if abs(d) > budget * (s[1] - s[0])]
        if rel <= tolerance or not todo or spent + steps * len(todo) > max_steps:
            break
        todo = sorted(todo, key=lambda s: -abs(seg_delta[s]))  # worst first, as many as the budget allows
        todo = todo[: max(1, (max_steps - spent) // steps)]
        for a, b in todo:
            del done[(a, b)]
        todo = [half for a, b in todo for half in ((a, (a + b) / 2), ((a + b) / 2, b))]
    ig = sum(done.values()).float()
    return ig, f_at[1.0], f_at[0.0], delta, rel, rounds


def integrated_gradients(model: Model, prompt, target, foil=None, *, metric: str = "logit",
                         position: int | None = None, steps: int | None = None, method: str = "gausslegendre",
                         baseline=DEFAULT_BASELINE, baseline_scale: float = 0.3, keep_first: bool = True,
                         internal_batch_size: int = 16, tolerance: float | None = None, max_steps: int = 512,
                         warn_above: float = 0.05, refine: str = "bisect"):
    """Integrated gradients per token (signed sum over d_model; ``extras["granular"]`` (T, D)).

    ``meta`` holds ``delta`` (Σ IG − (f(e) − f(e'))), ``relative_delta``, ``f_input``,
    ``f_baseline``, the ``steps`` used and every ``refinement`` round. With ``steps=None`` (default)
    the path is bisected adaptively (32 nodes per segment) until the relative delta is at most
    ``tolerance`` (default 1%) or ``max_steps`` nodes are spent; a given ``steps`` is refined only
    when ``tolerance`` is set. ``refine="double"`` refines by doubling the steps of one segment instead
    (every round recomputes the whole path; what Captum-style loops do)."""
    if method not in QUADRATURES:
        raise InputError(f"method={method!r} is unknown; use one of {QUADRATURES}.")
    if refine not in ("bisect", "double"):
        raise InputError(f"refine={refine!r}: use 'bisect' (adaptive segments) or 'double' (whole-path doubling).")
    if steps is None:
        steps, tolerance = FIRST_STEPS, DEFAULT_TOLERANCE if tolerance is None else tolerance
    quadrature(steps, method)  # validates steps
    if internal_batch_size < 1:
        raise InputError(f"internal_batch_size={internal_batch_size} must be ≥ 1.")
    batch, tgt = _prepare(model, prompt, target, foil, metric, position)
    embed, token = _inputs(model, batch)
    base, desc = make_baseline(model, batch, embed, token, baseline, baseline_scale, keep_first)

    def grad_fn(points):
        return target_gradients(model, batch, points, tgt, internal_batch_size=internal_batch_size)

    if tolerance is None:
        ig, f_in, f_base, delta, rel = integrate_path(grad_fn, embed, base, steps, method)
        history = [{"steps": steps, "segments": 1, "relative_delta": rel}]
    elif refine == "double":
        history = []
        while True:
            ig, f_in, f_base, delta, rel = integrate_path(grad_fn, embed, base, steps, method)
            history.append({"steps": steps, "segments": 1, "relative_delta": rel})
            if rel <= tolerance or steps * 2 > max_steps:
                break
            steps *= 2
    else:
        ig, f_in, f_base, delta, rel, history = integrate_adaptive(grad_fn, embed, base, steps, method, tolerance,
                                                                   max_steps)
    first_steps, steps = history[0]["steps"], history[-1]["steps"]
    limit = tolerance if tolerance is not None else warn_above
    if rel > limit:
        hint = ("raise max_steps (or steps, or pass tolerance= to refine)" if baseline == "scaled" else
                "raise max_steps; baseline='scaled' (0.3 × input) converges in fewer steps but keeps each "
                "token's identity")
        warnings.warn(ConvergenceWarning(
            f"Integrated gradients did not converge: relative completeness error {rel:.3g} (delta {delta:.4g}, "
            f"f(input) − f(baseline) = {f_in - f_base:.4g}) with baseline {desc} at {steps} steps; {hint}."),
            stacklevel=2)
    meta = {"delta": delta, "relative_delta": rel, "f_input": f_in, "f_baseline": f_base, "steps": steps,
            "baseline": desc, "tolerance": tolerance, "refinement": history, "aggregation": "sum over d_model"}
    params = {"metric": tgt.metric, "steps": first_steps, "method": method,
              "baseline": baseline if isinstance(baseline, (str, int)) else "tensor",
              "baseline_scale": baseline_scale, "keep_first": keep_first, "tolerance": tolerance,
              "refine": refine}
    if not math.isfinite(delta):
        raise InputError("Integrated gradients produced non-finite values; check the baseline tensor.")
    return token_result(model, batch.str_tokens[0], ig.sum(dim=-1), "integrated_gradients", tgt, params,
                        {"granular": ig, "norm": ig.norm(dim=-1)}, meta)
