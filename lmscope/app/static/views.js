// Plain SVG/HTML/canvas renderers of Result JSON (heat maps, bars, token rows); no method logic here.
(function (root) {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function html(tag, attrs, text, parent) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function color(v, max) {  // blue for positive, red for negative, white at 0
    const a = max > 0 ? Math.min(1, Math.abs(v) / max) : 0;
    const c = Math.round(255 * (1 - a));
    return v >= 0 ? `rgb(${c},${c},255)` : `rgb(255,${c},${c})`;
  }
  function absMax(rows) {
    let m = 0;
    for (const r of rows) for (const v of r) if (v !== null && Math.abs(v) > m) m = Math.abs(v);
    return m;
  }
  function esc(t) { return String(t).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }
  // rows: 2-D array; rowLabels / colLabels; returns an <svg> (one markup string: fast for thousands of cells)
  function heatmap(rows, rowLabels, colLabels, opts) {
    opts = opts || {};
    const cell = opts.cell || Math.max(6, Math.min(22, Math.floor(360 / Math.max(1, colLabels.length))));
    const left = opts.left || 70, top = opts.top || 60;
    const w = left + cell * colLabels.length + 10, h = top + cell * rows.length + 10;
    const svg = el("svg", { width: w, height: h, class: "heatmap" });
    const parts = [], max = opts.max || absMax(rows), cursor = opts.onclick ? ' style="cursor:pointer"' : "";
    if (opts.title) parts.push(`<text x="2" y="12" font-size="12" font-weight="bold">${esc(opts.title)}</text>`);
    rows.forEach((r, i) => {
      r.forEach((v, j) => {
        parts.push(`<rect x="${left + j * cell}" y="${top + i * cell}" width="${cell}" height="${cell}" fill="` +
          `${v === null ? "#eee" : color(v, max)}" class="heat-cell" data-i="${i}" data-j="${j}"${cursor}><title>` +
          `${esc(rowLabels[i])} / ${esc(colLabels[j])}: ${v === null ? "—" : (+v).toFixed(4)}</title></rect>`);
      });
      if (cell >= 9) parts.push(`<text x="${left - 3}" y="${top + i * cell + cell * 0.75}" text-anchor="end" ` +
        `font-size="10">${esc(String(rowLabels[i]).slice(0, 12))}</text>`);
    });
    if (cell >= 9) colLabels.forEach((lab, j) => {
      const x = left + j * cell + cell * 0.7, y = top - 3;
      parts.push(`<text x="${x}" y="${y}" transform="rotate(-60 ${x} ${y})" font-size="10">` +
        `${esc(String(lab).slice(0, 12))}</text>`);
    });
    svg.innerHTML = parts.join("");
    if (opts.onclick) svg.addEventListener("click", (ev) => {
      const r = ev.target.closest("rect.heat-cell");
      if (r) opts.onclick(+r.dataset.i, +r.dataset.j, rows[+r.dataset.i][+r.dataset.j]);
    });
    return svg;
  }
  // the same heat map on one <canvas>: thousands of cells (a 64 × 64 map) drawn as pixels, not elements;
  // hovering a cell shows its read-out (row / column: value) as the canvas's tooltip and in data-hover
  function heatCanvas(rows, rowLabels, colLabels, opts) {
    opts = opts || {};
    const cell = opts.cell || Math.max(6, Math.min(22, Math.floor(360 / Math.max(1, colLabels.length))));
    const left = opts.left || 70, top = opts.top || 60, ratio = window.devicePixelRatio || 1;
    const w = left + cell * colLabels.length + 10, h = top + cell * rows.length + 10;
    const cv = html("canvas", { class: "heatmap", width: Math.round(w * ratio), height: Math.round(h * ratio) });
    cv.style.width = `${w}px`; cv.style.height = `${h}px`;
    const ctx = cv.getContext("2d"), max = opts.max || absMax(rows);
    ctx.scale(ratio, ratio);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
    rows.forEach((r, i) => r.forEach((v, j) => {
      ctx.fillStyle = v === null ? "#eee" : color(v, max);
      ctx.fillRect(left + j * cell, top + i * cell, cell, cell);
    }));
    ctx.fillStyle = "#000";
    if (opts.title) { ctx.font = "bold 12px sans-serif"; ctx.textBaseline = "alphabetic"; ctx.fillText(opts.title, 2, 12); }
    if (cell >= 9) {
      ctx.font = "10px sans-serif"; ctx.textAlign = "end";
      rowLabels.forEach((lab, i) => ctx.fillText(String(lab).slice(0, 12), left - 3, top + i * cell + cell * 0.75));
      ctx.textAlign = "start";
      colLabels.forEach((lab, j) => {
        ctx.save(); ctx.translate(left + j * cell + cell * 0.7, top - 3); ctx.rotate(-Math.PI / 3);
        ctx.fillText(String(lab).slice(0, 12), 0, 0); ctx.restore();
      });
    }
    cv.addEventListener("mousemove", (ev) => {
      const box = cv.getBoundingClientRect();
      const j = Math.floor((ev.clientX - box.left - left) / cell), i = Math.floor((ev.clientY - box.top - top) / cell);
      if (i < 0 || j < 0 || i >= rows.length || j >= colLabels.length) { cv.title = ""; delete cv.dataset.hover; return; }
      const v = rows[i][j];
      cv.title = `${rowLabels[i]} / ${colLabels[j]}: ${v === null ? "—" : (+v).toFixed(4)}`;
      cv.dataset.hover = `${i},${j}`;
    });
    cv.dataset.cell = cell; cv.dataset.left = left; cv.dataset.top = top;
    return cv;
  }
  function bars(values, labels, opts) {
    opts = opts || {};
    const bh = 14, left = opts.left || 90, width = opts.width || 220;
    const svg = el("svg", { width: left + width + 60, height: bh * values.length + 4 });
    const max = Math.max(1e-12, ...values.map((v) => Math.abs(v)));
    values.forEach((v, i) => {
      const g = el("g", { class: "bar-row", "data-index": i }, svg);
      el("text", { x: left - 4, y: i * bh + 11, "text-anchor": "end", "font-size": 11 }, g).textContent = labels[i];
      el("rect", { x: left, y: i * bh + 2, width: Math.max(1, (width * Math.abs(v)) / max), height: bh - 3,
        class: "bar" + (opts.selected === i ? " sel" : ""), fill: v < 0 ? "#d62728" : undefined }, g);
      el("text", { x: left + 4 + (width * Math.abs(v)) / max, y: i * bh + 11, "font-size": 10 }, g)
        .textContent = (+v).toFixed(3);
      if (opts.onclick) { g.style.cursor = "pointer"; g.addEventListener("click", () => opts.onclick(i)); }
    });
    return svg;
  }
  function tokenRow(name, tokens, values) {
    const row = html("div", { class: "attr-row" });
    html("span", { class: "name" }, name, row);
    const max = Math.max(1e-12, ...values.map((v) => Math.abs(v || 0)));
    tokens.forEach((t, i) => {
      const s = html("span", { class: "t", title: `${t}: ${values[i]}` }, t, row);
      s.style.background = color(values[i] || 0, max);
    });
    return row;
  }
  // any Result JSON: 1-D bars, 2-D heat map, otherwise its shape and top values
  function result(doc) {
    const box = html("div", { class: "result" });
    const axes = doc.axes || [];
    if (axes.length === 1) box.appendChild(bars(doc.values.slice(0, 60), axes[0].labels.slice(0, 60), {}));
    else if (axes.length === 2 && doc.values.length * doc.values[0].length > 4000) {  // too many cells: the top 40
      const flat = [];
      doc.values.forEach((r, i) => r.forEach((v, j) => { if (v !== null) flat.push([v, `${axes[0].name} ${axes[0].labels[i]} ${axes[1].name} ${axes[1].labels[j]}`]); }));
      flat.sort((x, y) => Math.abs(y[0]) - Math.abs(x[0]));
      const top = flat.slice(0, 40);
      html("p", {}, `the 40 largest of ${flat.length} (by |value|):`, box);
      box.appendChild(bars(top.map((x) => x[0]), top.map((x) => x[1]), { left: 190 }));
    } else if (axes.length === 2) box.appendChild(heatmap(doc.values, axes[0].labels, axes[1].labels, {}));
    else if (axes.length === 3) {
      const first = doc.values[0];
      html("p", {}, `${axes[0].name} ${axes[0].labels[0]} of ${axes[0].labels.length}:`, box);
      box.appendChild(heatmap(first, axes[1].labels, axes[2].labels, {}));
    } else html("pre", {}, JSON.stringify(doc.shape), box);
    const a = html("a", { download: `${doc.method}.json`, href: "#" }, "export Result JSON", box);
    a.addEventListener("click", () => {
      a.href = URL.createObjectURL(new Blob([JSON.stringify(doc)], { type: "application/json" }));
    });
    return box;
  }
  // ---------------------------------------------------------------- PNG export: any view drawn onto a canvas
  // SVG elements are drawn as images (their computed styles inlined), HTML boxes as their background
  // colour and text, each where the page lays it out; nothing leaves the browser.
  const SVG_STYLE = ["fill", "fill-opacity", "stroke", "stroke-width", "stroke-opacity", "stroke-dasharray",
    "opacity", "font-size", "font-family", "font-weight"];
  function svgImage(svg) {
    const copy = svg.cloneNode(true), src = [svg, ...svg.querySelectorAll("*")], dst = [copy, ...copy.querySelectorAll("*")];
    src.forEach((e, i) => {
      const cs = getComputedStyle(e);
      dst[i].setAttribute("style", SVG_STYLE.map((k) => `${k}:${cs.getPropertyValue(k)}`).join(";"));
    });
    copy.setAttribute("xmlns", SVG);
    const box = svg.getBoundingClientRect();
    copy.setAttribute("width", box.width); copy.setAttribute("height", box.height);
    const url = URL.createObjectURL(new Blob([new XMLSerializer().serializeToString(copy)], { type: "image/svg+xml" }));
    return new Promise((ok, fail) => {
      const img = new Image();
      img.onload = () => { URL.revokeObjectURL(url); ok(img); };
      img.onerror = () => { URL.revokeObjectURL(url); fail(new Error("the SVG did not draw")); };
      img.src = url;
    });
  }
  function visible(c) { return c && c !== "transparent" && !/rgba\(.*,\s*0\)$/.test(c); }
  async function toCanvas(node, scale) {
    scale = scale || 2;
    const origin = node.getBoundingClientRect(), ox = origin.left - node.scrollLeft, oy = origin.top - node.scrollTop;
    const ops = [];
    let w = 1, h = 1;
    const extend = (r) => { w = Math.max(w, r.right - ox); h = Math.max(h, r.bottom - oy); };
    (function walk(e) {
      for (const c of e.childNodes) {
        if (c.nodeType === 3 && c.textContent.trim()) {
          const range = document.createRange();
          range.selectNodeContents(c);
          const cs = getComputedStyle(e), rects = [...range.getClientRects()].filter((r) => r.width > 0);
          let text = c.textContent.replace(/\s+/g, " ").trim();
          rects.forEach((r, k) => {  // one rectangle per line: as many characters as fit it
            const n = k === rects.length - 1 ? text.length : Math.max(1, Math.round(text.length * r.width /
              rects.slice(k).reduce((a, q) => a + q.width, 0)));
            ops.push({ text: text.slice(0, n), r, font: cs.font, color: cs.color });
            text = text.slice(n).trimStart();
            extend(r);
          });
        } else if (c.nodeType === 1) {
          const cs = getComputedStyle(c);
          if (cs.display === "none" || cs.visibility === "hidden") continue;
          const r = c.getBoundingClientRect();
          if (!r.width || !r.height) continue;
          extend(r);
          if (c instanceof SVGSVGElement) { ops.push({ svg: c, r }); continue; }
          if (c instanceof HTMLCanvasElement) { ops.push({ canvas: c, r }); continue; }
          if (visible(cs.backgroundColor)) ops.push({ fill: cs.backgroundColor, r });
          walk(c);
        }
      }
    })(node);
    w = Math.min(Math.ceil(w) + 4, 8000); h = Math.min(Math.ceil(h) + 4, 8000);
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(w * scale); canvas.height = Math.round(h * scale);
    const ctx = canvas.getContext("2d");
    ctx.scale(scale, scale);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
    for (const op of ops) {
      const x = op.r.left - ox, y = op.r.top - oy;
      if (op.svg) ctx.drawImage(await svgImage(op.svg), x, y, op.r.width, op.r.height);
      else if (op.canvas) ctx.drawImage(op.canvas, x, y, op.r.width, op.r.height);
      else if (op.fill) { ctx.fillStyle = op.fill; ctx.fillRect(x, y, op.r.width, op.r.height); }
      else { ctx.font = op.font; ctx.fillStyle = op.color; ctx.textBaseline = "middle"; ctx.fillText(op.text, x, y + op.r.height / 2); }
    }
    return canvas;
  }
  async function savePng(node, name) {  // draw ``node`` and download it as ``name``.png
    const canvas = await toCanvas(node);
    const blob = await new Promise((ok) => canvas.toBlob(ok, "image/png"));
    const a = html("a", { download: `${name}.png`, href: URL.createObjectURL(blob) });
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    return canvas;
  }
  root.LmViews = { el, html, esc, heatmap, heatCanvas, bars, tokenRow, result, color, toCanvas, savePng };
})(window);
