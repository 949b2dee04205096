"""`lmscope app` in a real browser (Playwright driving Debian's chromium, skipped where either is missing): the
graph page (LM-TT parity: counts, slider, clicks, verify, export, two prompts, attribution, DLA, the URL), the
views beyond it (pins and groups, head inspector, SAE features, steering, drag-to-patch), and a Result drawn in
a notebook by the same renderer. Every number the page shows is checked against the library's. Screenshots go
to tests/screenshots/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmscope import specs
from lmscope.errors import InputError
from lmscope.localization.flow import flow, flow_contributions

from test_app import P, _plain, sae_root, served  # noqa: F401 - the served app and its SAE folder are fixtures

def _browser():
    pw = pytest.importorskip("playwright.sync_api")
    exe = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p and Path(p).exists()),
               None)
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return pw, exe


def _png(page, button: str, least: tuple[int, int] = (80, 40)):
    """Click a view's PNG button; the download is a PNG of at least ``least`` pixels, not blank."""
    from PIL import Image

    with page.expect_download() as dl:
        page.click(button)
    raw = Path(dl.value.path()).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 2000, (button, len(raw))
    shots = Path(__file__).parent / "screenshots"
    shots.mkdir(exist_ok=True)
    (shots / f"export-{dl.value.suggested_filename}").write_bytes(raw)  # to look at
    img = Image.open(Path(dl.value.path())).convert("RGB")
    assert img.width >= least[0] and img.height >= least[1], (button, img.size)
    small = img.resize((img.width // 4 or 1, img.height // 4 or 1))
    inked = sum(1 for px in small.getdata() if min(px) < 200)  # not white: lines, cells, text
    assert inked > 0.005 * small.width * small.height and len(set(small.getdata())) > 3, (button, inked)
    return img


def _graph_page(browser, url):
    """A new page with the graph of P drawn, and the list its script errors go to."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(f"{e}\n{getattr(e, 'stack', '')}"))
    page.goto(url + "/")
    page.fill("#prompt", P)
    page.click("#run")
    page.wait_for_function("window.lmscope.graph && window.lmscope.graph.meta.prompt === %s" % json.dumps(P))
    return page, errors


def test_graph_page_in_a_real_browser(served, tiny_llama, tmp_path):
    pw, exe = _browser()
    app, url = served
    shots = Path(__file__).parent / "screenshots"
    shots.mkdir(exist_ok=True)
    c = flow_contributions(tiny_llama, P)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page, errors = _graph_page(browser, url)
        page.wait_for_selector("#graph[data-edges]")
        want = flow(tiny_llama, P, threshold=0.04, contributions=c)
        assert int(page.get_attribute("#graph", "data-nodes")) == len(want.meta["nodes"])
        assert int(page.get_attribute("#graph", "data-edges")) == len(want.meta["edges"])
        page.screenshot(path=str(shots / "app-graph.png"))
        # the threshold slider re-routes without a forward, in under 100 ms of drawing
        page.eval_on_selector("#threshold", "el => { el.value = '0.01'; el.dispatchEvent(new Event('input')); }")
        low = flow(tiny_llama, P, threshold=0.01, contributions=c)
        assert int(page.get_attribute("#graph", "data-edges")) == len(low.meta["edges"]) > len(want.meta["edges"])
        # drawing time: the median of 5 redraws (a bound loose enough for a loaded CI machine; quiet: a few ms)
        draws = page.evaluate("""() => { const ms = []; for (let k = 0; k < 5; k++) {
            document.getElementById('threshold').dispatchEvent(new Event('input'));
            ms.push(+document.getElementById('graph').getAttribute('data-draw-ms')); }
            return ms.sort((a, b) => a - b)[2]; }""")
        print(f"graph redraw median {draws:.1f} ms")
        assert draws < 100
        # from the slider's event to the new graph painted (no server call): the median of 5 moves, ≤ 100 ms
        redraws = [page.evaluate("""async (v) => { const el = document.getElementById('threshold');
            el.value = String(v); el.dispatchEvent(new Event('input')); return await window.lmscope.lastRedraw; }""", v)
                   for v in (0.02, 0.05, 0.08, 0.03, 0.01)]
        print(f"threshold move to repaint: median {sorted(redraws)[2]:.1f} ms of {redraws}")
        assert sorted(redraws)[2] <= 100
        # node clicks: the panel's data from the graph's forward (no new forward on the server), drawn in ≤ 100 ms
        misses = app.memo.misses
        clicks = []
        for sel in ("circle.node.resid", "rect.node.mlp", "circle.node.attn", "circle.node.resid", "rect.node.mlp"):
            k = sum(1 for c in clicks if c[0] == sel)
            page.locator(sel).nth(k + 1).click()
            clicks.append((sel, page.evaluate("window.lmscope.lastClick")))
        ms = sorted(c[1] for c in clicks)
        print(f"node click to panel painted: median {ms[2]:.1f} ms of {[round(c[1], 1) for c in clicks]}")
        assert app.memo.misses == misses and ms[2] <= 100
        # attention-edge clicks (five different edges): every head's share from the graph, the shown head's maps
        # from the layer importances the graph kept with its forward, drawn on canvases: ≤ 100 ms (median)
        attn = page.evaluate("""() => window.lmscope.edges.map((e, k) => [e, k]).filter(([e]) => e.kind === 'attn')
            .map(([e, k]) => [k, e.target]).filter(([, t], i, all) => all.findIndex(([, u]) => u === t) === i)""")
        assert len(attn) >= 5
        edge_ms = []
        for k, _ in attn[:5]:
            page.locator(f"path[data-edge='{k}']").dispatch_event("click")  # the click event itself (curves)
            edge_ms.append(page.evaluate("window.lmscope.lastClick"))
            assert page.locator("#head-detail canvas.heatmap").count() == 2
        print(f"attention edge click to panel painted: median {sorted(edge_ms)[2]:.1f} ms of "
              f"{[round(x, 1) for x in edge_ms]}")
        assert app.memo.misses == misses and sorted(edge_ms)[2] <= 100
        img = _png(page, "button.png[data-png='graph-wrap']", (200, 200))  # the graph view as a PNG
        box = page.eval_on_selector("#graph", "e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height]")
        assert img.width >= 2 * box[0] - 2 and img.height >= 2 * box[1] - 2
        _png(page, "button.png[data-png='inspector']")
        # another position by clicking its token
        page.click("text.token[data-position='5']")
        at5 = flow(tiny_llama, P, position=5, threshold=0.01, contributions=c)
        assert int(page.get_attribute("#graph", "data-edges")) == len(at5.meta["edges"])
        # verify in place: the number the library computes for this graph
        page.click("#verify")
        page.wait_for_selector("#verify-out[data-faithfulness]")
        lib = specs.run_json(tiny_llama, "flow-verify", P, {"threshold": 0.01, "position": 5})
        assert float(page.get_attribute("#verify-out", "data-faithfulness")) == pytest.approx(float(lib.values[3]),
                                                                                                abs=1e-6)
        # the graph exports its Result JSON: the library's flow-graph Result
        with page.expect_download() as dl:
            page.click("#graph-export")
        exported = json.loads(Path(dl.value.path()).read_text())
        assert _plain(exported) == json.loads(json.dumps(_plain(specs.run_json(tiny_llama, "flow-graph", P).to_dict())))
        # an attention edge: head shares, attention map and contribution map, promoted tokens
        page.locator("path.edge.attn").first.click()
        page.wait_for_selector("#head-detail[data-head]")
        assert page.locator("#head-detail canvas.heatmap").count() == 2
        assert "promotes" in page.inner_text("#head-detail")
        # the maps are the library's: hover the edge's cell of each map and read its value
        sel = page.evaluate("window.lmscope.selected.edge")
        (layer, i), j = map(int, sel["target"][1:].split("_")), int(sel["source"].split("_")[1])
        head = int(page.get_attribute("#head-detail", "data-head"))
        lib = specs.run_json(tiny_llama, "flow-node", P, {"component": "attn_heads", "layer": layer, "position": i,
                                                          "head": head})
        assert head == max(range(len(sel["heads"])), key=lambda h: sel["heads"][h])  # the largest share first
        for n, want in enumerate((lib.extras["pattern"][0, i, j], lib.values[0, i, j])):
            canvas = page.locator("#head-detail canvas.heatmap").nth(n)
            cell, left, top = (int(canvas.get_attribute(f"data-{k}")) for k in ("cell", "left", "top"))
            canvas.hover(position={"x": left + j * cell + cell / 2, "y": top + i * cell + cell / 2})
            assert canvas.get_attribute("data-hover") == f"{i},{j}"
            assert canvas.get_attribute("title").endswith(f": {float(want):.4f}")
        assert f"{lib.meta['promotes'][0][0][0]!r}"[1:-1] in page.inner_text("#head-detail")
        page.screenshot(path=str(shots / "app-head.png"))
        # an FFN node: its neurons
        page.locator("rect.node.mlp").first.click()
        page.wait_for_selector("#neurons tr:nth-child(2)")
        shared = page.url
        # two prompts: the patching heat map is the library's, a clicked cell shows its value and causal cone
        page.click("button.tab[data-tab='pairs']")
        page.fill("#corrupt", P.replace("John gave", "Mary gave"))
        page.fill("#pair-target", "Mary")
        page.fill("#pair-foil", "John")
        page.click("#pair-run")
        page.wait_for_selector("#pair-output svg.heatmap")
        lib = specs.run_json(tiny_llama, "patch", [{"clean": P, "corrupt": P.replace("John gave", "Mary gave"),
                                                     "target": "Mary", "foil": "John"}], {"site": "resid_pre"})
        assert page.locator("#pair-output rect.heat-cell").count() == lib.values.numel()
        page.click("#pair-output rect[data-i='1'][data-j='8']")
        assert float(page.get_attribute("#pair-cell", "data-value")) == pytest.approx(float(lib.values[1, 8]), abs=1e-6)
        assert page.locator("#pair-output rect.cone").count() == (lib.shape[0] - 1) * (lib.shape[1] - 8) - 1
        page.screenshot(path=str(shots / "app-pairs.png"))
        _png(page, "button.png[data-png='pair-output']", (200, 100))
        # attribution of every method side by side; DLA by layer, head and neuron
        page.click("button.tab[data-tab='attribution']")
        page.fill("#attr-target", "Mary")
        page.click("#attr-run")
        n_methods = len(specs.get("attribute").config.__dataclass_fields__["method"].metadata["choices"])
        page.wait_for_function(f"document.querySelectorAll('#attr-output .attr-row').length === {n_methods}",
                               timeout=120_000)
        _png(page, "button.png[data-png='attr-output']", (200, 60))
        page.click("button.tab[data-tab='dla']")
        page.fill("#dla-target", "Mary")
        page.fill("#dla-foil", "John")
        page.click("#dla-run")
        page.wait_for_selector("#dla-output div[data-by='neuron'] svg")
        assert page.locator("#dla-output svg").count() == 3
        _png(page, "button.png[data-png='dla-output']", (200, 100))
        page.click("button.tab[data-tab='graph']")
        # the URL restores the view
        page2 = browser.new_page(viewport={"width": 1400, "height": 900})
        page2.goto(shared)
        page2.wait_for_selector("body[data-ready='1']")
        page2.wait_for_selector("#neurons tr:nth-child(2)")
        assert page2.input_value("#prompt") == P and page2.input_value("#threshold") == "0.01"
        assert page2.get_attribute("#graph", "data-edges") == str(len(at5.meta["edges"]))
        browser.close()
    assert not errors, errors


def test_new_views_in_a_real_browser(served, tiny_llama, sae_root):
    """Pin and group nodes and verify the pinned ones; the head inspector from an attention edge; the SAE view;
    steering next to the unsteered text; drag-to-patch with its causal cone; a shared URL restores pins,
    groups and the head view. Every number shown is the library's."""
    pw, exe = _browser()
    app, url = served
    shots = Path(__file__).parent / "screenshots"
    shots.mkdir(exist_ok=True)
    corrupt = P.replace("John gave", "Mary gave")
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page, errors = _graph_page(browser, url)
        # pin two blocks by shift-click, group them, pin one more; the verify of the pinned nodes is the library's
        n0 = int(page.get_attribute("#graph", "data-nodes"))
        page.locator("rect.node.mlp").first.click(modifiers=["Shift"])
        page.locator("circle.node.attn").first.click(modifiers=["Shift"])
        pins = page.evaluate("[...window.lmscope.pinned]")
        assert len(pins) == 2 and page.locator(".node.pinned").count() == 2
        page.fill("#group-name", "my group")
        page.click("#group-add")
        assert page.locator("rect.group").count() == 1 and "my group" in page.inner_text("#group-list")
        page.locator("rect.node.mlp").nth(1).click(modifiers=["Shift"])
        kept = page.evaluate("[...window.lmscope.pinned]")
        # a pinned node stays drawn when the threshold hides the rest of its route
        page.eval_on_selector("#threshold", "el => { el.value = '0.1'; el.dispatchEvent(new Event('input')); }")
        assert page.locator(f"[data-node='{kept[0]}']").count() == 1 and n0 > 0
        page.check("#verify-pinned")
        page.click("#verify")
        page.wait_for_selector("#verify-out[data-faithfulness]")
        lib = specs.run_json(tiny_llama, "flow-verify", P, {"threshold": 0.1, "position": 12, "nodes": kept[0]})
        assert float(page.get_attribute("#verify-out", "data-faithfulness")) == pytest.approx(float(lib.values[3]),
                                                                                                abs=1e-6)
        # an attention edge -> its head in the inspector: pattern and QK maps, the write's tokens
        page.eval_on_selector("#threshold", "el => { el.value = '0.04'; el.dispatchEvent(new Event('input')); }")
        page.locator("path.edge.attn").first.click()
        page.wait_for_selector("#head-detail[data-head]")
        head = int(page.get_attribute("#head-detail", "data-head"))
        page.click("#open-head")
        page.wait_for_selector("#head-output[data-done]")
        layer = int(page.input_value("#head-layer"))
        lib = specs.run_json(tiny_llama, "head-inspect", P, {"layer": layer, "head": head, "position": 12})
        assert page.get_attribute("#head-output", "data-done") == f"{layer}.{head}"
        assert page.locator("#head-output svg.heatmap").count() == 2
        assert f"{lib.meta['write']['promotes'][0][0]!r}"[1:-1] in page.inner_text("#head-write")
        page.screenshot(path=str(shots / "app-head-inspector.png"))
        _png(page, "button.png[data-png='head-output']", (200, 150))
        shared = page.url
        # the SAE view on the attention-output SAE: its latents, activations and per-head bars
        page.click("button.tab[data-tab='sae']")
        assert page.eval_on_selector_all("#sae-folder option", "os => os.map(o => o.value)") == ["heads/z", "resid"]
        page.select_option("#sae-folder", "heads/z")
        page.fill("#sae-latents", "3")
        page.click("#sae-run")
        page.wait_for_selector("#sae-output[data-done]")
        lib = specs.run_json(tiny_llama, "sae-prompt", {"saes": str(sae_root / "heads/z")},
                             {"prompt": P, "latents": 3, "contexts": 0, "position": 12})
        rows = page.eval_on_selector_all("#sae-table tr[data-latent]", "rs => rs.map(r => +r.dataset.latent)")
        assert rows == [int(x) for x in lib.axes[0].labels]
        assert page.locator("#sae-table .bar-row").count() == 3 * tiny_llama.spec.n_heads
        page.screenshot(path=str(shots / "app-sae.png"))
        _png(page, "button.png[data-png='sae-output']", (200, 60))
        # steering: the unsteered text once, then one row per scale, each the library's text
        page.click("button.tab[data-tab='steer']")
        for sel, val in (("#steer-pos", "yes"), ("#steer-neg", "no"), ("#steer-layer", "1"), ("#steer-scales", "2,8"),
                         ("#steer-tokens", "4")):
            page.fill(sel, val)
        page.click("#steer-run")
        page.wait_for_selector("#steer-output[data-done='2']")
        texts = page.eval_on_selector_all("#steer-table td.gen", "ts => ts.map(t => t.textContent)")
        want = [specs.run_json(tiny_llama, "steer", P, {"positive": "yes", "negative": "no", "layer": 1, "scale": sc,
                                                         "max_new_tokens": 4}).meta["texts"] for sc in (2.0, 8.0)]
        assert texts == [want[0][0], want[0][1], want[1][1]]
        _png(page, "button.png[data-png='steer-output']", (150, 40))
        # two prompts: drag a clean token onto a corrupted one; the effect is the library's, the cone shaded
        page.click("button.tab[data-tab='pairs']")
        page.fill("#corrupt", corrupt)
        page.fill("#pair-target", "Mary")
        page.fill("#pair-foil", "John")
        page.click("#pair-run")
        page.wait_for_selector("#drag-rows .drag-row[data-side='corrupt'] .drag-tok")
        page.click("#pair-output rect[data-i='1'][data-j='8']")  # sets the drag layer to 1
        assert page.input_value("#drag-layer") == "1"
        page.drag_and_drop("#drag-rows [data-side='clean'] [data-pos='8']", "#drag-rows [data-side='corrupt'] [data-pos='8']")
        page.wait_for_selector("#drag-out[data-effect]")
        cell = specs.run_json(tiny_llama, "patch-cell", [{"clean": P, "corrupt": corrupt, "target": "Mary",
                                                           "foil": "John"}], {"layer": 1, "position": 8})
        assert float(page.get_attribute("#drag-out", "data-effect")) == pytest.approx(cell.meta["effect"], abs=1e-6)
        n_layers, t = cell.shape
        assert page.locator("#drag-out rect.cone").count() == (n_layers - 1) * (t - 8)
        page.screenshot(path=str(shots / "app-drag-patch.png"))
        _png(page, "button.png[data-png='drag-out']", (150, 100))
        # the shared URL (taken in the head inspector) restores pins, the group and the head view
        page2 = browser.new_page(viewport={"width": 1400, "height": 900})
        page2.goto(shared)
        page2.wait_for_selector("body[data-ready='1']")
        assert sorted(page2.evaluate("[...window.lmscope.pinned]")) == sorted(kept)
        assert page2.locator("rect.group").count() == 1 and page2.is_checked("#verify-pinned")
        assert page2.get_attribute("#head-output", "data-done") == f"{layer}.{head}"
        assert page2.is_visible("#tab-head") and not page2.is_visible("#tab-graph")
        browser.close()
    assert not errors, errors


def test_progress_of_a_long_job_in_a_real_browser(served, monkeypatch):
    """A call that runs past 400 ms shows its progress (the library's bar from the server's job status, its
    running time) until it answers; the methods view's result then exports as a PNG."""
    import io
    import threading

    from tqdm import tqdm

    import lmscope.app.server as server_mod

    pw, exe = _browser()
    app, url = served
    go = threading.Event()
    real = specs.run_json

    def slow(model, method, inputs, config):
        if method == "lens":
            with tqdm(total=10, desc="test bar", file=io.StringIO()) as bar:
                bar.update(3)
                go.wait(60)
        return real(model, method, inputs, config)

    monkeypatch.setattr(server_mod.specs, "run_json", slow)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page, errors = _graph_page(browser, url)
        try:
            page.click("button.tab[data-tab='methods']")
            page.select_option("#method-select", "lens")
            page.click("#method-run")
            page.wait_for_selector("#progress[data-state='running']", timeout=30_000)
            page.wait_for_function("document.getElementById('progress-text').textContent.includes('test bar 3/10')")
            assert "lens: running" in page.inner_text("#progress-text") and page.is_visible("#progress")
            assert page.get_attribute("#progress-bar", "value") == "3"
        finally:
            go.set()
        page.wait_for_selector("#method-output .result")
        assert page.is_hidden("#progress")
        _png(page, "button.png[data-png='method-output']", (100, 60))
        browser.close()
    assert not errors, errors


def test_a_result_in_a_notebook_is_drawn_by_the_apps_renderer(tiny_llama, tmp_path):
    """result_html: the Result JSON and views.js inlined; in a browser (offline, from a file) it draws the same
    heat map the app draws for that Result, and a 1-D Result as bars."""
    from lmscope.app import result_html, show

    patch = specs.run_json(tiny_llama, "patch", [{"clean": P, "corrupt": P.replace("John gave", "Mary gave"),
                                                   "target": "Mary", "foil": "John"}], {"site": "resid_pre"})
    lens = specs.run_json(tiny_llama, "flow-node", P, {"component": "resid_post", "layer": 1, "k": 4})
    page_html = "<html><body>" + result_html(patch) + result_html(lens.to_dict()) + "</body></html>"
    assert "LmViews" in page_html and page_html.count('class="lmscope-result"') == 2
    with pytest.raises(InputError, match="Result"):
        result_html(3)
    try:
        import IPython  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="IPython"):
            show(patch)
    pw, exe = _browser()
    (tmp_path / "nb.html").write_text(page_html)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "nb.html").as_uri())
        first, second = page.locator(".lmscope-result").nth(0), page.locator(".lmscope-result").nth(1)
        assert first.locator("rect.heat-cell").count() == patch.values.numel()
        assert second.locator(".bar-row").count() == 4
        browser.close()
    assert not errors, errors
