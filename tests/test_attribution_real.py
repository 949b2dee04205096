"""Input attribution on the real default model (SmolLM2-135M-Instruct): completeness, IOI behaviour, CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmscope.attribution import ConvergenceWarning, integrated_gradients, saliency
from lmscope.cli.main import app

pytestmark = pytest.mark.real
IOI = "When Mary and John went to the store, John gave a drink to"
NAMES = {1, 3, 9}  # ' Mary', ' John' of the first clause, the second ' John'


def test_ig_completeness_with_default_baseline(smollm):
    r = integrated_gradients(smollm, IOI, " Mary", " John")
    assert r.meta["relative_delta"] < 0.01
    assert r.meta["f_input"] - r.meta["f_baseline"] > 1.0
    assert int(r.values.argmax()) in NAMES  # measured: ' Mary' (position 1)


HELD_OUT = "After Lisa and Tom finished dinner, Tom handed the bill to"


def test_ig_default_removes_tokens_and_completes_on_a_held_out_prompt(smollm):
    """Default settings: the neutral-token baseline (UNK, the first position kept) and adaptive steps
    reach ≤ 1% completeness on an IOI prompt that played no part in choosing them."""
    import torch

    r = integrated_gradients(smollm, HELD_OUT, " Lisa", " Tom")
    assert r.meta["relative_delta"] <= 0.01 and r.meta["tolerance"] == 0.01
    assert r.meta["refinement"][-1]["relative_delta"] == r.meta["relative_delta"]
    # the baseline is the model's own input with every token but the first replaced by UNK
    ids = smollm.encode(HELD_OUT).input_ids.clone()
    ids[0, 1:] = smollm.tokenizer.unk_token_id
    logits = smollm.run(ids, logits="last").logits[0]
    own = float(logits[smollm.token_id(" Lisa")] - logits[smollm.token_id(" Tom")])
    assert r.meta["f_baseline"] == pytest.approx(own, abs=1e-3)
    assert float(r.values[0]) == 0.0 and torch.isfinite(r.values).all()
    assert int(r.values.argmax()) == 1  # ' Lisa', the indirect object


def test_ig_zero_baseline_warns(smollm):
    with pytest.warns(ConvergenceWarning, match="baseline='scaled'"):
        r = integrated_gradients(smollm, IOI, " Mary", " John", baseline="zero", steps=16)
    assert r.meta["relative_delta"] > 0.05


def test_contrastive_saliency_ranks_a_name_first(smollm):
    r = saliency(smollm, IOI, " Mary", " John")
    assert r.meta["tokens"][1] == " Mary" and r.meta["tokens"][9] == " John"
    assert int(r.values.argmax()) in NAMES  # measured: the first-clause ' John'


def test_cli_attribute(smollm, tmp_path):
    out = tmp_path / "occ.json"
    html = tmp_path / "occ.html"
    res = CliRunner().invoke(app, ["attribute", "--prompt", IOI, "--target", " Mary", "--foil", " John",
                                   "--method", "occlusion", "--json", str(out), "--html", str(html)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["method"] == "occlusion" and doc["axes"][0]["name"] == "token"
    assert doc["axes"][0]["labels"][1] == " Mary" and len(doc["values"]) == len(doc["axes"][0]["labels"])
    assert "<html" in html.read_text().lower()
    bad = CliRunner().invoke(app, ["attribute", "--prompt", IOI, "--target", " Mary", "--foil", " Mary",
                                   "--method", "saliency"])
    assert bad.exit_code == 2 and "foil" in bad.output
    bad = CliRunner().invoke(app, ["attribute", "--prompt", IOI, "--target", " Mary", "--method",
                                   "integrated-gradients", "--steps", "0"])
    assert bad.exit_code == 2 and "at least 1 step" in bad.output
