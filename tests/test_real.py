"""Behaviour on the real default model (SmolLM2-135M-Instruct, prepared once into the cache)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmscope.cli.main import app
from lmscope.decoding import lens_top, logit_lens
from lmscope.localization import dla
from lmscope.models import decompose

pytestmark = pytest.mark.real
IOI = "When Mary and John went to the store, John gave a drink to"


def test_capital_of_france(smollm):
    logits = smollm.run("The capital of France is", logits="last").logits[0]
    assert logits.argmax().item() == smollm.token_id(" Paris")


def test_ioi_prefers_mary(smollm):
    logits = smollm.run(IOI, logits="last").logits[0]
    assert logits.argmax().item() == smollm.token_id(" Mary")
    assert logits[smollm.token_id(" Mary")] > logits[smollm.token_id(" John")]


@pytest.mark.parametrize("by", ["layer", "head", "neuron"])
def test_dla_sums_to_models_logit_difference(smollm, by):
    res = dla(smollm, IOI, " Mary", " John", by=by)
    logits = smollm.run(IOI, logits="last").logits[0]
    own = (logits[smollm.token_id(" Mary")] - logits[smollm.token_id(" John")]).item()
    total = res.values.sum().item() + sum(t.sum().item() for t in res.extras.values()) + res.meta["constant"]
    assert own > 1.0
    assert total == pytest.approx(own, rel=1e-4, abs=1e-3)


def test_decomposition_adds_up_on_real_model(smollm):
    dec = decompose(smollm, [IOI, "The capital of France is"])
    rel = (dec.vectors.sum(1) - dec.resid).norm(dim=-1) / dec.resid.norm(dim=-1)
    assert rel.max().item() < 1e-4


def test_logit_lens_final_layer_is_paris(smollm):
    res = lens_top(logit_lens(smollm, "The capital of France is", " Paris"))
    assert res.meta["top_tokens"][-1][0] == " Paris"
    assert int(res.extras["target_rank"][-1]) == 1
    assert int(res.extras["target_rank"][0]) > 1  # the embedding alone does not predict it


def test_padded_batch_matches_single_prompts_on_real_model(smollm):
    prompts = [IOI, "The capital of France is"]
    for side in ("left", "right"):
        run = smollm.run(prompts, padding_side=side, logits="last")
        for i, p in enumerate(prompts):
            torch.testing.assert_close(run.logits[i], smollm.run(p, logits="last").logits[0], atol=2e-4, rtol=1e-4)


def test_cli_dla_json(tmp_path, smollm):
    path = tmp_path / "dla.json"
    result = CliRunner().invoke(app, ["dla", "--prompt", IOI, "--target", " Mary", "--foil", " John",
                                      "--by", "head", "--json", str(path)])
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert {"method", "model", "axes", "values"} <= set(doc)
    assert [a["name"] for a in doc["axes"]] == ["layer", "head"]
    assert len(doc["values"]) == 30 and len(doc["values"][0]) == 9


def test_cli_lens_and_bad_target(tmp_path, smollm):
    path = tmp_path / "lens.json"
    ok = CliRunner().invoke(app, ["lens", "--prompt", "The capital of France is", "--target", " Paris",
                                  "--json", str(path), "--html", str(tmp_path / "lens.html")])
    assert ok.exit_code == 0, ok.output
    assert json.loads(path.read_text())["method"] == "logit_lens"
    bad = CliRunner().invoke(app, ["dla", "--prompt", IOI, "--target", " Maryland and"])
    assert bad.exit_code == 2
    assert "not a single token" in bad.output


def test_cli_demo_writes_report(tmp_path, smollm):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report.html").read_text()
    assert "Logit lens" in html and "Direct logit attribution" in html
    assert "Mary" in result.output


@pytest.mark.slow
def test_gemma3_loads_checks_and_dla_adds_up():
    """Gemma 3 (post-norms, sliding windows, GQA with one KV head): the load-time checks pass (every site
    fires, explicit attention matches the kernel, the frozen-post-norm decomposition adds up), and DLA by
    head sums to the model's own logit difference."""
    import lmscope

    from conftest import logit_references

    model = lmscope.load("gemma3-270m", progress=False)
    assert model.spec.post_norms and model.spec.n_kv_heads == 1
    # Gemma 3 has no final soft-cap (Gemma 2 had one): DLA decomposes the model's output logit difference itself
    assert model.hf.config.final_logit_softcapping is None and model.logit_softcap is None
    res = dla(model, IOI, " Mary", " John", by="head")
    metric, decomposed, own = logit_references(model, IOI, " Mary", " John")
    assert res.meta["metric"] == metric == "logit difference" and res.meta["softcap"] is None
    assert res.meta["model_value"] == pytest.approx(own, abs=1e-4) and own > 1.0
    total = res.values.sum().item() + sum(t.sum().item() for t in res.extras.values()) + res.meta["constant"]
    assert total == pytest.approx(own, rel=1e-4, abs=1e-3)
