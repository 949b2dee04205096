"""Circuit scores that compare across methods: the MIB circuit metrics (Mueller et al. 2025, "MIB: A
Mechanistic Interpretability Benchmark").

A single faithfulness value depends on the circuit size one picks. MIB integrates over sizes instead:
circuits of a fraction k of the graph's edges, k on a fixed grid from 0 to 1, each checked by patching
every other edge to its corrupted value (F(k), :func:`lmscope.localization.circuits.faithfulness_curve`),
and the area under a curve over k (trapezoids over the grid):

    CMD (circuit–model distance)   = ∫ |1 − F(k)| dk,  edges ranked by |score|   (lower is better)
    CPR (circuit performance ratio) = ∫ F(k) dk,        edges ranked by support   (higher is better)

The same areas for circuits built from random scores (a seeded random ranking of the same graph)
are the baseline a method has to beat. Prompts vary by seed: report the mean and spread over several
prompt sets (e.g. ``tasks.ioi(model, n, seed=s)`` for s = 0, 1, 2).

Returns a :class:`Result` with values (scores, metric): rows each method's scores and the random
baseline, columns ``cmd`` and ``cpr``; extras the two F(k) curves of each row and the fractions.
Node methods (AtP) enter through :func:`lmscope.localization.node_circuits.atp_edge_scores`: their
circuits are the edges among the top-ranked nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmscope.errors import InputError
from lmscope.localization.circuits import SELECTIONS, EdgeScores, evaluate_masks, select
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model
from lmscope.results import Axis, Result

MIB_FRACTIONS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def area(x: Sequence[float] | torch.Tensor, y: torch.Tensor) -> float:
    """Trapezoid area under y (..., S) over increasing x (S,) (the last axis)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    return float(((y[..., 1:] + y[..., :-1]) / 2 * (x[1:] - x[:-1])).sum(-1))


def random_scores(scores: EdgeScores, seed: int = 0) -> EdgeScores:
    """Scores of the same graph drawn at random (standard normal, seeded): the random-circuit baseline."""
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(scores.graph.valid.shape, generator=g) * scores.graph.valid
    return EdgeScores(scores.graph, rnd, "random", scores.model, {"seed": seed}, dict(scores.meta))


def circuit_scores(model: Model, pairs: PromptPairs, scores: EdgeScores | Sequence[EdgeScores], *, how: str = "top",
                   fractions: Sequence[float] = MIB_FRACTIONS, random_seed: int = 0, metric: str = "logit_diff",
                   batch_size: int = 16) -> Result:
    """CMD and CPR (module docstring) of ``scores`` (one set, or several of the same graph: EAP, EAP-IG,
    AtP-derived, ...) and of a random ranking, circuits picked by ``how``. All circuits are checked in
    one pass over the prompts (a circuit that several rankings share, like the empty and the full one,
    once); the rows are the score sets in order, then ``random``."""
    if how not in SELECTIONS:
        raise InputError(f"how={how!r}: use one of {SELECTIONS}.")
    fr = [float(f) for f in fractions]
    if len(fr) < 2 or fr != sorted(fr) or fr[0] < 0 or fr[-1] > 1:
        raise InputError(f"fractions={fractions}: give at least two increasing fractions in [0, 1].")
    sets = [scores] if isinstance(scores, EdgeScores) else list(scores)
    if not sets or any(s.graph.upstream != sets[0].graph.upstream or s.graph.receivers != sets[0].graph.receivers
                       for s in sets):
        raise InputError("Give at least one set of edge scores, all of the same model's graph.")
    n_all = sets[0].graph.n_edges
    sizes = [round(f * n_all) for f in fr]
    x = [s / n_all for s in sizes]
    rows = (*sets, random_scores(sets[0], random_seed))
    masks = [select(s, n, how, absolute) for s in rows for absolute in (True, False) for n in sizes]
    unique: dict[bytes, int] = {}
    which = [unique.setdefault(m.numpy().tobytes(), len(unique)) for m in masks]
    distinct = [None] * len(unique)
    for m, i in zip(masks, which):
        distinct[i] = m
    ev = evaluate_masks(model, pairs, distinct, metric=metric, batch_size=batch_size)
    gap = ev["clean"] - ev["corrupt"]
    if abs(gap) < 1e-6:
        raise InputError("Clean and corrupted prompts give the same metric; faithfulness is undefined.")
    circuit = ev["circuit"][torch.tensor(which)]
    faith = ((circuit - ev["corrupt"]) / gap).view(len(rows), 2, len(sizes))  # (row, abs/support, size)
    values = torch.tensor([[area(x, (1 - faith[r, 0]).abs()), area(x, faith[r, 1])] for r in range(len(rows))])
    names = tuple(s.method for s in sets) + ("random",)
    params = {"scores": names[:-1] if len(sets) > 1 else sets[0].method, "metric": metric, "n_prompts": len(pairs),
              "selection": how, "random_seed": random_seed}
    if len(sets) == 1:
        params.update(sets[0].params)
    return Result(values.float(), (Axis("scores", names), Axis("metric", ("cmd", "cpr"))),
                  "circuit_scores", model.name, params=params,
                  extras={"faithfulness_abs": faith[:, 0].float(), "faithfulness_support": faith[:, 1].float(),
                          "fraction": torch.tensor(x, dtype=torch.float32)},
                  meta={"clean_metric": ev["clean"], "corrupt_metric": ev["corrupt"], "graph_edges": n_all,
                        "sizes": sizes, "task": pairs.meta.get("task"), "circuits_checked": len(distinct)})
