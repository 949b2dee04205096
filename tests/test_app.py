"""`lmscope app`: the JSON API answers what specs.run_json computes, bad input gets a 4xx, concurrent calls
equal sequential ones; the graph view's route (route.js, run with node) equals the library's; SAE folders only
under the app's root. The page in a real browser: tests/test_app_browser.py."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import pytest

from lmscope import specs
from lmscope.app import App, start
from lmscope.errors import InputError
from lmscope.localization.flow import flow, flow_contributions, graph_edges, route

P = "when Mary and John went to the store John gave a drink to"
P2 = "the cat sat on the mat and the dog ran to the"
CASES = [  # (method, inputs, config): every view of the graph page, and a few other methods
    ("flow-graph", P, {}),
    ("flow-node", P, {"component": "attn_heads", "layer": 1, "position": 7}),
    ("flow-node", P, {"component": "mlp_neurons", "layer": 2, "position": 12, "k": 4}),
    ("flow-node", {"prompt": P, "target": "Mary"}, {"component": "resid_post", "layer": 1}),
    ("flow-node", P, {"component": "resid_mid", "layer": 0, "position": 3}),
    ("flow-node", P, {"component": "embed", "position": 2}),
    ("flow", P, {"threshold": 0.05}),
    ("dla", {"prompt": P, "target": "Mary", "foil": "John"}, {"by": "head"}),
    ("lens", P, {"k": 3}),
    ("attribute", {"prompt": P, "target": "Mary"}, {"method": "saliency"}),
    ("flow-verify", {"prompt": P, "target": "Mary"}, {"nodes": "A1_12,M2_12,A0_3"}),
    ("head-inspect", P, {"layer": 1, "head": 2, "position": 9}),
    ("patch-cell", [{"clean": P, "corrupt": P.replace("John gave", "Mary gave"), "target": "Mary", "foil": "John"}],
     {"layer": 1, "position": 8}),
    ("steer", P, {"positive": "yes", "negative": "no", "layer": 1, "scale": 4.0, "max_new_tokens": 3}),
    ("sae-prompt", {"saes": "resid"}, {"prompt": P, "latents": 4}),
    ("sae-prompt", "heads/z", {"prompt": P, "latents": 3, "position": 5}),
]


def _plain(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "provenance"}


@pytest.fixture(scope="module")
def sae_root(tiny_llama, tmp_path_factory):
    """A folder of SAE folders for the SAE view: one on a residual site, one on attention outputs (z)."""
    from lmscope.sae import make_sae, save_sae

    root, s = tmp_path_factory.mktemp("saes"), tiny_llama.spec
    save_sae(make_sae("relu", d_in=s.d_model, d_sae=24, site="blocks.1.resid_post", seed=1), root / "resid")
    save_sae(make_sae("relu", d_in=s.n_heads * s.d_head, d_sae=16, d_head=s.d_head, site="blocks.1.attn.z", seed=2),
             root / "heads" / "z")
    (root / "notes").mkdir()
    return root


def _direct_inputs(inputs, sae_root):
    """What the server hands the spec: SAE folder names resolved under the app's root."""
    if isinstance(inputs, dict) and "saes" in inputs:
        inputs = inputs["saes"]
    return {"saes": str(sae_root / inputs), "corpus": "default"} if inputs in ("resid", "heads/z") else inputs


@pytest.fixture(scope="module")
def served(tiny_llama, sae_root):
    app = App(tiny_llama, max_tokens=64, max_queue=64, sae_dir=sae_root)
    server, thread = start(app)
    yield app, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)
    assert not thread.is_alive()


def call(url: str, body=None, raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict | bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = r.read()
            status = r.status
    except urllib.error.HTTPError as err:
        payload, status = err.read(), err.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def test_api_answers_what_run_json_computes(served, tiny_llama, sae_root):
    app, url = served
    status, info = call(url + "/api/info")
    assert status == 200 and info["model"] == tiny_llama.name and info["n_layers"] == tiny_llama.spec.n_layers
    names = {m["name"] for m in info["methods"]}
    assert {"flow-graph", "flow-node", "flow", "dla", "lens", "attribute", "patch", "head-inspect", "patch-cell",
            "steer", "sae-prompt", "sae-features"} <= names
    assert not names & {"lens-train", "sae-train", "probe", "lens-eval", "sae-eval", "sae-compare"}  # they write
    assert info["saes"] == ["heads/z", "resid"]  # folders holding an SAE, relative to --sae-dir
    for method, inputs, config in CASES:
        status, doc = call(url + "/api/run", {"method": method, "inputs": inputs, "config": config})
        assert status == 200, (method, doc)
        want = specs.run_json(tiny_llama, method, _direct_inputs(inputs, sae_root), config).to_dict()
        assert _plain(doc["result"]) == json.loads(json.dumps(_plain(want))), (method, config)
        assert doc["meta"]["latency_ms"] >= doc["meta"]["compute_ms"] >= 0 and doc["meta"]["cached"] is False
        status, again = call(url + "/api/run", {"method": method, "inputs": inputs, "config": config})
        assert again["meta"]["cached"] is True and again["result"] == doc["result"]
    status, page = call(url + "/")
    assert status == 200 and b"route.js" in page
    assert call(url + "/static/app.js")[0] == 200


def test_bad_requests_get_a_4xx_with_the_reason(served):
    app, url = served
    bad = [
        ({"method": "nope", "inputs": P}, 404, "No method"),
        ({"method": "lens-train", "inputs": "default"}, 404, "No method"),
        ({"method": "lens", "inputs": P, "config": {"kind": "tuned", "lens_path": "/etc"}}, 403, "reads no files"),
        ({"method": "flow", "inputs": P, "config": {"threshold": 2}}, 400, "threshold"),
        ({"method": "flow", "inputs": P, "config": {"bogus": 1}}, 400, "bogus"),
        ({"method": "flow-node", "inputs": P, "config": {"component": "x"}}, 400, "choice"),
        ({"method": "flow-node", "inputs": P, "config": {"layer": 99}}, 400, "layer"),
        ({"method": "flow", "inputs": " ".join(["cat"] * 100)}, 413, "too long"),
        ({"method": "flow", "inputs": 5}, 400, "prompt"),
        ({"inputs": P}, 400, "method"),
        ({"method": "sae-prompt", "inputs": "../saes", "config": {"prompt": P}}, 403, "not a folder under"),
        ({"method": "sae-prompt", "inputs": "/etc", "config": {"prompt": P}}, 403, "not a folder under"),
        ({"method": "sae-prompt", "inputs": "resid/../../x", "config": {"prompt": P}}, 403, "not a folder under"),
        ({"method": "sae-prompt", "inputs": "notes", "config": {"prompt": P}}, 404, "No SAE folder"),
        ({"method": "sae-prompt", "inputs": {"saes": "resid", "corpus": "/etc/passwd"}, "config": {"prompt": P}},
         403, "built-in corpus"),
        ({"method": "sae-prompt", "inputs": ["resid"], "config": {"prompt": P}}, 400, "SAE input"),
        ({"method": "sae-prompt", "inputs": "resid", "config": {"prompt": " ".join(["cat"] * 100)}}, 413, "too long"),
        ({"method": "sae-prompt", "inputs": "resid", "config": {"prompt": P, "contexts": 1000}}, 413, "at most 64"),
        ({"method": "sae-features", "inputs": "resid", "config": {"html": "/tmp/x.html"}}, 403, "reads no files"),
        ({"method": "sae-eval", "inputs": "resid"}, 404, "No method"),
        ({"method": "steer", "inputs": P, "config": {"positive": "a", "negative": "b", "layer": 1,
                                                       "max_new_tokens": 1000}}, 413, "at most 128"),
        ({"method": "flow-verify", "inputs": P, "config": {"nodes": "A9_1"}}, 400, "no block"),
        ({"method": "steer", "inputs": P, "config": {"layer": 1}}, 400, "needs positive, negative (no default)"),
        ({"method": "patch-cell", "inputs": "not json", "config": {}}, 400, "not JSON"),
        ({"method": "sae-prompt", "inputs": "bad\u0000name", "config": {"prompt": P}}, 403, "not a folder under"),
        ({"method": "flow-verify", "inputs": P, "config": {"nodes": "Z1_1"}}, 400, "block id"),
        ({"method": "patch-cell", "inputs": [{"clean": P, "corrupt": P, "target": "Mary"}], "config": {"layer": 7}},
         400, "layer"),
    ]
    for body, status, words in bad:
        got, doc = call(url + "/api/run", body)
        assert got == status and words in doc["error"], (body, got, doc)
    assert call(url + "/api/run", raw=b"{not json")[0] == 400
    assert call(url + "/static/../server.py")[0] == 404
    assert call(url + "/static/nothere.js")[0] == 404


def test_fuzzed_json_never_gives_a_500(served):
    app, url = served
    rng = random.Random(0)
    atoms = [None, True, 0, -1, 3, 1.5, "", "x", P, [], {}, [1, "a"], {"prompt": P}, {"prompt": 3}, "∑\u0000",
             "resid", "../resid", {"saes": "heads/z"}, "A1_3,M0_2", [{"clean": P, "corrupt": P, "target": "Mary"}]]
    methods = ["flow", "flow-node", "flow-graph", "dla", "lens", "attribute", "project", "flow-verify", "head-inspect",
               "patch-cell", "sae-prompt", "steer", 7, None]
    fields = ["threshold", "position", "component", "layer", "k", "by", "method", "floor", "zzz", "nodes", "prompt",
              "head", "to_position", "latents", "metric", "max_new_tokens"]
    for _ in range(60):
        body = {"method": rng.choice(methods), "inputs": rng.choice(atoms),
                "config": {rng.choice(fields): rng.choice(atoms) for _ in range(rng.randint(0, 2))}}
        if rng.random() < 0.2:
            body = rng.choice(atoms)
        status, doc = call(url + "/api/run", body, timeout=60)
        assert status in (200, 400, 403, 404, 413), (body, status, doc)


def test_twenty_concurrent_calls_equal_sequential_ones(served, tiny_llama):
    app, url = served
    jobs = [("flow-node", P if i % 2 else P2, {"component": "resid_post", "layer": i % 3, "position": i % 5})
            for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(lambda j: call(url + "/api/run", {"method": j[0], "inputs": j[1], "config": j[2]}), jobs))
    for (method, inputs, config), (status, doc) in zip(jobs, got):
        assert status == 200
        assert _plain(doc["result"]) == json.loads(json.dumps(_plain(specs.run_json(tiny_llama, method, inputs,
                                                                                     config).to_dict())))
    assert app.waiting == 0 and not app.lock.locked()


def test_full_graph_route_equals_flow(tiny):
    c = flow_contributions(tiny, P)
    full = graph_edges(c, 0.01)
    for tau in (0.01, 0.04, 0.1):
        for pos in (12, 5):
            want = flow(tiny, P, position=pos, threshold=tau, contributions=c).meta["edges"]
            got = route(full, tiny.spec.n_layers, pos, tau)
            key = lambda es: sorted((e["source"], e["target"], e["kind"], round(e["weight"], 6)) for e in es)  # noqa: E731
            assert key(got) == key(want) and got, (tau, pos)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_route_js_equals_the_library(tiny_llama, tmp_path):
    g = specs.run_json(tiny_llama, "flow-graph", P, {})
    cases = [(tau, pos) for tau in (0.01, 0.025, 0.04, 0.07, 0.1) for pos in (0, 6, 12)]
    want = [route(g.meta["edges"], tiny_llama.spec.n_layers, pos, tau) for tau, pos in cases]
    js = resources.files("lmscope.app") / "static" / "route.js"
    (tmp_path / "graph.json").write_text(json.dumps({"edges": g.meta["edges"], "n": tiny_llama.spec.n_layers,
                                                     "cases": cases}))
    script = (f"const R = require({json.dumps(str(js))}); const g = require('./graph.json');"
              "const inc = R.indexEdges(g.edges);"
              "console.log(JSON.stringify(g.cases.map(([t, p]) => R.route(inc, g.n, p, t))));")
    out = subprocess.run(["node", "-e", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout)
    for (tau, pos), w, o in zip(cases, want, got):
        assert len(o) == len(w), (tau, pos)
        for a, b in zip(sorted(o, key=lambda e: (e["source"], e["target"], e["kind"])),
                        sorted(w, key=lambda e: (e["source"], e["target"], e["kind"]))):
            assert (a["source"], a["target"], a["kind"]) == (b["source"], b["target"], b["kind"])
            assert a["weight"] == pytest.approx(b["weight"], abs=1e-9)
            assert a.get("heads", [])== pytest.approx(b.get("heads", []), abs=2e-6)


def test_cli_app_serves_one_request_and_stops(tmp_path, monkeypatch, tiny_llama):
    from typer.testing import CliRunner

    import lmscope.cli.common as common
    from lmscope.cli.main import app as cli

    from conftest import free_port

    port = free_port()
    monkeypatch.setattr(common, "load_model", lambda spec: tiny_llama)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=CliRunner().invoke(cli, ["app", "--port", str(port),
                                                                                 "--requests", "1"])))
    t.start()
    for _ in range(100):
        try:
            status, info = call(f"http://127.0.0.1:{port}/api/info", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            threading.Event().wait(0.1)
    t.join(30)
    assert status == 200 and info["model"] == tiny_llama.name
    assert result["r"].exit_code == 0 and f"127.0.0.1:{port}" in result["r"].output
    bad = CliRunner().invoke(cli, ["app", "--port", "70000"])
    assert bad.exit_code == 2 and "--port 70000" in bad.output
    bad = CliRunner().invoke(cli, ["app", "--sae-dir", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "--sae-dir" in bad.output and "not a folder" in bad.output


def test_sae_methods_need_an_sae_folder(tiny_llama, tmp_path):
    from lmscope.app.server import HTTPError

    app = App(tiny_llama)
    assert "sae-prompt" not in app.methods and app.info()["saes"] == []
    with pytest.raises(HTTPError) as err:
        app.run({"method": "sae-prompt", "inputs": "resid", "config": {"prompt": P}})
    assert err.value.status == 403 and "--sae-dir" in str(err.value)
    with pytest.raises(InputError, match="not a folder"):
        App(tiny_llama, sae_dir=tmp_path / "missing")


def test_a_full_queue_answers_503(tiny_llama):
    from lmscope.app.server import HTTPError

    app = App(tiny_llama, max_queue=1)
    app.waiting = 1  # one job already waits for the model
    with pytest.raises(HTTPError) as err:
        app.run({"method": "flow", "inputs": P})
    assert err.value.status == 503 and "waiting" in str(err.value)
    app.waiting = 0
    assert app.run({"method": "flow", "inputs": P})["meta"]["cached"] is False
