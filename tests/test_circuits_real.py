"""The IOI circuit on the real default model: EAP-IG edge scores from 50 IOI prompts (ABC
corruption), a circuit of at most 10% of the 123,211 edges, checked by patching every other edge
to its corrupted value in real forward passes, on the same prompts and on 50 held-out ones."""

from __future__ import annotations

import pytest

from lmscope.localization.circuits import faithfulness_curve
from lmscope.localization.eap import eap
from lmscope.localization.tasks import ioi

pytestmark = pytest.mark.real


def test_ioi_circuit_recovers_the_logit_difference(smollm):
    pairs = ioi(smollm, 50, seed=0)
    scores = eap(smollm, pairs, method="eap-ig", ig_steps=5, batch_size=10)
    assert scores.meta["clean_metric"] > 4.0 and scores.meta["corrupt_metric"] < 0.0
    budget = round(0.10 * scores.graph.n_edges)
    # edges ranked by how much they support the clean logit difference, dangling edges pruned
    curve = faithfulness_curve(smollm, pairs, scores, [budget], how="pruned", absolute=False, batch_size=10)
    assert 0 < int(curve.extras["kept"][0]) <= budget
    assert curve.meta["clean_metric"] == pytest.approx(scores.meta["clean_metric"], abs=1e-3)
    assert float(curve.values[0]) >= 0.70
    # the same circuit on prompts it was not found on (other names, places, objects and templates' fillers)
    held = ioi(smollm, 50, seed=1)
    assert held.clean != pairs.clean
    curve_held = faithfulness_curve(smollm, held, scores, [budget], how="pruned", absolute=False, batch_size=10)
    assert float(curve_held.values[0]) >= 0.70
