// lmscope app: the head inspector, SAE features, steering and drag-to-patch views. Each one calls one method
// spec through the API and renders its Result; no method logic here. app.js calls LmTabs(ctx) once.
(function (root) {
  "use strict";
  root.LmTabs = function (ctx) {
    const { api, state, $, V } = ctx;
    const tokenList = (rows) => rows.map(([t, v]) => `${JSON.stringify(t)} ${(+v).toFixed(2)}`).join("  ");
    const inputs = () => state.target === null ? state.prompt || $("prompt").value
      : { prompt: state.prompt || $("prompt").value, target: state.target };

    // ---------------------------------------------------------------- head inspector (head-inspect)
    async function headRun() {
      const out = $("head-output");
      out.innerHTML = "";
      const layer = +$("head-layer").value, head = +$("head-index").value;
      const config = { layer, head };
      if (state.position !== null) config.position = state.position;
      let res;
      try { res = await api("head-inspect", inputs(), config); } catch (err) { V.html("p", { class: "error" }, err.message, out); return; }
      const labels = res.axes[0].labels, pos = res.meta.position;
      V.html("h3", {}, `Head L${res.target.layer} H${res.target.head}, query position ${pos} (“${res.meta.tokens[pos]}”)`, out);
      const maps = V.html("div", { class: "maps" }, null, out);
      maps.appendChild(V.heatmap(res.values, labels, labels, { title: "attention pattern (query × key)", cell: 12 }));
      maps.appendChild(V.heatmap(res.extras.qk.values, labels, labels,
        { title: "QK circuit (weights only)", cell: 12 }));
      const w = V.html("div", { id: "head-write" }, null, out);
      V.html("div", {}, `its write at ${pos} promotes: ${tokenList(res.meta.write.promotes)}`, w).className = "tok-pos";
      V.html("div", {}, `and suppresses: ${tokenList(res.meta.write.suppresses)}`, w).className = "tok-neg";
      V.html("div", {}, `keys the query token “${res.meta.tokens[pos]}” matches best (QK, whole vocabulary): ` +
        tokenList(res.meta.qk_top), out);
      const row = res.values[pos];  // the OV circuit of the tokens this query attends to most
      const order = row.map((v, j) => [v, j]).sort((a, b) => b[0] - a[0]).slice(0, 6);
      const tab = V.html("table", { class: "small", id: "head-ov" }, null, out);
      tab.innerHTML = "<tr><th>source</th><th>attention</th><th>OV promotes</th><th>OV suppresses</th></tr>";
      order.forEach(([a, j]) => {
        const ov = res.meta.ov[res.meta.ov_index[j]], tr = V.html("tr", {}, null, tab);
        V.html("td", {}, labels[j], tr); V.html("td", {}, a.toFixed(3), tr);
        V.html("td", { class: "tok-pos" }, ov.promotes.slice(0, 5).map((x) => JSON.stringify(x[0])).join(" "), tr);
        V.html("td", { class: "tok-neg" }, ov.suppresses.slice(0, 5).map((x) => JSON.stringify(x[0])).join(" "), tr);
      });
      out.appendChild(V.result(res).querySelector("a"));
      out.setAttribute("data-done", `${layer}.${head}`);
      state.views.head = true;
      ctx.saveUrl();
    }

    // ---------------------------------------------------------------- SAE features (sae-prompt)
    function saeInit() {
      const sel = $("sae-folder"), saes = state.info.saes || [];
      const want = sel.dataset.want || sel.value;
      sel.innerHTML = "";
      saes.forEach((f) => V.html("option", { value: f }, f, sel));
      if (saes.includes(want)) sel.value = want;
      $("sae-run").disabled = !saes.length;
      $("sae-hint").textContent = saes.length ? `${saes.length} SAE folder(s) under the app's --sae-dir.`
        : "No SAEs: start the app with --sae-dir DIR (a folder of SAE folders, e.g. from `lmscope sae train`).";
    }
    async function saeRun() {
      const out = $("sae-output");
      out.innerHTML = "";
      const config = { prompt: state.prompt || $("prompt").value, latents: +$("sae-latents").value,
        contexts: +$("sae-contexts").value };
      if (state.position !== null) config.position = state.position;
      let res;
      try { res = await api("sae-prompt", { saes: $("sae-folder").value }, config); }
      catch (err) { V.html("p", { class: "error" }, err.message, out); return; }
      const m = res.meta, pos = m.position;
      V.html("p", {}, `${m.arch} SAE on ${m.site}: ${m.active} of ${m.d_sae} latents active at position ${pos} ` +
        `(“${m.tokens[pos]}”); the ${res.values.length} most active:`, out);
      const tab = V.html("table", { class: "small", id: "sae-table" }, null, out);
      tab.innerHTML = "<tr><th>latent</th><th>activation</th><th>on the prompt</th><th>promotes / suppresses</th></tr>";
      m.features.forEach((f, i) => {
        const tr = V.html("tr", { "data-latent": f.latent }, null, tab);
        V.html("td", {}, String(f.latent), tr);
        V.html("td", {}, res.values[i].toFixed(3), tr);
        const cell = V.html("td", {}, null, tr);
        cell.appendChild(V.tokenRow("", m.tokens, res.extras.by_token.values[i]));
        const eff = V.html("td", {}, null, tr);
        V.html("div", { class: "tok-pos" }, f.promoted.slice(0, 5).map((x) => JSON.stringify(x[0])).join(" "), eff);
        V.html("div", { class: "tok-neg" }, f.suppressed.slice(0, 5).map((x) => JSON.stringify(x[0])).join(" "), eff);
        if (f.contexts) {
          V.html("div", { class: "hint" }, `density ${f.density.toExponential(2)}; top contexts:`, eff);
          f.contexts.forEach((c) => V.html("div", { class: "ctx" }, `${c.value.toFixed(2)}  ${c.text}`, eff));
        }
        if (f.heads) {
          V.html("div", { class: "hint" }, `per head (DFA at ${pos}; pre-activation ${f.heads.pre_activation.toFixed(3)}):`, eff);
          eff.appendChild(V.bars(f.heads.dfa, f.heads.dfa.map((_, h) => `H${h}`), { width: 120, left: 40 }));
        }
      });
      out.appendChild(V.result(res).querySelector("a"));
      out.setAttribute("data-done", res.values.length);
      state.views.sae = true;
      ctx.saveUrl();
    }

    // ---------------------------------------------------------------- steering (steer, one call per scale)
    async function steerRun() {
      const out = $("steer-output");
      out.innerHTML = "";
      const scales = $("steer-scales").value.split(",").map((x) => x.trim()).filter((x) => x !== "").map(Number);
      const tab = V.html("table", { class: "small", id: "steer-table" }, null, out);
      tab.innerHTML = "<tr><th>scale</th><th>text (the prompt, then the generation)</th></tr>";
      let first = true;
      for (const scale of scales) {
        const config = { positive: $("steer-pos").value, negative: $("steer-neg").value, layer: +$("steer-layer").value,
          scale, method: $("steer-method").value, max_new_tokens: +$("steer-tokens").value };
        let res;
        try { res = await api("steer", $("prompt").value, config); }
        catch (err) { V.html("p", { class: "error" }, err.message, out); return; }
        if (first) {  // the unsteered text is the same at every scale: shown once
          const tr = V.html("tr", { "data-scale": "0" }, null, tab);
          V.html("td", {}, "unsteered", tr); V.html("td", { class: "gen" }, res.meta.texts[0], tr);
          first = false;
        }
        const tr = V.html("tr", { "data-scale": String(scale) }, null, tab);
        V.html("td", {}, `× ${scale}`, tr); V.html("td", { class: "gen" }, res.meta.texts[1], tr);
      }
      out.setAttribute("data-done", scales.length);
      state.views.steer = true;
      ctx.saveUrl();
    }

    // ---------------------------------------------------------------- drag to patch (patch-cell)
    function dragRows() {
      const box = $("drag-rows");
      box.innerHTML = "";
      state.dragFrom = null;
      [["clean", $("prompt").value], ["corrupt", $("corrupt").value]].forEach(([side, text]) => {
        const row = V.html("div", { class: "drag-row", "data-side": side }, null, box);
        V.html("span", { class: "name" }, side, row);
        (state.pairTokens ? state.pairTokens[side] : []).forEach((tok, i) => {
          const s = V.html("span", { class: "t drag-tok", "data-pos": i, draggable: side === "clean" ? "true" : "false" },
            tok, row);
          if (side === "clean") {
            s.addEventListener("dragstart", (ev) => { ev.dataTransfer.setData("text/plain", String(i)); });
            s.addEventListener("click", () => {
              state.dragFrom = i;
              box.querySelectorAll(".drag-tok.picked").forEach((x) => x.classList.remove("picked"));
              s.classList.add("picked");
            });
          } else {
            s.addEventListener("dragover", (ev) => ev.preventDefault());
            s.addEventListener("drop", (ev) => { ev.preventDefault(); dragPatch(+ev.dataTransfer.getData("text/plain"), i); });
            s.addEventListener("click", () => { if (state.dragFrom !== null) dragPatch(state.dragFrom, i); });
          }
        });
      });
    }
    async function dragPatch(from, to) {
      const out = $("drag-out");
      out.innerHTML = "";
      const pair = { clean: $("prompt").value, corrupt: $("corrupt").value, target: $("pair-target").value,
        foil: $("pair-foil").value || null };
      const layer = +$("drag-layer").value;
      let res;
      try { res = await api("patch-cell", [pair], { layer, position: from, to_position: to }); }
      catch (err) { V.html("p", { class: "error" }, err.message, out); return; }
      const m = res.meta, a = res.axes;
      V.html("p", {}, `clean “${m.clean_tokens[m.position]}” (${m.position}) → corrupted position ${m.to_position} at ` +
        `layer ${m.layer}: ${m.metric} ${m.corrupt.toFixed(3)} → ${m.patched.toFixed(3)} (clean ${m.clean.toFixed(3)}); ` +
        `normalised effect ${m.effect.toFixed(3)}`, out);
      const svg = V.heatmap(res.values, a[0].labels, a[1].labels, { title: "change of each residual state" });
      svg.querySelectorAll(".heat-cell").forEach((r) => {
        const i = +r.dataset.i, j = +r.dataset.j;
        r.classList.toggle("cone", i >= m.layer && j >= m.to_position);
      });
      out.appendChild(svg);
      out.setAttribute("data-effect", m.effect);
      out.appendChild(V.result(res).querySelector("a"));
    }

    return { headRun, saeInit, saeRun, steerRun, dragRows, dragPatch };
  };
})(window);
