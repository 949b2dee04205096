"""Benchmark: the app's graph view on the default model.

* the full contribution graph (``flow-graph``: one forward, the blockwise decomposition, every edge above
  0.01) of a 64-token prompt, timed against the same decomposition in one block (the parts of all
  T(T+1)/2 pairs × H heads × D at once, as a plain implementation holds them), which must give the same
  importances; and the app's API call for it (cold, then from the cache);
* a 512-token prompt: time and the growth of the process's peak resident memory during the call (the
  blockwise decomposition holds at most ``CHUNK_FLOATS`` floats of parts at a time);
* the route at τ = 0.04 from the full graph (what the slider does, in Python here; in the browser the
  browser test measures the drawing);
* one cold API call of each view that needs a forward (node click, verify, head inspector, drag-to-patch,
  steering) on the 64-token prompt.

* in a real browser (Playwright, Debian's chromium) on the 64-token prompt: from moving the threshold slider
  to the new graph painted, and from clicking a node to its panel painted (five different nodes: the server
  reads the graph's forward, ``forwards_during_clicks`` must be 0; five attention edges, whose panel asks for
  the shown head only: ``attn_edge_panel_json_kb`` compares its answer with every head's); ``--browser`` runs
  only this part.

``python bench_app.py --screenshot PATH`` instead serves the default model and saves a screenshot of the
graph view with Playwright and Debian's chromium (the README's picture).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import time
import urllib.parse

import torch

import lmscope
from lmscope import specs
from lmscope.app import App

from common import check, finish, interleaved, ratio, record

flow_mod = importlib.import_module("lmscope.localization.flow")
TEXT = ("When Mary and John went to the store, John gave a drink to Mary. Then the cat sat on the mat while "
        "the dog ran around the garden, and everyone in the small town of Springfield went home for dinner "
        "because the sun had set over the river and the stars were out. ")


def prompt_of(model, n_tokens: int) -> str:
    words = (TEXT * 40).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix with at most n_tokens tokens
        mid = (lo + hi + 1) // 2
        if len(model.to_str_tokens(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def one_block(model, prompt):
    old = flow_mod.CHUNK_FLOATS
    flow_mod.CHUNK_FLOATS = 1 << 62
    try:
        return flow_mod.flow_contributions(model, prompt)
    finally:
        flow_mod.CHUNK_FLOATS = old


def main() -> None:
    model = lmscope.load(progress=False)
    p64 = prompt_of(model, 64)
    t64 = len(model.to_str_tokens(p64))
    timings, outs = interleaved({"one block": lambda: one_block(model, p64),
                                 "lmscope blockwise": lambda: flow_mod.flow_contributions(model, p64)})
    checks = [check("attention importances, blockwise vs one block", outs["lmscope blockwise"].attn,
                    outs["one block"].attn, atol=1e-6, why="the same float32 sums in another grouping")]
    app = App(model)
    cold = app.run({"method": "flow-graph", "inputs": p64, "config": {}})
    warm = app.run({"method": "flow-graph", "inputs": p64, "config": {}})
    edges = cold["result"]["meta"]["edges"]
    t0 = time.perf_counter()
    routed = flow_mod.route(edges, model.spec.n_layers, t64 - 1, 0.04)
    route_ms = (time.perf_counter() - t0) * 1e3
    direct = flow_mod.flow(model, p64, threshold=0.04, contributions=outs["lmscope blockwise"])
    checks.append(check("route from the full graph vs flow()", sorted(e["weight"] for e in routed),
                        sorted(e["weight"] for e in direct.meta["edges"]), atol=1e-9, why="same edges, same sums"))
    views_ms = {}  # one cold API call each on the 64-token prompt: what a click in each view waits for
    pair = [{"clean": p64, "corrupt": p64.replace("John gave", "Mary gave", 1), "target": " Mary", "foil": " John"}]
    for label, method, inputs, config in (
            ("node click (flow-node heads, no forward)", "flow-node", p64, {"component": "attn_heads", "layer": 15}),
            ("node click (flow-node lens, no forward)", "flow-node", p64, {"component": "resid_post", "layer": 15}),
            ("verify (flow-verify)", "flow-verify", p64, {}),
            ("head inspector (head-inspect)", "head-inspect", p64, {"layer": 15, "head": 3}),
            ("drag to patch (patch-cell)", "patch-cell", pair, {"layer": 10, "position": 10}),
            ("steering, 20 tokens (steer)", "steer", p64, {"positive": " Love", "negative": " Hate", "layer": 6})):
        views_ms[label] = app.run({"method": method, "inputs": inputs, "config": config})["meta"]["latency_ms"]
    p512 = prompt_of(model, 512)
    t512 = len(model.to_str_tokens(p512))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    g512 = specs.run_json(model, "flow-graph", p512, {})
    s512 = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = model.spec
    record("app_graph", work={
        "one block": "flow_contributions with every causal pair's (H, D) parts in one tensor",
        "lmscope blockwise": "flow_contributions, parts in blocks of at most CHUNK_FLOATS floats"},
        checks=checks, timings=timings, model=model.name, tokens=t64,
        speedup=ratio(timings["one block"], timings["lmscope blockwise"]),
        api_flow_graph_cold_ms=cold["meta"]["latency_ms"], api_flow_graph_cached_ms=warm["meta"]["latency_ms"],
        api_views_cold_ms=views_ms,
        graph_edges_above_0_01=len(edges), route_ms_python=round(route_ms, 2), route_edges=len(routed),
        json_mb=round(len(json.dumps(cold["result"])) / 1e6, 2),
        tokens_512=t512, seconds_512=round(s512, 2), edges_512=len(g512.meta["edges"]),
        peak_rss_growth_mb_512=round((rss1 - rss0) / 1024, 1),
        one_block_parts_gb_512=round(t512 * (t512 + 1) / 2 * s.n_heads * s.d_model * 4 / 1e9, 2))
    browser(model, p64)
    finish()


@contextlib.contextmanager
def app_page(model, prompt: str):
    """The app serving ``model``, and a chromium page (Playwright) showing the graph of ``prompt``."""
    from playwright.sync_api import sync_playwright

    from lmscope.app import start

    app = App(model)
    server, _ = start(app)
    url = f"http://127.0.0.1:{server.server_address[1]}/#" + urllib.parse.urlencode({"prompt": prompt,
                                                                                    "threshold": 0.04})
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/lib/chromium/chromium", args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=600_000)
            yield app, page
            b.close()
    finally:
        server.shutdown()


def browser(model, prompt: str) -> None:
    """Interaction latencies in a real browser on ``prompt`` (the issue's ≤ 100 ms targets)."""
    with app_page(model, prompt) as (app, page):
        edges = int(page.get_attribute("#graph", "data-edges"))
        slider = [page.evaluate("""async (v) => { const el = document.getElementById('threshold');
            el.value = String(v); el.dispatchEvent(new Event('input')); return await window.lmscope.lastRedraw; }""", v)
                  for v in (0.02, 0.05, 0.08, 0.03, 0.01, 0.06, 0.04)]
        misses, clicks, server = app.memo.misses, {}, {}
        far = page.evaluate("""() => window.lmscope.edges.map((e, k) => [e, k]).filter(([e]) => e.kind === 'attn' &&
            e.source.split('_')[1] !== e.target.split('_')[1]).map(([, k]) => k)""")  # curves, not zero-width
        for sel in ("circle.node.resid", "rect.node.mlp", "circle.node.attn", "path.edge.attn"):
            for k in ((1, 2, 3, 4, 5) if sel == "path.edge.attn" else (1, 2)):
                if sel == "path.edge.attn":  # a curve's box centre is off its stroke: the click event itself
                    page.locator(f"path[data-edge='{far[k]}']").dispatch_event("click")
                else:
                    page.locator(sel).nth(k).click()
                ms = page.evaluate("window.lmscope.lastClick")
                call = page.evaluate("window.lmscope.lastCall")  # the server's part of it
                clicks.setdefault(sel, []).append(round(ms, 1))
                server.setdefault(sel, []).append([round(call["compute_ms"], 1), round(call["round_trip_ms"], 1)])
        shown = page.evaluate("window.lmscope.selected.edge")  # what the last edge click asked for, as JSON
        layer, pos = map(int, shown["target"][1:].split("_"))
        config = {"component": "attn_heads", "layer": layer, "position": pos}
        head_kb = len(json.dumps(app.run({"method": "flow-node", "inputs": prompt, "config": {
            **config, "head": int(page.get_attribute("#head-detail", "data-head"))}})))
        every_kb = len(json.dumps(app.run({"method": "flow-node", "inputs": prompt, "config": config})))
    every = sorted(x for v in clicks.values() for x in v)
    edge = sorted(clicks["path.edge.attn"])
    record("app_browser", work={"threshold": "slider input event to the rerouted graph painted (no server call)",
                                "node click": "click to the node's panel painted (server: flow-node from the "
                                              "graph's forward; an attention edge: the shown head's maps and "
                                              "tokens, from the layer importances the graph kept with its "
                                              "forward, drawn on canvases); with each click the server's compute "
                                              "and the request's round trip (JSON both ways included)"},
           model=model.name, tokens=len(model.to_str_tokens(prompt)), edges_at_0_04=edges,
           threshold_ms=[round(x, 1) for x in slider], threshold_median_ms=round(sorted(slider)[len(slider) // 2], 1),
           click_ms=clicks, click_median_ms=every[len(every) // 2], attn_edge_click_median_ms=edge[len(edge) // 2],
           attn_edge_panel_json_kb={"one head (what the page asks for)": round(head_kb / 1e3, 1),
                                    "every head": round(every_kb / 1e3, 1)}, click_server_compute_and_round_trip_ms=server,
           forwards_during_clicks=app.memo.misses - misses,
           checks=[check("no forward during node clicks", app.memo.misses - misses, 0, atol=0,
                         why="the panels read the graph's forward")])


def screenshot(path: str, prompt: str) -> None:
    with app_page(lmscope.load(progress=False), prompt) as (_, page):
        k = page.evaluate("""() => { const g = window.lmscope, last = g.graph.meta.tokens.length - 1;
            let best = -1; g.edges.forEach((e, i) => { if (e.kind === 'attn' && e.target.endsWith('_' + last) &&
              (best < 0 || e.weight > g.edges[best].weight)) best = i; }); return best; }""")
        page.locator(f"path[data-edge='{k}']").click()
        page.wait_for_selector("#head-detail[data-head]", timeout=120_000)
        page.screenshot(path=path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--browser", action="store_true", help="only the browser latencies")
    ap.add_argument("--prompt", default="When Mary and John went to the store, John gave a drink to")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.screenshot:
        screenshot(args.screenshot, args.prompt)
    elif args.browser:
        m = lmscope.load(progress=False)
        browser(m, prompt_of(m, 64))
        finish()
    else:
        main()
