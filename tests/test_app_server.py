"""The app's server parts: the forward memo behind forward-free node clicks (bit-equal to fresh runs, on every
family), job status and progress while the model is busy (the server stays responsive), and the Starlette
layer's own refusals (body size, unknown paths, bad job ids)."""

from __future__ import annotations

import importlib
import io
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmscope import specs
from lmscope.app import App, start
from lmscope.interventions import Scale
from lmscope.localization.flow import graph_run
from lmscope.models import RunMemo

from test_app import P, P2, _plain, call

flow_mod = importlib.import_module("lmscope.localization.flow")  # the module (the package exports flow())
GRAPH_SITES = ("attn.v", "attn.pattern", "resid_pre", "attn_out", "mlp_out", "resid_post")


def _same(a, b) -> None:
    assert sorted(a.cache) == sorted(b.cache)
    for k in a.cache:
        assert torch.equal(a.cache[k], b.cache[k]), k
    assert (a.logits is None) == (b.logits is None) and (a.logits is None or torch.equal(a.logits, b.logits))
    assert torch.equal(a.batch.input_ids, b.batch.input_ids)


def test_memo_answers_are_fresh_runs_bit_for_bit(tiny):
    """Every answer inside the memo equals a fresh run of the same request, keys included (the aux post-norm
    factors only where a fresh run records them); only requests with the same explicit-attention layers are
    answered from a stored forward."""
    m, n = tiny, tiny.spec.n_layers
    patterns = [f"blocks.{l}.attn.pattern" for l in range(n)]
    requests = [  # (sites, logits, answered from the memo?)
        (patterns + ["blocks.1.resid_pre", "blocks.0.mlp_out"], "all", False),  # the first forward
        (patterns + ["blocks.1.resid_pre"], "last", True),
        (patterns, "none", True),
        (patterns + ["blocks.1.attn.head_out", "final.scale"], "none", False),  # a new kind: the sites grow
        (patterns + ["blocks.0.mlp_out", "blocks.1.attn.head_out", "blocks.1.resid_pre"], "all", True),
        (["blocks.1.attn.pattern", "blocks.1.resid_pre"], "none", False),  # another explicit path: its own forward
        (["blocks.1.attn.pattern"], "last", True),
    ]
    memo = RunMemo(m)
    with memo:
        for sites, logits, hit in requests:
            before = memo.hits
            got = m.run(P, cache=sites, logits=logits)
            assert (memo.hits == before + 1) == hit, sites
            _same(got, m.run_plain(P, cache=sites, logits=logits))
        got["blocks.1.attn.pattern"].zero_()  # a caller may change what it got: the memo keeps its own
        _same(m.run(P, cache=["blocks.1.attn.pattern"], logits="none"),
              m.run_plain(P, cache=["blocks.1.attn.pattern"], logits="none"))
        hits = memo.hits
        iv = Scale("blocks.0.resid_post", factor=0.5)
        m.run(P, cache=patterns, interventions=[iv])  # interventions and batches always run
        m.run([P, P2], cache=patterns)
        assert memo.hits == hits
    m.run(P, cache=patterns)  # not active outside ``with``
    assert memo.hits == hits and memo.nbytes > 0
    small = RunMemo(m, max_bytes=1)  # a forward over the bound is not kept
    with small:
        m.run(P, cache=patterns)
        m.run(P, cache=patterns)
    assert small.hits == 0 and small.misses == 2 and small.nbytes == 0


def test_node_clicks_after_the_graph_run_no_forward(tiny_llama, monkeypatch):
    """After the graph of a prompt, every kind of node panel is computed without a forward, and equals the
    library's flow-node result exactly; attention-edge panels read the layer importances the graph kept with
    its forward (no layer is decomposed again)."""
    app = App(tiny_llama)
    assert app.run({"method": "flow-graph", "inputs": P2})["meta"]["cached"] is False
    forwards, decomposed = [], []
    real, layer_imp = tiny_llama.forward, flow_mod._layer_importances
    monkeypatch.setattr(tiny_llama, "forward", lambda batch, **kw: forwards.append(1) or real(batch, **kw))
    monkeypatch.setattr(flow_mod, "_layer_importances", lambda *a: decomposed.append(a[2]) or layer_imp(*a))
    clicks = [{"component": "attn_heads", "layer": 1, "position": 9}, {"component": "mlp_neurons", "layer": 2},
              {"component": "resid_mid", "layer": 0, "position": 4}, {"component": "resid_post", "layer": 2},
              {"component": "embed", "position": 3}, {"component": "attn_heads", "layer": 2, "position": 5, "head": 1},
              {"component": "attn_heads", "layer": 0, "head": -1}]
    got = [app.run({"method": "flow-node", "inputs": {"prompt": P2, "target": "dog"}, "config": c}) for c in clicks]
    assert forwards == [] and decomposed == [] and app.memo.hits >= len(clicks)
    monkeypatch.setattr(tiny_llama, "forward", real)
    for config, doc in zip(clicks, got):
        want = specs.run_json(tiny_llama, "flow-node", {"prompt": P2, "target": "dog"}, config).to_dict()
        assert _plain(doc["result"]) == _plain(want), config
    run = graph_run(tiny_llama, P2)  # the graph's forward holds what every panel reads
    assert {f"blocks.0.{k}" for k in GRAPH_SITES + ("attn.head_out", "mlp.post")} <= set(run.cache)
    one = graph_run(tiny_llama, P2, [1])  # one layer's sites (what a panel asks for): the same values
    assert one.logits is None and not any(k.startswith("blocks.0.") and not k.endswith("pattern") for k in one.cache)
    for k, v in one.cache.items():
        assert torch.equal(v, run.cache[k]), k


def _post(url, body, job_id=None, out=None):
    req = urllib.request.Request(url + "/api/run", data=__import__("json").dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **({"X-Job-Id": job_id} if job_id else {})})
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = __import__("json").loads(r.read())
    if out is not None:
        out[job_id] = doc
    return doc


def test_jobs_report_queue_place_elapsed_time_and_progress(tiny_llama, monkeypatch):
    """While one job runs (showing a progress bar) and another waits, the server answers: the running job's
    bar, elapsed seconds and the waiting one's place in the queue; both then finish with the library's result."""
    from tqdm import tqdm

    import lmscope.app.server as server_mod

    app = App(tiny_llama, max_queue=4)
    server, thread = start(app)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    go, began = threading.Event(), threading.Event()
    real = specs.run_json

    def slow(model, method, inputs, config):
        if method == "lens":  # a job with a progress bar, held until the test lets it go
            with tqdm(total=10, desc="test bar", file=io.StringIO()) as bar:
                bar.update(3)
                began.set()
                go.wait(30)
        return real(model, method, inputs, config)

    monkeypatch.setattr(server_mod.specs, "run_json", slow)
    out = {}
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, url, {"method": "lens", "inputs": P, "config": {"k": 2}}, "job-1", out)
            assert began.wait(30)
            second = pool.submit(_post, url, {"method": "flow", "inputs": P}, "job-2", out)
            for _ in range(200):
                status, two = call(url + "/api/jobs/job-2")
                if status == 200:
                    break
                time.sleep(0.02)
            t0 = time.perf_counter()
            status, info = call(url + "/api/info")  # the server answers while the model is busy
            assert status == 200 and time.perf_counter() - t0 < 5
            status, one = call(url + "/api/jobs/job-1")
            assert status == 200 and one["state"] == "running" and one["position"] == 0 and one["running_s"] > 0
            assert {"desc": "test bar", "n": 3, "total": 10} in one["bars"] and one["method"] == "lens"
            status, two = call(url + "/api/jobs/job-2")
            assert two["state"] == "queued" and two["position"] == 1 and two["running_s"] is None
            time.sleep(0.05)
            assert call(url + "/api/jobs/job-2")[1]["elapsed_s"] > two["elapsed_s"]
            go.set()
            first.result(60), second.result(60)
    finally:
        go.set()
        server.shutdown()
        server.server_close()
    thread.join(10)
    assert not thread.is_alive()
    assert out["job-1"]["meta"]["job"] == "job-1" and out["job-2"]["meta"]["job"] == "job-2"
    assert _plain(out["job-2"]["result"]) == _plain(real(tiny_llama, "flow", P, {}).to_dict())
    done = app.job_status("job-1")
    assert done["state"] == "done" and done["bars"] == [] and app.waiting == 0


def test_starlette_layer_refusals(tiny_llama):
    app = App(tiny_llama, max_body=200)
    server, thread = start(app)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, doc = call(url + "/api/run", {"method": "flow", "inputs": "cat " * 100})
        assert status == 413 and "over 200 bytes" in doc["error"]
        assert call(url + "/api/run")[0] == 405  # GET of a POST route
        status, doc = call(url + "/nothing")
        assert status == 404 and "No page" in doc["error"]
        status, doc = call(url + "/api/jobs/nope")
        assert status == 404 and "No job" in doc["error"]
        req = urllib.request.Request(url + "/api/run", data=b'{"method": "flow", "inputs": "cat"}',
                                     headers={"X-Job-Id": "../x"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400 and b"X-Job-Id" in err.value.read()
        assert call(url + "/favicon.ico")[0] == 204
    finally:
        server.shutdown()
        server.server_close()
    thread.join(10)
    assert not thread.is_alive()
