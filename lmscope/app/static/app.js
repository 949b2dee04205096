// lmscope app: the contribution graph (LLM Transparency Tool view), its node inspector, every method.
(function () {
  "use strict";
  const V = window.LmViews, R = window.LmRoute;
  const $ = (id) => document.getElementById(id);
  const state = { prompt: "", threshold: 0.04, position: null, target: null, tab: "graph", graph: null,
    incoming: null, info: null, selected: null, pinned: new Set(), groups: [], views: {} };
  window.lmscope = state;  // for tests and the console

  const { api, painted } = window.LmApi($);
  state.api = api;

  // ------------------------------------------------------------------ URL state: the whole view, shareable
  // (prompt, threshold, position, target, tab, selected node, pinned nodes, groups, every input marked
  // data-url, and which views were shown: those run again when the URL is opened)
  function saveUrl() {
    const p = new URLSearchParams({ prompt: state.prompt, threshold: state.threshold, tab: state.tab });
    if (state.position !== null) p.set("position", state.position);
    if (state.target !== null) p.set("target", state.target);
    if (state.selected) p.set("node", state.selected.key);
    if (state.pinned.size) p.set("pins", [...state.pinned].join(","));
    if (state.groups.length) p.set("groups", JSON.stringify(state.groups));
    const shown = Object.keys(state.views).filter((k) => state.views[k]);
    if (shown.length) p.set("views", shown.join(","));
    document.querySelectorAll("[data-url]").forEach((el) => {
      const v = el.type === "checkbox" ? (el.checked ? "1" : "") : el.value;
      if (v !== (el.type === "checkbox" ? (el.defaultChecked ? "1" : "") : el.defaultValue)) p.set(el.dataset.url, v);
    });
    history.replaceState(null, "", "#" + p.toString());
  }
  function loadUrl() {
    const p = new URLSearchParams(location.hash.slice(1));
    if (p.get("prompt")) $("prompt").value = p.get("prompt");
    if (p.get("threshold")) state.threshold = +p.get("threshold");
    if (p.get("position") !== null) state.position = +p.get("position");
    if (p.get("target") !== null) state.target = p.get("target");
    if (p.get("pins")) p.get("pins").split(",").forEach((x) => state.pinned.add(x));
    if (p.get("groups")) { try { state.groups = JSON.parse(p.get("groups")); } catch (err) { state.groups = []; } }
    if (p.get("views")) p.get("views").split(",").forEach((k) => { state.views[k] = true; });
    document.querySelectorAll("[data-url]").forEach((el) => {
      const v = p.get(el.dataset.url);
      if (v === null) return;
      if (el.type === "checkbox") el.checked = v === "1";
      else { el.value = v; el.dataset.want = v; }
    });
    state.tab = p.get("tab") || "graph";
    return p.get("node");
  }

  // ------------------------------------------------------------------ graph
  async function runGraph() {
    state.prompt = $("prompt").value;
    state.graph = await api("flow-graph", state.prompt, {});
    state.incoming = R.indexEdges(state.graph.meta.edges);
    const t = state.graph.meta.tokens.length;
    if (state.position === null || state.position >= t) state.position = t - 1;
    drawGraph();
  }

  function layout() {
    const g = state.graph.meta, T = g.tokens.length, L = g.n_layers;
    const colW = Math.max(48, Math.min(110, Math.floor(($("graph-wrap").clientWidth - 60) / T)));
    const rowH = 22, top = 30, left = 50;
    const height = top + (2 * L + 1) * rowH + 40;
    const x = (pos) => left + pos * colW + colW / 2;
    const y = (comp, layer) => {
      if (comp === "embed") return height - 40;
      const base = height - 40 - (2 * layer + 1) * rowH;
      return comp === "attn" ? base : comp === "resid" ? base - rowH : base - rowH / 2;
    };
    const pos = (id) => {
      const n = R.parseNode(id);
      return { x: x(n.pos) + (n.comp === "mlp" ? colW * 0.3 : 0), y: y(n.comp, n.layer), n };
    };
    return { T, L, colW, rowH, height, width: left + T * colW + 20, x, y, pos };
  }

  const esc = V.esc;

  function drawGraph() {  // one markup string and one delegated click handler: fast for ~1000 edges
    const t0 = performance.now();
    const g = state.graph.meta, lay = layout(), svg = $("graph");
    const edges = R.route(state.incoming, g.n_layers, state.position, state.threshold);
    state.edges = edges;
    const parts = [];
    for (let l = 0; l < lay.L; l++) parts.push(`<text x="4" y="${lay.y("resid", l) + 4}" class="layer-label">L${l}</text>`);
    const nodes = new Set([R.nodeId("resid", g.n_layers - 1, state.position)]);
    edges.forEach((e, k) => {
      const a = lay.pos(e.source), b = lay.pos(e.target);
      nodes.add(e.source); nodes.add(e.target);
      const d = e.kind === "attn"
        ? `M${a.x},${a.y} C${a.x},${(a.y + b.y) / 2} ${b.x},${(a.y + b.y) / 2} ${b.x},${b.y}`
        : `M${a.x},${a.y} L${b.x},${b.y}`;
      parts.push(`<path d="${d}" class="edge ${e.kind}" stroke-width="${(0.8 + 6 * e.weight).toFixed(2)}" ` +
        `stroke-opacity="${(0.35 + 0.65 * e.weight).toFixed(2)}" data-edge="${k}"><title>${e.source} → ${e.target} ` +
        `(${e.kind}) ${e.weight.toFixed(3)}</title></path>`);
    });
    const sel = state.selected ? state.selected.key : null;
    const T = g.tokens.length, L = g.n_layers;
    const kept = [...state.pinned, ...state.groups.flatMap((grp) => grp.nodes)];
    for (const id of kept) {  // pinned and grouped nodes stay on the graph whatever the threshold
      const n = R.parseNode(id);
      if (n.comp && n.pos >= 0 && n.pos < T && n.layer < L) nodes.add(id);
    }
    state.groups.forEach((grp, gi) => {  // a dashed box around each group's nodes
      const pts = grp.nodes.filter((id) => nodes.has(id)).map((id) => lay.pos(id));
      if (!pts.length) return;
      const x0 = Math.min(...pts.map((q) => q.x)) - 9, x1 = Math.max(...pts.map((q) => q.x)) + 9;
      const y0 = Math.min(...pts.map((q) => q.y)) - 9, y1 = Math.max(...pts.map((q) => q.y)) + 9;
      parts.push(`<rect x="${x0}" y="${y0}" width="${x1 - x0}" height="${y1 - y0}" class="group" data-group="${gi}"></rect>` +
        `<text x="${x0}" y="${y0 - 2}" class="group-label">${esc(grp.name)}</text>`);
    });
    for (const id of nodes) {
      const q = lay.pos(id), comp = q.n.comp, cls = `node ${comp}` + (sel === id ? " selected" : "") +
        (state.pinned.has(id) ? " pinned" : "");
      parts.push(comp === "mlp"
        ? `<rect x="${q.x - 5}" y="${q.y - 5}" width="10" height="10" class="${cls}" data-node="${id}"><title>${id}</title></rect>`
        : `<circle cx="${q.x}" cy="${q.y}" r="${comp === "attn" ? 4 : 5.5}" class="${cls}" data-node="${id}"><title>${id}</title></circle>`);
    }
    g.tokens.forEach((tok, i) => {
      const short = tok.length > 9 ? tok.slice(0, 8) + "…" : tok;
      parts.push(`<text x="${lay.x(i)}" y="${lay.height - 18}" text-anchor="middle" class="token` +
        `${i === state.position ? " selected" : ""}" data-position="${i}">${esc(short)}<title>${i}: ${esc(tok)}</title></text>`);
    });
    svg.setAttribute("width", lay.width);
    svg.setAttribute("height", lay.height);
    svg.innerHTML = parts.join("");
    drawPredictions();
    $("verify-out").textContent = "";
    $("verify-out").removeAttribute("data-faithfulness");
    drawPins();
    const ms = performance.now() - t0;
    $("graph-stats").textContent = `${nodes.size} nodes, ${edges.length} edges, drawn in ${ms.toFixed(0)} ms`;
    svg.setAttribute("data-edges", edges.length);
    svg.setAttribute("data-nodes", nodes.size);
    svg.setAttribute("data-draw-ms", ms.toFixed(1));
    saveUrl();
  }

  function drawPins() {
    $("pin-count").textContent = `${state.pinned.size} pinned`;
    const box = $("group-list");
    box.innerHTML = "";
    state.groups.forEach((grp, gi) => {
      const s = V.html("span", { class: "group-chip", title: grp.nodes.join(", ") }, `${grp.name} (${grp.nodes.length}) ×`, box);
      s.addEventListener("click", () => { state.groups.splice(gi, 1); drawGraph(); });
    });
  }

  function togglePin(id) {
    if (state.pinned.has(id)) state.pinned.delete(id); else state.pinned.add(id);
    drawGraph();
  }

  function onGraphClick(ev) {
    const t = ev.target.closest("[data-edge],[data-node],[data-position]");
    if (!t) return;
    if (ev.shiftKey && t.dataset.node !== undefined) { togglePin(t.dataset.node); return; }
    let drawn = null;
    if (t.dataset.edge !== undefined) {
      const e = state.edges[+t.dataset.edge];
      if (e.kind === "attn") drawn = selectEdge(e);
    } else if (t.dataset.node !== undefined) drawn = selectNode(t.dataset.node);
    else { state.position = +t.dataset.position; state.target = null; drawGraph(); }
    if (drawn) {  // from the click to the panel painted (its data from the server, which runs no new forward)
      state.lastClick = drawn.then(painted).then(() => {
        const ms = performance.now() - ev.timeStamp;
        $("inspector").setAttribute("data-click-ms", ms.toFixed(1));
        return ms;
      });
    }
  }

  function drawPredictions() {
    const box = $("predictions");
    box.innerHTML = "";
    V.html("span", {}, `prediction at ${state.position} (“${state.graph.meta.tokens[state.position]}”): `, box);
    state.graph.meta.predictions[state.position].forEach(([tok, p]) => {
      const s = V.html("span", { class: "pred" + (state.target === tok ? " selected" : "") }, `${tok} ${(100 * p).toFixed(1)}%`, box);
      s.addEventListener("click", () => { state.target = state.target === tok ? null : tok; drawPredictions(); saveUrl();
        if (state.selected && state.selected.kind === "state") selectNode(state.selected.key); });
    });
  }

  async function verify() {
    const out = $("verify-out");
    out.textContent = "…";
    const inputs = state.target === null ? state.prompt : { prompt: state.prompt, target: state.target };
    const config = { threshold: state.threshold, position: state.position };
    if ($("verify-corrupt").checked) config.corrupt = $("corrupt").value;
    if ($("verify-pinned").checked) {
      const blocks = [...state.pinned].filter((id) => id[0] === "A" || id[0] === "M");
      if (!blocks.length) { out.textContent = "pin attention or FFN nodes first (shift-click)"; return; }
      config.nodes = blocks.join(",");
    }
    let res;
    try { res = await api("flow-verify", inputs, config); } catch (err) { out.textContent = err.message; return; }
    const [clean, graph, none, faith] = res.values;
    out.textContent = `faithfulness ${faith === null ? "—" : faith.toFixed(3)} (${res.meta.metric} of ${JSON.stringify(res.target.target)}: ` +
      `clean ${clean.toFixed(2)}, ${config.nodes ? "pinned" : "graph"} only ${graph.toFixed(2)}, nothing ${none.toFixed(2)}; ` +
      `${(100 * res.meta.kept_fraction).toFixed(1)}% of blocks kept)`;
    out.setAttribute("data-faithfulness", faith);
  }

  // ------------------------------------------------------------------ inspector
  function pinButton(box, id) {
    const b = V.html("button", { class: "pin" }, state.pinned.has(id) ? "unpin" : "pin (shift-click)", box);
    b.addEventListener("click", () => { togglePin(id); b.textContent = state.pinned.has(id) ? "unpin" : "pin (shift-click)"; });
  }
  function inspector(title) {
    const box = $("inspector");
    box.innerHTML = "";
    V.html("h3", {}, title, box);
    return box;
  }
  function tokenList(box, title, rows, cls) {
    V.html("div", {}, title, box);
    const p = V.html("div", { class: cls }, null, box);
    p.textContent = rows.map(([t, v]) => `${JSON.stringify(t)} ${v.toFixed(2)}`).join("  ");
  }

  async function selectEdge(e) {
    const tgt = R.parseNode(e.target), src = R.parseNode(e.source);
    const key = `${e.source}->${e.target}`;
    state.selected = { key, kind: "edge", edge: e };
    const box = inspector(`Attention edge ${src.pos} → ${tgt.pos} into layer ${tgt.layer}`);
    const shares = e.heads.map((h) => h / e.weight);  // every head's share: from the graph, no call
    let head = shares.indexOf(Math.max(...shares));
    V.html("div", {}, "each head's share of the edge (click a head):", box);
    const barBox = V.html("div", { id: "head-shares" }, null, box);
    const detail = V.html("div", { id: "head-detail" }, null, box);
    // a head's maps and tokens when it is shown (flow-node with head: the layer's importances the graph kept
    // with its forward, one head's data), each head asked for once
    const asked = {};
    const headResult = (h) => asked[h] || (asked[h] = api("flow-node", state.prompt,
      { component: "attn_heads", layer: tgt.layer, position: tgt.pos, head: h }));
    async function show() {
      const h = head;
      barBox.innerHTML = "";
      barBox.appendChild(V.bars(shares, shares.map((_, k) => `head ${k}`), { selected: h,
        onclick: (k) => { head = k; show().catch((err) => { detail.textContent = err.message; }); } }));
      const res = await headResult(h);
      if (head !== h || !state.selected || state.selected.key !== key) return;  // another head or edge since
      const t0 = performance.now();
      detail.innerHTML = "";
      const labels = res.meta.tokens.map((t, i) => `${i}:${t}`);
      const maps = V.html("div", { class: "maps" }, null, detail);
      maps.appendChild(V.heatCanvas(res.extras.pattern.values[0], labels, labels, { title: `attention, L${tgt.layer} H${h}`, cell: 12 }));
      maps.appendChild(V.heatCanvas(res.values[0], labels, labels, { title: `contribution, L${tgt.layer} H${h}`, cell: 12 }));
      tokenList(detail, `head ${h}'s write at ${tgt.pos} promotes:`, res.meta.promotes[0], "tok-pos");
      tokenList(detail, "and suppresses:", res.meta.suppresses[0], "tok-neg");
      const open = V.html("button", { id: "open-head" }, `open L${tgt.layer} H${h} in the head inspector`, detail);
      open.addEventListener("click", () => {
        $("head-layer").value = tgt.layer; $("head-index").value = h;
        showTab("head"); tabs.headRun();
      });
      detail.setAttribute("data-head", h);
      detail.setAttribute("data-draw-ms", (performance.now() - t0).toFixed(1));
    }
    saveUrl();
    await show();
  }

  async function selectNode(id) {
    const n = R.parseNode(id);
    state.selected = { key: id, kind: n.comp === "mlp" ? "mlp" : "state" };
    document.querySelectorAll(".node.selected").forEach((x) => x.classList.remove("selected"));
    const shape = document.querySelector(`[data-node="${id}"]`);
    if (shape) shape.classList.add("selected");
    saveUrl();
    if (n.comp === "mlp") {
      const box = inspector(`FFN of layer ${n.layer} at ${n.pos}`);
    pinButton(box, id);
      const res = await api("flow-node", state.prompt, { component: "mlp_neurons", layer: n.layer, position: n.pos });
      const tab = V.html("table", { class: "small", id: "neurons" }, null, box);
      tab.innerHTML = "<tr><th>neuron</th><th>share</th><th>act.</th><th>promotes</th><th>suppresses</th></tr>";
      res.axes[0].labels.forEach((lab, i) => {
        const tr = V.html("tr", {}, null, tab);
        V.html("td", {}, lab, tr); V.html("td", {}, res.values[i].toFixed(3), tr);
        V.html("td", {}, res.extras.activation.values[i].toFixed(2), tr);
        V.html("td", { class: "tok-pos" }, res.meta.promotes[i].slice(0, 4).map((x) => x[0]).join(" "), tr);
        V.html("td", { class: "tok-neg" }, res.meta.suppresses[i].slice(0, 4).map((x) => x[0]).join(" "), tr);
      });
      return;
    }
    const comp = n.comp === "embed" ? "embed" : n.comp === "attn" ? "resid_mid" : "resid_post";
    const what = { embed: "embedding", resid_mid: "residual after attention", resid_post: "residual after FFN" }[comp];
    const box = inspector(`Logit lens: ${what}, layer ${Math.max(n.layer, 0)} at ${n.pos}`);
    pinButton(box, id);
    const inputs = state.target === null ? state.prompt : { prompt: state.prompt, target: state.target };
    const res = await api("flow-node", inputs, { component: comp, layer: Math.max(n.layer, 0), position: n.pos });
    const tab = V.html("table", { class: "small", id: "lens" }, null, box);
    tab.innerHTML = "<tr><th>token</th><th>prob</th><th>rank</th><th>change</th></tr>";
    res.meta.top_tokens.forEach((tok, i) => {
      const tr = V.html("tr", {}, null, tab);
      const rank = +res.axes[0].labels[i], before = res.extras.rank_before.values[i];
      V.html("td", {}, JSON.stringify(tok), tr); V.html("td", {}, res.values[i].toFixed(3), tr);
      V.html("td", {}, rank, tr);
      V.html("td", { class: before > rank ? "tok-pos" : before < rank ? "tok-neg" : "" },
        before === rank ? "=" : (before > rank ? "▲" : "▼") + Math.abs(before - rank), tr);
    });
    if (res.meta.target) {
      const t = res.meta.target;
      V.html("p", {}, `target ${JSON.stringify(t.token)}: p=${t.prob.toFixed(3)}, rank ${t.rank_before} → ${t.rank}`, box);
    }
  }

  // ------------------------------------------------------------------ methods tab
  function methodsTab() {
    const form = $("method-form");
    if (form.childNodes.length) return;
    const methods = state.info.methods.filter((m) => m.input_kind === "prompt" || m.input_kind === "none");
    const sel = V.html("select", { id: "method-select" }, null, form);
    methods.forEach((m) => V.html("option", { value: m.name }, `${m.name} — ${m.summary.slice(0, 70)}`, sel));
    const fields = V.html("div", {}, null, form);
    const tgt = V.html("div", { class: "method-field" }, null, form);
    V.html("label", {}, "target / foil", tgt);
    const target = V.html("input", { id: "method-target", size: 8 }, null, tgt);
    const foil = V.html("input", { id: "method-foil", size: 8 }, null, tgt);
    const go = V.html("button", { id: "method-run" }, "Run", form);
    function showFields() {
      fields.innerHTML = "";
      const m = methods.find((x) => x.name === sel.value);
      m.fields.forEach((f) => {
        const d = V.html("div", { class: "method-field" }, null, fields);
        V.html("label", { title: f.help }, f.name, d);
        const inp = V.html("input", { "data-field": f.name, "data-type": f.type, value: f.default === null ? "" : f.default }, null, d);
        V.html("span", { class: "hint" }, " " + f.help, d);
        inp.size = 12;
      });
    }
    sel.addEventListener("change", showFields);
    showFields();
    go.addEventListener("click", async () => {
      const m = methods.find((x) => x.name === sel.value), config = {};
      fields.querySelectorAll("input").forEach((inp) => {
        const f = m.fields.find((x) => x.name === inp.dataset.field);
        const raw = inp.value.trim();
        if (raw === "" || raw === String(f.default === null ? "" : f.default)) return;
        config[f.name] = /^-?\d+(\.\d+)?(e-?\d+)?$/.test(raw) ? Number(raw) : raw === "true" ? true : raw === "false" ? false : raw;
      });
      const inputs = m.input_kind === "none" ? null : { prompt: $("prompt").value,
        ...(target.value ? { target: target.value } : {}), ...(foil.value ? { foil: foil.value } : {}) };
      const out = $("method-output");
      out.innerHTML = "";
      try {
        const res = await api(m.name, inputs, config);
        out.appendChild(res.format ? V.result(res) : V.html("pre", {}, JSON.stringify(res).slice(0, 4000)));
      } catch (err) { V.html("p", { class: "error" }, String(err.message), out); }
    });
  }

  async function attributionTab() {
    const m = state.info.methods.find((x) => x.name === "attribute");
    const choices = m.fields.find((f) => f.name === "method").choices;
    const out = $("attr-output");
    out.innerHTML = "";
    const target = $("attr-target").value;
    for (const method of choices) {
      try {
        const res = await api("attribute", target ? { prompt: $("prompt").value, target } : $("prompt").value, { method });
        const tokens = res.axes[res.axes.length - 1].labels.map((l) => l.replace(/^\d+:/, ""));
        const vals = res.axes.length === 1 ? res.values : res.values[res.values.length - 1];
        out.appendChild(V.tokenRow(method, tokens, vals));
      } catch (err) { V.html("p", { class: "error" }, `${method}: ${err.message}`, out); }
    }
    state.views.attribution = true;
    saveUrl();
  }

  async function pairsTab() {
    const out = $("pair-output"), cell = $("pair-cell"), toks = $("pair-tokens");
    out.innerHTML = ""; cell.textContent = ""; toks.innerHTML = "";
    const site = $("pair-site").value;
    const pair = { clean: $("prompt").value, corrupt: $("corrupt").value, target: $("pair-target").value,
      foil: $("pair-foil").value || null };
    let res;
    try { res = await api("patch", [pair], { site }); } catch (err) { V.html("p", { class: "error" }, err.message, out); return; }
    const a = res.axes;
    if (a[1].name === "position") {  // the two prompts side by side, differing tokens marked
      toks.textContent = "positions: " + a[1].labels.join("  ");
      const corrupt = a[1].labels.map((l) => l.replace(/^\d+:/, ""));
      const clean = state.graph && state.graph.meta.prompt === pair.clean ? state.graph.meta.tokens : corrupt;
      state.pairTokens = { clean, corrupt };
      tabs.dragRows();
    }
    const svg = V.heatmap(res.values, a[0].labels, a[1].labels, { title: `patching ${site}: ${res.meta.metric || ""}`,
      onclick: (i, j, v) => {
        svg.querySelectorAll(".heat-cell").forEach((r) => {
          const ri = +r.dataset.i, rj = +r.dataset.j;
          r.classList.toggle("picked", ri === i && rj === j);
          r.classList.toggle("cone", a[1].name === "position" && ri >= i && rj >= j && !(ri === i && rj === j));
        });
        cell.textContent = `patching ${a[0].name} ${a[0].labels[i]}, ${a[1].name} ${a[1].labels[j]} from the clean run: ` +
          (v === null ? "—" : v.toFixed(3));
        cell.setAttribute("data-value", v);
        if (site === "resid_pre") { $("drag-layer").value = i; saveUrl(); }
      } });
    out.appendChild(svg);
    out.appendChild(V.result(res).querySelector("a"));
    state.views.pairs = true;
    saveUrl();
  }

  async function dlaTab() {
    const out = $("dla-output");
    out.innerHTML = "";
    const inputs = { prompt: $("prompt").value, target: $("dla-target").value };
    if ($("dla-foil").value) inputs.foil = $("dla-foil").value;
    for (const by of ["layer", "head", "neuron"]) {
      const box = V.html("div", { "data-by": by }, null, out);
      V.html("h4", {}, `by ${by}`, box);
      try { box.appendChild(V.result(await api("dla", inputs, { by }))); }
      catch (err) { V.html("p", { class: "error" }, err.message, box); }
    }
    state.views.dla = true;
    saveUrl();
  }

  function showTab(tab) {
    state.tab = tab;
    document.querySelectorAll(".tab-body").forEach((s) => { s.hidden = s.id !== `tab-${tab}`; });
    document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
    if (tab === "methods") methodsTab();
    if (tab === "sae") tabs.saeInit();
    saveUrl();
  }

  const tabs = window.LmTabs({ api, state, $, V, saveUrl: () => saveUrl() });

  async function main() {
    const node = loadUrl();
    $("threshold").value = state.threshold;
    $("threshold-value").textContent = state.threshold.toFixed(3);
    state.info = await (await fetch("/api/info")).json();
    $("model-name").textContent = `${state.info.model} (${state.info.n_layers} layers × ${state.info.n_heads} heads)`;
    document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
    $("threshold").addEventListener("input", (ev) => {
      state.threshold = +$("threshold").value;
      $("threshold-value").textContent = state.threshold.toFixed(3);
      if (!state.graph) return;
      drawGraph();  // the route at the new threshold from the graph already here: no call to the server
      state.lastRedraw = painted().then(() => {  // from the slider's event to the new graph painted
        const ms = performance.now() - ev.timeStamp;
        $("graph").setAttribute("data-redraw-ms", ms.toFixed(1));
        return ms;
      });
    });
    document.addEventListener("click", (ev) => {  // every view's PNG button draws its view onto a canvas
      const b = ev.target.closest("button.png");
      if (b) V.savePng($(b.dataset.png), b.dataset.name).catch((err) => { $("status").textContent = `PNG: ${err.message}`; });
    });
    $("run").addEventListener("click", () => { state.position = null; state.selected = null; runGraph(); });
    $("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("run").click(); });
    $("attr-run").addEventListener("click", attributionTab);
    $("verify").addEventListener("click", verify);
    $("graph").addEventListener("click", onGraphClick);
    $("graph-export").addEventListener("click", () => {  // the flow-graph Result as the API returned it
      $("graph-export").href = URL.createObjectURL(new Blob([JSON.stringify(state.graph)], { type: "application/json" }));
    });
    $("graph-svg").addEventListener("click", () => {
      const svg = new XMLSerializer().serializeToString($("graph"));
      $("graph-svg").href = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
    });
    $("pair-run").addEventListener("click", pairsTab);
    $("dla-run").addEventListener("click", dlaTab);
    $("head-run").addEventListener("click", tabs.headRun);
    $("sae-run").addEventListener("click", tabs.saeRun);
    $("steer-run").addEventListener("click", tabs.steerRun);
    $("group-add").addEventListener("click", () => {
      if (!state.pinned.size) return;
      state.groups.push({ name: $("group-name").value || `group ${state.groups.length + 1}`, nodes: [...state.pinned] });
      state.pinned.clear(); $("group-name").value = ""; drawGraph();
    });
    $("pin-clear").addEventListener("click", () => { state.pinned.clear(); drawGraph(); });
    document.querySelectorAll("[data-url]").forEach((el) => el.addEventListener("change", () => saveUrl()));
    tabs.saeInit();
    showTab(state.tab);
    V.heatCanvas([[0]], ["0"], ["0"], { title: "0", cell: 12 });  // the browser sets up 2-D canvases once, now
    await runGraph();
    if (node && !node.includes("->")) await selectNode(node);
    else if (node) {
      const e = state.edges.find((x) => `${x.source}->${x.target}` === node);
      if (e) await selectEdge(e);
    }
    const again = { head: tabs.headRun, sae: tabs.saeRun, steer: tabs.steerRun, pairs: pairsTab, dla: dlaTab,
      attribution: attributionTab };  // views the URL says were shown
    for (const k of Object.keys(again)) if (state.views[k]) await again[k]();
    document.body.setAttribute("data-ready", "1");
  }
  main();
})();
