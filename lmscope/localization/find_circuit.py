"""Finding a circuit, end to end: edge scores (EAP, EAP-IG, clean-corrupted EAP, or AtP's node scores
ranking each edge by its weaker end, :mod:`lmscope.localization.node_circuits`) or ACDC, a circuit of
the asked size, and its faithfulness checked by patching every other edge to its corrupted value.

Faithfulness follows the patching conventions of :mod:`lmscope.targets`: F = (M(circuit) − M_corrupt) /
(M_clean − M_corrupt), 1 = the circuit alone carries the clean behaviour. The Result is the circuit
(:meth:`Circuit.to_result`: one value per edge, nodes and edges in ``meta``) with ``faithfulness``,
``clean_metric``, ``corrupt_metric``, ``circuit_metric`` (and with ``curve`` the faithfulness curve) in
``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscope import specs
from lmscope.errors import InputError
from lmscope.localization.acdc import acdc
from lmscope.localization.circuit_scores import circuit_scores
from lmscope.localization.circuits import SELECTIONS, evaluate_masks, exact_top, extract, faithfulness_curve
from lmscope.localization.eap import eap
from lmscope.localization.node_circuits import atp_edge_scores
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model
from lmscope.results import Result

CIRCUIT_METHODS = ("eap", "eap-ig", "clean-corrupted", "acdc", "atp")


@dataclass(frozen=True)
class CircuitConfig:
    """Options of :func:`find_circuit`."""

    method: str = specs.option("eap", "eap | eap-ig | clean-corrupted | acdc | atp (AtP node scores: the edges among "
                                      "the top heads and MLPs)", choices=CIRCUIT_METHODS)
    edges: int | None = specs.option(None, "Circuit size in edges (default: --fraction of all edges).")
    fraction: float = specs.option(0.05, "Circuit size as a fraction of the graph's edges.")
    select: str = specs.option("pruned", "top (largest |score|) | pruned (top, dangling edges removed) | greedy "
                                         "(grown from the logits, pruned).", choices=SELECTIONS)
    rank: str = specs.option("abs", "abs (rank edges by |score|: edges that matter either way, aims at F = 1) | "
                                    "support (edges pushing the metric towards clean; recovers more, F may exceed 1).")
    ig_steps: int = specs.option(5, "EAP-IG interpolation steps.")
    exact: int = specs.option(0, "Re-score the K edges of largest |score| exactly (one patched forward each) before "
                                 "choosing: fixes first-order sign errors that --rank support would trust.")
    threshold: float = specs.option(0.1, "ACDC's τ (KL increase allowed per removed edge).")
    curve: bool = specs.option(False, "Also compute the faithfulness curve (meta['curve']).", flags=("--curve",))
    mib: bool = specs.option(False, "Also compute the MIB circuit scores (CMD, CPR) with a random baseline "
                                    "(meta['mib']).", flags=("--mib",))

    def __post_init__(self):
        if self.method not in CIRCUIT_METHODS:
            raise InputError(f"--method {self.method!r}: choose eap, eap-ig, clean-corrupted, acdc or atp.")
        if not 0 < self.fraction <= 1:
            raise InputError(f"--fraction {self.fraction}: give a fraction in (0, 1].")
        if self.select not in SELECTIONS:
            raise InputError(f"--select {self.select!r}: choose top, pruned or greedy.")
        if self.rank not in ("abs", "support"):
            raise InputError(f"--rank {self.rank!r}: choose abs or support.")
        if self.mib and self.method == "acdc":
            raise InputError("--mib ranks edges by their scores; ACDC gives a circuit, not scores. Use --method eap, "
                             "eap-ig, clean-corrupted or atp.")
        if self.exact < 0 or (self.exact and self.method in ("acdc", "atp")):
            raise InputError(f"--exact {self.exact}: give a number of edges ≥ 0, with --method eap, eap-ig or "
                             "clean-corrupted (ACDC patches exactly already; AtP scores nodes).")
        if self.edges is not None and self.edges < 1:
            raise InputError(f"--edges {self.edges}: give a positive number of edges.")


def find_circuit(model: Model, pairs: PromptPairs, config: CircuitConfig = CircuitConfig()) -> Result:
    """Find a circuit (EAP, EAP-IG, clean-corrupted EAP, AtP-derived or ACDC) and check its faithfulness by
    patching everything else."""
    absolute = config.rank == "abs"
    if config.method == "acdc":
        circ, scores = acdc(model, pairs, threshold=config.threshold), None
    else:
        if config.method == "atp":
            scores = atp_edge_scores(model, pairs)
        else:
            scores = eap(model, pairs, method=config.method, ig_steps=config.ig_steps)
            if config.exact:
                scores = exact_top(model, pairs, scores, config.exact)
        size = config.edges if config.edges is not None else max(1, round(config.fraction * scores.graph.n_edges))
        circ = extract(scores, size, config.select, absolute=absolute)
    ev = evaluate_masks(model, pairs, [circ.mask])
    gap = ev["clean"] - ev["corrupt"]
    faith = (float(ev["circuit"][0]) - ev["corrupt"]) / gap if abs(gap) > 1e-6 else float("nan")
    circ.meta.update(faithfulness=faith, clean_metric=ev["clean"], corrupt_metric=ev["corrupt"],
                     circuit_metric=float(ev["circuit"][0]), task=pairs.meta.get("task"))
    if config.rank == "support" and config.method in ("eap", "clean-corrupted", "atp") and not config.exact:
        circ.meta["note"] = (f"--rank support trusts the sign of each score; {config.method} can get it wrong for "
                             "strongly nonlinear edges (input → m0 on SmolLM2). --method eap-ig or --exact 100 is safer.")
    if config.curve and scores is not None:
        fc = faithfulness_curve(model, pairs, scores, how=config.select, absolute=absolute)
        circ.meta["curve"] = {"n_edges": [int(x) for x in fc.axes[0].labels], "kept": fc.extras["kept"].tolist(),
                              "fraction": fc.extras["fraction"].tolist(), "faithfulness": fc.values.tolist()}
    if config.mib and scores is not None:
        mib = circuit_scores(model, pairs, scores, how=config.select)
        circ.meta["mib"] = {"cmd": float(mib.values[0, 0]), "cpr": float(mib.values[0, 1]),
                            "random_cmd": float(mib.values[1, 0]), "random_cpr": float(mib.values[1, 1]),
                            "fraction": mib.extras["fraction"].tolist(),
                            "faithfulness_abs": mib.extras["faithfulness_abs"].tolist(),
                            "faithfulness_support": mib.extras["faithfulness_support"].tolist()}
    return circ.to_result()


specs.register(specs.MethodSpec("circuit", "localization", "pairs", CircuitConfig, find_circuit,
                                sites=("attn.z", "resid_pre"), cli_inputs=("task", "n", "seed"),
                                input_defaults={"task": "ioi"}))
