"""Method specs: every registered method run from JSON (as the web app does) gives the Result of the
direct Python call; every method has a CLI command whose --help shows each config field's help; the
shared conventions (AtP normalised and denoising like patching; the logit lens over layer × position;
one metric vocabulary) against independent computations."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from lmscope import specs
from lmscope.errors import InputError
from lmscope.results import Result, ResultSet

P = "when Mary and John went to the store John gave a drink to"
PAIR = {"clean": P, "corrupt": "when Mary and John went to the store Mary gave a drink to", "target": "Mary",
        "foil": "John"}
PAIR2 = {"clean": "the cat sat on the mat and the dog ran to the", "corrupt":
         "the dog sat on the mat and the cat ran to the", "target": "dog", "foil": "cat"}
TEXTS = ["the cat sat", "a dog ran", "the sun is big", "a moon is small", "the cat ran", "a dog sat",
         "the star is red", "a tree is green"]
TP = "cat sat on the mat and dog ran and it"
LABELS = ["0", "1", "0", "1", "0", "1", "0", "1"]


@pytest.fixture
def corpus_file(tmp_path):
    from conftest import WORDS

    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist()) for _ in range(300)]
    path = tmp_path / "words.txt"
    path.write_text("\n\n".join(docs))
    return str(path)


def _pairs(*docs):
    from lmscope.localization.tasks import PromptPairs

    return PromptPairs([d["clean"] for d in docs], [d["corrupt"] for d in docs], [d["target"] for d in docs],
                       [d["foil"] for d in docs], [{} for _ in docs], {"task": "custom"})


def _steer_direct(m):
    from lmscope.decoding.steering import actadd_vector, generate

    vec = actadd_vector(m, "yes", "no", 1)
    gens = [generate(m, P, max_new_tokens=3), generate(m, P, vec, 1, scale=4.0, max_new_tokens=3)]
    return torch.stack([g.log_probs[0].gather(-1, g.tokens[0][:, None])[:, 0] for g in gens])


def _probe_direct(m):
    from lmscope.data.labelled import LabelledSet
    from lmscope.decoding.probes import ProbeConfig, probe_layers

    data = LabelledSet(tuple(TEXTS), tuple(LABELS))
    return probe_layers(m, data.texts, data.y, layers=[0, 1], config=ProbeConfig(folds=2), control=False,
                        classes=data.classes)


@pytest.fixture
def sae_dirs(tiny_llama, tmp_path):
    from lmscope.sae import make_sae, save_sae

    return [str(save_sae(make_sae(arch, d_in=tiny_llama.spec.d_model, d_sae=24, site="blocks.1.resid_post", seed=i,
                                  **extra), tmp_path / f"sae_{arch}"))
            for i, (arch, extra) in enumerate((("topk", {"k": 4}), ("relu", {})))]


def _sae_evals(m, dirs, corpus):
    """Each SAE evaluated on 2 held-out contexts of the corpus, straight from lmscope.sae."""
    from lmscope.data import token_contexts
    from lmscope.sae import evaluate, load_sae

    held = token_contexts(m, corpus, context=128, split="heldout", max_tokens=128 * 2)
    return [evaluate(load_sae(d), m, held) for d in dirs]


def _cases(tmp, corpus, saes=("",)):
    """name -> (inputs JSON, config JSON, direct Python call (model) -> Result / ResultSet / tensor)."""
    from lmscope.attribution import EvaluateConfig, attribute, evaluate_attributions
    from lmscope.behaviors import HeadsConfig, NeuronsConfig, head_atlas, neuron_report
    from lmscope.decoding import evaluate_lens, logit_lens, ov_circuit, patchscope, qk_circuit
    from lmscope.decoding.lens_training import TrainLensConfig, train_lens
    from lmscope.localization import activation_patching, atp, causal_trace, dla, flow
    from lmscope.localization.flow import FlowGraphConfig, run_flow_graph
    from lmscope.localization.flow_node import FlowNodeConfig, run_flow_node
    from lmscope.localization.flow_verify import FlowVerifyConfig, run_flow_verify
    from lmscope.decoding.head_inspect import HeadInspectConfig, run_head_inspect
    from lmscope.localization.patch_cell import PatchCellConfig, run_patch_cell
    from lmscope.sae.prompt import SAEPromptConfig, run_sae_prompt
    from lmscope.localization.find_circuit import CircuitConfig, find_circuit
    from lmscope.localization.path_patching import path_patching
    from lmscope.sae import SAEFeaturesConfig, SAEFolders, compare, run_sae_features
    from lmscope.sae.train_site import SAETrainConfig, train_site_sae

    from dataclasses import replace

    from lmscope.decoding.ab_data import load_ab
    from lmscope.decoding.caa import caa_sweep
    from lmscope.decoding.patchscope_eval import evaluate_task, task
    from lmscope.decoding.patchscopes import target_prompt
    from lmscope.editing import EditConfig, EditEvalConfig, edit_fact, evaluate_edits
    from lmscope.editing.recall import RecallConfig, recall
    from lmscope.editing.sequential import SequentialConfig, sequential_edits
    from lmscope.specs import Prompt

    edit_cfg = {"subject": "Mary and John", "layer": 1, "tokens": 600, "corpus": corpus, "steps": 2}
    seq_cfg = {"n": 2, "layer": 1, "tokens": 600, "corpus": corpus, "steps": 2, "prefixes": 2, "every": 1,
               "ppl_tokens": 64, "known_only": False}
    recall_cfg = {"window": 3, "question": "Mary went to the", "subject": "Mary", "memorised": " tree",
                  "in_context": " river"}
    eval_cfg = {"n": 2, "layer": 1, "tokens": 600, "corpus": corpus, "steps": 2, "gen_tokens": 3, "known_only": False}
    lens_cfg = {"tokens": 128, "context": 16, "batch": 4, "seed": 1, "lr": 0.01}
    sae_cfg = {"arch": "topk", "k": 4, "latents": 16, "layer": 1, "tokens": 256, "batch_size": 64, "context": 16}
    return {
        "attribute": ({"prompt": P, "target": "Mary", "foil": "John"}, {"method": "saliency"},
                      lambda m: attribute(m, P, "Mary", "John", method="saliency", metric="logit")),
        "attribute-evaluate": (None, {"tasks": ["induction"], "n": 2, "methods": ["saliency", "rollout"],
                                      "sanity": 1},
                               lambda m: evaluate_attributions(m, EvaluateConfig(("induction",), 2,
                                                                                 ("saliency", "rollout"), sanity=1))),
        "dla": ({"prompt": P, "target": "Mary", "foil": "John"}, {"by": "head"},
                lambda m: dla(m, P, "Mary", "John", by="head")),
        "patch": ([PAIR], {"site": "z", "direction": "noise"},
                  lambda m: activation_patching(m, _pairs(PAIR), "z", direction="noise", by_position=False)),
        "trace": ({"prompt": P}, {"subject": "Mary", "samples": 2},
                  lambda m: causal_trace(m, P, "Mary", samples=2)),
        "atp": ([PAIR, PAIR2], {"nodes": ["head", "mlp"]}, lambda m: atp(m, _pairs(PAIR, PAIR2), nodes=("head", "mlp"))),
        "circuit": ([PAIR, PAIR2], {"edges": 20}, lambda m: find_circuit(m, _pairs(PAIR, PAIR2), CircuitConfig(edges=20))),
        "path-patching": ([PAIR, PAIR2], {"receivers": "2.1,2.3", "senders": "0.0,1.2,mlp1",
                                          "receiver_input": "v"},
                          lambda m: path_patching(m, _pairs(PAIR, PAIR2), [(2, 1), (2, 3)],
                                                  senders=[(0, 0), (1, 2), ("mlp", 1)], receiver_input="v")),
        "flow": ({"prompt": P}, {"threshold": 0.05}, lambda m: flow(m, P, threshold=0.05)),
        "flow-graph": ({"prompt": P}, {"floor": 0.02}, lambda m: run_flow_graph(m, specs.Prompt(P), FlowGraphConfig(0.02))),
        "flow-node": ({"prompt": P, "target": "Mary"}, {"component": "resid_post", "layer": 1},
                      lambda m: run_flow_node(m, specs.Prompt(P, "Mary"), FlowNodeConfig("resid_post", 1))),
        "flow-verify": ({"prompt": P, "target": "Mary"}, {"threshold": 0.05},
                        lambda m: run_flow_verify(m, specs.Prompt(P, "Mary"), FlowVerifyConfig(0.05))),
        "head-inspect": ({"prompt": P}, {"layer": 1, "head": 2},
                         lambda m: run_head_inspect(m, specs.Prompt(P), HeadInspectConfig(1, 2))),
        "patch-cell": ([PAIR], {"layer": 1}, lambda m: run_patch_cell(m, _pairs(PAIR), PatchCellConfig(1))),
        "lens": ({"prompt": P, "target": "Mary"}, {"k": 3}, lambda m: logit_lens(m, P, "Mary", k=3)),
        "lens-train": (corpus, {**lens_cfg, "out_dir": str(tmp / "lens_json")},
                       lambda m: train_lens(m, corpus, TrainLensConfig(**lens_cfg, out_dir=str(tmp / "lens_py")))),
        "lens-eval": (corpus, {"tokens": 64, "context": 16},
                      lambda m: evaluate_lens(m, None, corpus, tokens=64, context=16)),
        "patchscope": ({"prompt": P}, {"layer": 1, "k": 4, "target_prompt": TP, "target_position": -1},
                       lambda m: patchscope(m, P, 1, k=4, target=TP, target_position=-1)),
        "patchscope-eval": (None, {"task": "identity", "n": 59, "target_prompt": TP, "target_position": -1},
                            lambda m: evaluate_task(m, replace(task(m, "identity", 59), target=target_prompt(TP),
                                                               target_position=-1))),
        "caa": (None, {"layers": "1,2", "multipliers": [-1, 1], "limit": 8, "test": 4},
                lambda m: caa_sweep(m, load_ab("myopic-reward", limit=8), layers=[1, 2], multipliers=(-1.0, 1.0),
                                    test=4, name="myopic-reward")),
        "probe": ({"texts": TEXTS, "labels": LABELS}, {"layers": "0,1", "folds": 2, "control": False}, _probe_direct),
        "steer": ({"prompt": P}, {"positive": "yes", "negative": "no", "layer": 1, "max_new_tokens": 3}, _steer_direct),
        "project": (None, {"head": "1.2", "tokens": "cat,dog", "k": 3},
                    lambda m: ResultSet({"ov": ov_circuit(m, 1, 2, ["cat", "dog"], k=3),
                                         "qk": qk_circuit(m, 1, 2, ["cat", "dog"], k=3)}, "project", m.name)),
        "edit": ({"prompt": P, "target": "tree"}, edit_cfg,
                 lambda m: edit_fact(m, Prompt(P, "tree"), EditConfig(**edit_cfg))),
        "edit-eval": (None, eval_cfg, lambda m: evaluate_edits(m, None, EditEvalConfig(**eval_cfg))),
        "edit-sequential": (None, seq_cfg, lambda m: sequential_edits(m, None, SequentialConfig(**seq_cfg))),
        "recall": (None, recall_cfg, lambda m: recall(m, None, RecallConfig(**recall_cfg))),
        "heads": (None, {"n": 6, "batch": 2, "texts": 2, "context": 8, "probe_tokens": 20, "corpus": corpus},
                  lambda m: head_atlas(m, HeadsConfig(n=6, batch=2, texts=2, context=8, probe_tokens=20,
                                                      corpus=corpus), progress=False)),
        "neurons": (corpus, {"layer": 1, "show": 3, "k": 2, "contexts": 4, "context": 8},
                    lambda m: neuron_report(m, corpus, NeuronsConfig(layer=1, show=3, k=2, contexts=4, context=8),
                                            progress=False)),
        "sae-eval": ({"saes": saes[0], "corpus": corpus}, {"contexts": 2},
                     lambda m: _sae_evals(m, saes[:1], corpus)[0]),
        "sae-features": ({"saes": saes[:1], "corpus": corpus}, {"top": 2, "latents": 3, "contexts": 2},
                         lambda m: run_sae_features(m, SAEFolders(saes[:1], corpus),
                                                    SAEFeaturesConfig(top=2, latents=3, contexts=2))),
        "sae-prompt": ({"saes": saes[:1], "corpus": corpus}, {"prompt": P, "latents": 3, "contexts": 1, "top": 2},
                       lambda m: run_sae_prompt(m, SAEFolders(saes[:1], corpus),
                                                SAEPromptConfig(prompt=P, latents=3, contexts=1, top=2))),
        "sae-compare": ({"saes": list(saes), "corpus": corpus}, {"contexts": 2},
                        lambda m: compare(_sae_evals(m, saes, corpus), [d.rsplit("/", 1)[-1] for d in saes])),
        "sae-train": (corpus, {**sae_cfg, "out_dir": str(tmp / "sae_json")},
                      lambda m: train_site_sae(m, corpus, SAETrainConfig(**sae_cfg, out_dir=str(tmp / "sae_py")))),
    }


def _same(a, b, name: str) -> None:
    if isinstance(b, torch.Tensor):
        torch.testing.assert_close(a.values, b, rtol=0, atol=0)
        return
    if isinstance(b, ResultSet):
        assert isinstance(a, ResultSet) and list(a) == list(b), name
        for key in b:
            _same(a[key], b[key], f"{name}.{key}")
        return
    assert isinstance(a, Result), name
    assert a.axes == b.axes and a.method == b.method and a.target == b.target, name
    assert a.values.numel() > 0 and not torch.all(a.values.nan_to_num() == 0), name  # not a comparison of zeros
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0, equal_nan=True, msg=name)
    assert set(a.extras) == set(b.extras), name


def test_json_round_trip_covers_every_method(tiny_llama, tmp_path, corpus_file, sae_dirs):
    cases = _cases(tmp_path, corpus_file, sae_dirs)
    registered = {s.name for s in specs.all_specs()}
    assert registered == set(cases), f"methods without a JSON round-trip case: {registered - set(cases)}"
    for name, (inputs, config, direct) in cases.items():
        spec = specs.get(name)
        doc = json.loads(json.dumps({"inputs": inputs, "config": config}))  # what the web app sends
        got = specs.run_json(tiny_llama, name, doc["inputs"], json.dumps(doc["config"]))
        assert isinstance(got, ResultSet if spec.result_kind == "resultset" else Result), name
        _same(got, direct(tiny_llama), name)
        # the Result survives its own JSON round trip
        back = (ResultSet if isinstance(got, ResultSet) else Result).from_dict(json.loads(json.dumps(got.to_dict())))
        _same(back, got, f"{name} (reloaded)")


def test_configs_are_frozen_documented_and_validated():
    for spec in specs.all_specs():
        assert spec.config.__dataclass_params__.frozen, spec.name
        helps = specs.field_help(spec.config)
        assert helps and all(helps.values()), (spec.name, [k for k, v in helps.items() if not v])
        assert spec.summary, spec.name
    with pytest.raises(InputError, match="no field"):
        specs.config_from_json(specs.get("dla").config, {"bye": "head"})
    with pytest.raises(InputError, match="layer, head, neuron"):
        specs.config_from_json(specs.get("dla").config, {"by": "block"})
    with pytest.raises(InputError, match="abs or support"):
        specs.get("circuit").config(rank="signed")
    cfg = specs.get("atp").config(nodes=("head",), star=True)
    assert specs.config_from_json(type(cfg), specs.config_to_json(cfg)) == cfg


def _plain(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─*]+", "", text)


def test_every_method_has_a_cli_command_with_each_field_help():
    from lmscope.cli.main import app

    for spec in specs.all_specs():
        res = CliRunner().invoke(app, [*spec.cli, "--help"], terminal_width=200)
        assert res.exit_code == 0, (spec.name, res.output)
        shown = _plain(res.output)
        for field_name, help_text in specs.field_help(spec.config).items():
            assert _plain(help_text) in shown, (spec.name, field_name)
        assert "--json" in res.output and "--model" in res.output


def test_cli_runs_a_spec_like_python(tiny_llama, tmp_path, monkeypatch):
    from lmscope.cli import common
    from lmscope.cli.main import app
    from lmscope.localization import dla

    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["dla", "--prompt", P, "--target", "Mary", "--foil", "John", "--by", "head",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(Result.load(out).values, dla(tiny_llama, P, "Mary", "John", by="head").values)
    bad = CliRunner().invoke(app, ["dla", "--prompt", P, "--target", "Mary", "--by", "block"])
    assert bad.exit_code == 2 and "layer, head, neuron" in bad.output


def test_atp_defaults_match_patching_and_are_normalised(tiny_llama):
    """Denoising by default (as activation patching); values = raw / (M_clean − M_corrupt) with both metrics
    computed here from plain runs; the raw estimates in extras."""
    from lmscope.localization import activation_patching, atp
    from lmscope.localization.metrics import Metric

    pairs = _pairs(PAIR, PAIR2)
    res = atp(tiny_llama, pairs, nodes=("head", "mlp"))
    raw = atp(tiny_llama, pairs, nodes=("head", "mlp"), direction="denoise", normalise=False)
    t, f = pairs.token_ids(tiny_llama)
    metric = Metric("logit_diff", t, f)
    clean = float(metric(tiny_llama.run(pairs.clean, logits="last").logits))
    corrupt = float(metric(tiny_llama.run(pairs.corrupt, logits="last").logits))
    assert abs(clean - corrupt) > 1e-3
    for kind in ("head", "mlp"):
        assert res[kind].params["direction"] == "denoise"
        torch.testing.assert_close(res[kind].extras["raw"], raw[kind].values)
        torch.testing.assert_close(res[kind].values, raw[kind].values / (clean - corrupt), rtol=1e-4, atol=1e-6)
    patched = activation_patching(tiny_llama, pairs, "z", by_position=False)
    assert patched.params["direction"] == res["head"].params["direction"]
    assert res["head"].meta["clean_metric"] == pytest.approx(clean, abs=1e-5)


def test_logit_lens_grid_against_hf_hidden_states(tiny_llama):
    from lmscope.decoding import lens_top, logit_lens

    m = tiny_llama
    res = logit_lens(m, P, "Mary", k=3)
    t = len(m.to_str_tokens(P))
    assert res.shape == (m.spec.n_layers + 1, t) and res.axis_names == ("layer", "position")
    enc = m.encode(P)
    with torch.no_grad():
        out = m.hf(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
        mid = m.hf.lm_head(m.hf.model.norm(out.hidden_states[1]))[0].softmax(-1)  # after block 0, every position
    mary = m.token_id("Mary")
    torch.testing.assert_close(res.values[1], mid[:, mary], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.values[-1], out.logits[0].softmax(-1)[:, mary], atol=1e-5, rtol=1e-4)
    top = lens_top(res, 4)
    torch.testing.assert_close(top.values[1], mid[4].topk(3).values, atol=1e-5, rtol=1e-4)
    assert int(top.extras["target_rank"][1]) == int((mid[4] > mid[4, mary]).sum()) + 1
    free = logit_lens(m, P, k=2)
    torch.testing.assert_close(free.values[-1], out.logits[0].softmax(-1).max(-1).values, atol=1e-5, rtol=1e-4)


def test_result_set_saves_and_loads(tmp_path):
    from lmscope.results import Axis

    a = Result(torch.arange(6.0).reshape(2, 3), (Axis("layer", (0, 1)), Axis("head", (0, 1, 2))), "atp", "m")
    b = Result(torch.tensor([1.0, float("nan")]), (Axis("layer", (0, 1)),), "atp", "m", extras={"raw": torch.ones(2)})
    rs = ResultSet({"head": a, "mlp": b}, "atp", "m", {"note": "x"})
    back = ResultSet.load(rs.save_json(tmp_path / "rs.json"))
    assert list(back) == ["head", "mlp"] and back.meta == {"note": "x"}
    assert torch.equal(back["head"].values, a.values) and torch.equal(back["mlp"].extras["raw"], b.extras["raw"])
    assert torch.isnan(back["mlp"].values[1])
    with pytest.raises(InputError):
        ResultSet({}, "atp", "m")


def test_one_metric_vocabulary(tiny_llama):
    from lmscope.attribution import resolve_target
    from lmscope.localization.metrics import Metric
    from lmscope.targets import canonical_metric

    logits = torch.randn(3, 2, tiny_llama.spec.d_vocab)
    t, f = torch.tensor([4, 5]), torch.tensor([6, 7])
    for alias, ours in (("probability", "prob"), ("log_prob", "logprob"), ("log_probability", "logprob")):
        torch.testing.assert_close(Metric(alias, t)(logits), Metric(ours, t)(logits))
    a = resolve_target(tiny_llama, "Mary", metric="log_prob")
    b = resolve_target(tiny_llama, "Mary", metric="log_probability")
    assert a == b and a.metric == "log_probability"
    with pytest.raises(InputError, match="not available"):
        canonical_metric("kl", ("logit", "probability"), "attribution")
    with pytest.raises(InputError, match="foil"):
        resolve_target(tiny_llama, "Mary", "Mary")
