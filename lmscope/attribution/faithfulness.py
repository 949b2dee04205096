"""How faithful is each attribution method? Erasure curves, a random baseline and sanity checks.

For a prompt with target (and foil) ``f`` = logit(target) [− logit(foil)] at the last position and an
attribution ``s`` over its tokens, order the erasable tokens by ``s`` (highest first) and erase them
by replacing their embeddings with a stated replacement (default: the EOS token's embedding, the
same neutral token as integrated gradients' default baseline; positions are kept, nothing shifts):

* comprehensiveness curve (DeYoung et al. 2020, ERASER): ``f(x) − f(x without its top-k tokens)``,
  k = 0..n; a faithful ranking makes it rise fast;
* sufficiency curve: ``f(x) − f(x with only its top-k tokens)``, k = 0..n; a faithful ranking makes
  it fall fast;
* AOPC (Samek et al. 2017): the mean of a curve over k = 0..n (area over the perturbation curve).
  The ranking score is comprehensiveness − sufficiency (the area between the "erase the most
  relevant first" and "keep the most relevant" curves). In expectation a random ordering has equal
  comprehensiveness and sufficiency, so its score is ≈ 0; a random attribution is evaluated with
  every method as the baseline.

Erasable tokens: every position except the first and special tokens (BOS). The first position is
the attention sink of models without BOS; replacing it breaks the forward pass for every method
alike, which would measure the replacement, not the attribution.

Sanity checks (Adebayo et al. 2018): the same attributions on a copy of the model with its top
blocks re-initialised (model-parameter randomisation, :func:`lmscope.models.randomized_copy`), and
for a random target and foil token (target randomisation). Each reports the Spearman rank
correlation with the original attribution over the erasable tokens; a method that passes gives a
correlation well below 1. Target-free methods (attention, rollout, attention-norm, ALTI, value
zeroing) are blind to the target, so their target-randomisation correlation is 1 by construction.

Every erasure of a prompt (all methods, every k, both curves) runs as one batched
:meth:`Model.run_sets`, each distinct erased set once (methods often agree on their top tokens, and
"erase all" ends every curve). Shapes: curves (M methods, n + 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd
import torch

from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.models import Model, randomized_copy
from lmscope.attribution.gradient import ConvergenceWarning, _inputs, _special_mask, make_baseline
from lmscope.attribution.methods import METHODS, MIXING_METHODS, attribute
from lmscope.attribution.targets import resolve_target

RANDOM = "random"


def erasable_positions(model: Model, batch) -> list[int]:
    """Positions an erasure may replace: all but the first and special tokens."""
    special = _special_mask(model, batch)
    return [i for i in range(1, batch.input_ids.shape[1]) if not special[i]]


def order_by_score(scores: torch.Tensor, positions: Sequence[int]) -> list[int]:
    """``positions`` sorted by ``scores`` (T,), highest first (ties: earlier position first)."""
    return sorted(positions, key=lambda p: (-float(scores[p]), p))


def aopc(curve: torch.Tensor) -> torch.Tensor:
    """Area over the perturbation curve: the mean over k = 0..n of a curve of drops (..., n + 1)."""
    return curve.mean(dim=-1)


def erasure_curves(model: Model, prompt: str, target, foil, scores: torch.Tensor, *, replacement="neutral",
                   chunk_size: int | None = None) -> dict:
    """Comprehensiveness and sufficiency curves (M, n + 1) of M attributions ``scores`` (M, T) of one prompt.

    ``comprehensiveness[m, k] = f(x) − f(x with the top-k tokens of m replaced)`` and
    ``sufficiency[m, k] = f(x) − f(x with all but the top-k tokens replaced)``; ``f`` (the clean value),
    ``positions`` (erasable) and the replacement's description come along."""
    batch = model.encode(prompt)
    n_tok = batch.input_ids.shape[1]
    if scores.ndim != 2 or scores.shape[1] != n_tok:
        raise InputError(f"scores must have shape (methods, {n_tok} tokens), got {tuple(scores.shape)}.")
    tgt = resolve_target(model, target, foil, "logit", n_tok - 1)
    positions = erasable_positions(model, batch)
    n = len(positions)
    if n == 0:
        raise InputError(f"{prompt!r} has no token to erase (only its first and special tokens).")
    embed, token = _inputs(model, batch)
    base, desc = make_baseline(model, batch, embed, token, replacement)
    value = base[None]
    erased: list[frozenset] = []  # per method: top-1..n erased, then all but the top 0..n-1
    for row in scores:
        order = order_by_score(row, positions)
        erased += [frozenset(order[:k]) for k in range(1, n + 1)] + [frozenset(order[k:]) for k in range(n)]
    unique = list(dict.fromkeys([frozenset(), *erased]))  # each distinct erased set runs once
    sets = [[Patch("embed", value=value, positions=sorted(s))] if s else [] for s in unique]
    out = model.run_sets(batch, sets, logits="last", chunk_size=chunk_size)
    f_unique = tgt.score(out.logits[:, 0]).double().cpu()
    index = {s: i for i, s in enumerate(unique)}
    clean = f_unique[0]
    rest = f_unique[torch.tensor([index[s] for s in erased])].reshape(scores.shape[0], 2 * n)
    zero = torch.zeros(scores.shape[0], 1, dtype=torch.float64)
    comp = torch.cat([zero, clean - rest[:, :n]], dim=1)
    suff = torch.cat([clean - rest[:, n:], zero], dim=1)
    return {"comprehensiveness": comp, "sufficiency": suff, "f": float(clean), "positions": positions,
            "replacement": desc, "forwards": len(unique)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (pandas' ranking, ties averaged); NaN when either side is constant."""
    return float(pd.Series(a.double().numpy()).corr(pd.Series(b.double().numpy()), method="spearman"))


def method_scores(model: Model, prompt: str, target, foil, methods: Sequence[str]) -> tuple[torch.Tensor, float]:
    """(M, T) attributions of ``methods`` with their defaults, and IG's worst relative completeness error."""
    rows, worst = [], 0.0
    for method in methods:
        if method in MIXING_METHODS:
            rows.append(attribute(model, prompt, method=method).values.float())
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in the evaluation's meta instead
            r = attribute(model, prompt, target, foil, method=method)
        worst = max(worst, float(r.meta.get("relative_delta", 0.0)))
        rows.append(r.values.float())
    return torch.stack(rows), worst


def evaluate_prompts(model: Model, prompts: Sequence[tuple[str, str | int, str | int | None]],
                     methods: Sequence[str] = METHODS, *, replacement="neutral", seed: int = 0, sanity: int = 20,
                     randomized: Model | None = None, chunk_size: int | None = None, progress=None,
                     limits: dict[str, int] | None = None) -> dict:
    """Per-prompt AOPCs and sanity-check correlations for ``methods`` plus a random attribution.

    ``prompts``: (text, target, foil) triples. Returns ``comprehensiveness`` and ``sufficiency`` (N, M + 1)
    (the last column is the random attribution), ``model_randomisation`` and ``target_randomisation``
    (S, M) Spearman correlations on the first ``sanity`` prompts (with ``randomized``, a re-initialised
    copy of the model; skipped without one), ``f`` (N,) the clean target − foil value of each prompt, and
    the worst IG completeness error. ``limits`` (method -> k) runs a method on the first k prompts only
    (an expensive one on a stated subset); its entries for the other prompts are NaN."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"methods {unknown} are unknown; use any of {', '.join(METHODS)}.")
    limits = limits or {}
    gen = torch.Generator().manual_seed(seed)
    n_m = len(methods)
    comp, suff, rho_model, rho_target, f, worst = [], [], [], [], [], 0.0
    for i, (text, target, foil) in enumerate(prompts):
        active = [m for m, name in enumerate(methods) if i < limits.get(name, i + 1)]
        scores, w = method_scores(model, text, target, foil, [methods[m] for m in active])
        worst = max(worst, w)
        rand = torch.rand(scores.shape[1], generator=gen)
        curves = erasure_curves(model, text, target, foil, torch.cat([scores, rand[None]]),
                                replacement=replacement, chunk_size=chunk_size)
        cols = torch.tensor([*active, n_m])
        for out, key in ((comp, "comprehensiveness"), (suff, "sufficiency")):
            row = torch.full((n_m + 1,), float("nan"), dtype=torch.float64)
            row[cols] = aopc(curves[key])
            out.append(row)
        f.append(curves["f"])
        if i < sanity:
            pos = curves["positions"]
            names = [methods[m] for m in active]
            checks = [(rho_target, model, *torch.randperm(model.spec.d_vocab, generator=gen)[:2].tolist())]
            if randomized is not None:
                checks.insert(0, (rho_model, randomized, target, foil))
            for out, which, tgt, other_foil in checks:
                other_foil = other_foil if foil is not None else None
                other, _ = method_scores(which, text, tgt, other_foil, names)
                row = [float("nan")] * n_m
                for j, m in enumerate(active):
                    row[m] = spearman(scores[j, pos], other[j, pos])
                out.append(row)
        if progress is not None:
            progress.update(1)
    empty = torch.full((0, n_m), float("nan"), dtype=torch.float64)
    return {"comprehensiveness": torch.stack(comp), "sufficiency": torch.stack(suff),
            "model_randomisation": torch.tensor(rho_model, dtype=torch.float64) if rho_model else empty,
            "target_randomisation": torch.tensor(rho_target, dtype=torch.float64) if rho_target else empty,
            "f": torch.tensor(f, dtype=torch.float64), "ig_worst_relative_delta": worst,
            "replacement": curves["replacement"]}


def randomized_top(model: Model, top: int | None = None, seed: int = 0) -> Model:
    """A copy of ``model`` with its top ``top`` blocks re-initialised (default: the upper half)."""
    n = model.spec.n_layers
    top = max(1, n // 2) if top is None else top
    if not 1 <= top <= n:
        raise InputError(f"randomize_top={top}: give between 1 and {n} blocks.")
    return randomized_copy(model, range(n - top, n), seed)
