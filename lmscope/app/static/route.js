// The route of lmscope.localization.flow.route, run in the browser so that the threshold slider and a
// click on another position need no new forward. Same steps: from I{L-1}_p down, each reached node keeps
// its incoming edges with weight > threshold, renormalised to sum to 1; a kept MLP edge brings A->M (1).
(function (root) {
  "use strict";
  function nodeId(comp, layer, pos) {
    if (comp === "embed") return "X0_" + pos;
    return { attn: "A", mlp: "M", resid: "I" }[comp] + layer + "_" + pos;
  }
  function parseNode(id) {
    const comp = { X: "embed", A: "attn", M: "mlp", I: "resid" }[id[0]];
    const [layer, pos] = id.slice(1).split("_").map(Number);
    return { comp, layer: comp === "embed" ? -1 : layer, pos };
  }
  function indexEdges(edges) {
    const incoming = new Map();
    for (const e of edges) {
      if (!incoming.has(e.target)) incoming.set(e.target, []);
      incoming.get(e.target).push(e);
    }
    return incoming;
  }
  function round6(x) { return Math.round(x * 1e6) / 1e6; }
  function route(incoming, nLayers, position, threshold, renormalize = true) {
    const start = nodeId("resid", nLayers - 1, position);
    const reached = new Set([start]);
    const frontier = [start];
    const out = [];
    for (let q = 0; q < frontier.length; q++) {
      const id = frontier[q];
      const n = parseNode(id);
      let kept;
      if (n.comp === "mlp") {
        kept = [{ source: nodeId("attn", n.layer, n.pos), target: id, weight: 1.0, kind: "mlp" }];
      } else {
        kept = (incoming.get(id) || []).filter((e) => e.weight > threshold).map((e) => Object.assign({}, e));
        let total = 0;
        for (const e of kept) total += e.weight;
        for (const e of kept) {
          const w = renormalize ? e.weight / total : e.weight;
          if (e.heads) e.heads = e.heads.map((x) => round6((x * w) / e.weight));
          e.weight = w;
        }
      }
      for (const e of kept) {
        out.push(e);
        if (!reached.has(e.source)) { reached.add(e.source); frontier.push(e.source); }
      }
    }
    return out;
  }
  const api = { nodeId, parseNode, indexEdges, route };
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  else root.LmRoute = api;
})(typeof window !== "undefined" ? window : globalThis);
