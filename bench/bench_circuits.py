"""Measurement: faithfulness of EAP (and EAP-IG) circuits on IOI with the default model.

The top k% of edges are kept and every other edge is patched to its ABC-corrupted value in real
forward passes; the recovered share of the clean logit difference is recorded per circuit size.
Issue 4's target is ≥ 0.70 at ≤ 10% of edges. Slow (minutes): run with `python bench/run.py circuits`.
"""

from __future__ import annotations

import os

import lmscope
from lmscope.localization.circuits import faithfulness_curve
from lmscope.localization.eap import eap
from lmscope.localization.tasks import ioi

from common import record


def main() -> None:
    model = lmscope.load(progress=False)
    n_prompts = int(os.environ.get("BENCH_IOI_PROMPTS", "50"))
    pairs = ioi(model, n_prompts, seed=0)
    for method in os.environ.get("BENCH_EAP_METHODS", "eap").split(","):
        scores = eap(model, pairs, method=method, batch_size=10)
        total = scores.graph.n_edges
        sizes = [round(f * total) for f in (0.01, 0.05, 0.10)]
        curve = faithfulness_curve(model, pairs.subset(range(min(20, n_prompts))), scores, sizes, batch_size=10)
        record("eap_faithfulness", method=method, prompts=n_prompts, edges_total=total,
               edges=sizes, recovered=[round(float(v), 4) for v in curve.values],
               clean_metric=curve.meta.get("clean_metric"), target=">= 0.70 at <= 10% of edges")


if __name__ == "__main__":
    main()
