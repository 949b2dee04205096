"""`lmscope sae train | eval | features | compare` end to end on a tiny model saved to disk (~20 s)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from typer.testing import CliRunner

from lmscope.cli.main import app
from lmscope.data import ActivationStore, token_contexts
from lmscope.results import Result
from lmscope.sae import load_sae
from lmscope.sae.evaluation import METRICS, evaluate


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = make_tiny("llama")
    folder = tmp_path_factory.mktemp("sae_cli") / "model"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def _ok(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_sae_commands_end_to_end(tmp_path, tiny_dir):
    import lmscope

    topk, gated = tmp_path / "topk", tmp_path / "gated"
    common = ["--site", "resid_post", "--layer", "1", "--latents", "48", "--tokens", "1024", "--batch-size", "128",
              "--context", "16", "--model", str(tiny_dir)]
    res = _ok(["sae", "train", "--arch", "topk", "--k", "3", "--out", str(topk), *common])
    assert "trained topk SAE on blocks.1.resid_post" in res.output
    sae = load_sae(topk)
    assert sae.cfg.arch == "topk" and sae.cfg.k == 3 and sae.cfg.site == "blocks.1.resid_post"
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 48
    store = ActivationStore(topk / "activations")
    assert len(store) == 1024 and store.site == "blocks.1.resid_post"
    x = next(store.batches(256, shuffle=False))
    assert torch.equal((sae.encode(x) > 0).sum(-1), torch.full((256,), 3))
    log = json.loads((topk / "training_log.json").read_text())
    assert log[-1]["step"] == 1024 // 128

    # a second SAE from the same store, with a sparsity coefficient
    _ok(["sae", "train", "--arch", "gated", "--l1", "0.5", "--store", str(topk / "activations"),
         "--max-norm-ratio", "10", "--out", str(gated), *common])
    assert load_sae(gated).cfg.l1 == 0.5 and not (gated / "activations").exists()

    # eval: the JSON holds what lmscope.sae.evaluate computes on the same held-out contexts
    _ok(["sae", "eval", str(topk), "--contexts", "3", "--json", str(tmp_path / "e.json"), "--model", str(tiny_dir)])
    got = Result.load(tmp_path / "e.json")
    assert list(got.axes[0].labels) == list(METRICS) and (topk / "eval.json").exists()
    m = lmscope.load(str(tiny_dir), progress=False)
    held = token_contexts(m, "default", context=128, split="heldout", max_tokens=128 * 3)
    want = evaluate(sae, m, held)
    assert torch.allclose(got.values, want.values, rtol=1e-4, equal_nan=True)
    assert dict(zip(METRICS, got.values.tolist()))["l0"] == pytest.approx(3.0)

    # features: dashboards with the activating token marked
    _ok(["sae", "features", str(topk), "--top", "2", "--latents", "3", "--contexts", "2",
         "--html", str(tmp_path / "f.html"), "--json", str(tmp_path / "f.json"), "--model", str(tiny_dir)])
    assert "<mark>" in (tmp_path / "f.html").read_text()
    feats = json.loads((tmp_path / "f.json").read_text())
    assert feats["method"] and len(feats["meta"]["features"]) == 3

    # compare: reuses topk's eval.json, evaluates gated now; one row per folder
    res = _ok(["sae", "compare", str(topk), str(gated), "--contexts", "3", "--png", str(tmp_path / "p.png"),
               "--json", str(tmp_path / "c.json"), "--model", str(tiny_dir)])
    comp = Result.load(tmp_path / "c.json")
    assert list(comp.axes[0].labels) == ["topk", "gated"] and comp.params["archs"] == ["topk", "gated"]
    assert torch.allclose(comp.values[0], got.values, equal_nan=True)
    assert (gated / "eval.json").exists() and (tmp_path / "p.png").stat().st_size > 1000
    assert "SAE comparison" in res.output


def test_sae_train_bad_input(tmp_path, tiny_dir):
    res = CliRunner().invoke(app, ["sae", "train", "--arch", "topk", "--k", "60", "--latents", "48", "--layer", "1",
                                   "--tokens", "256", "--out", str(tmp_path / "x"), "--model", str(tiny_dir)])
    assert res.exit_code != 0 and "between 1 and the number of latents" in res.output
    assert not (tmp_path / "x").exists()                      # failed before harvesting anything
    res = CliRunner().invoke(app, ["sae", "train", "--arch", "nope", "--layer", "1", "--tokens", "256",
                                   "--out", str(tmp_path / "y"), "--model", str(tiny_dir)])
    assert res.exit_code != 0 and "Unknown SAE architecture" in res.output
    res = CliRunner().invoke(app, ["sae", "eval", str(tmp_path / "missing"), "--model", str(tiny_dir)])
    assert res.exit_code != 0 and "cfg.json is missing" in res.output
