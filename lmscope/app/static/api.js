// lmscope app: the one call to the API (POST /api/run, spec.run on the server) with its progress display,
// and the end of a measured interaction (the browser has painted). app.js calls LmApi($) once.
(function (root) {
  "use strict";
  root.LmApi = function ($) {
    let jobs = 0;
    async function api(method, inputs, config) {
      const t0 = performance.now(), id = `j${Date.now().toString(36)}-${(jobs++).toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
      $("status").textContent = `running ${method}…`;
      const watch = progress(id, method);
      let r, doc;
      try {
        r = await fetch("/api/run", { method: "POST", headers: { "Content-Type": "application/json", "X-Job-Id": id },
          body: JSON.stringify({ method, inputs, config: config || {} }) });
        doc = await r.json();
      } finally { watch.stop(); }
      if (!r.ok) { $("status").textContent = `${method}: ${doc.error}`; throw new Error(doc.error); }
      const trip = performance.now() - t0;
      $("status").textContent = `${method}: ${doc.meta.compute_ms.toFixed(0)} ms compute, ` +
        `${trip.toFixed(0)} ms round trip${doc.meta.cached ? " (cached)" : ""}`;
      if (window.lmscope) window.lmscope.lastCall = { ...doc.meta, method, round_trip_ms: trip };
      return doc.result;
    }

    // a call not answered within 400 ms shows its progress: its place in the queue or how long it has run,
    // and the library's progress bar if it shows one (GET /api/jobs/<id>, every 300 ms)
    function progress(id, method) {
      let stopped = false, timer = setTimeout(tick, 400);
      const ordinal = (n) => n + (n % 10 === 1 && n % 100 !== 11 ? "st" : n % 10 === 2 && n % 100 !== 12 ? "nd"
        : n % 10 === 3 && n % 100 !== 13 ? "rd" : "th");
      async function tick() {
        try {
          const r = await fetch(`/api/jobs/${id}`);
          if (r.ok && !stopped) show(await r.json());
        } catch (err) { /* the call's own answer reports errors */ }
        if (!stopped) timer = setTimeout(tick, 300);
      }
      function show(j) {
        const bar = j.bars.length ? j.bars[j.bars.length - 1] : null, pb = $("progress-bar");
        if (bar && bar.total) { pb.max = bar.total; pb.value = bar.n; } else pb.removeAttribute("value");
        $("progress-text").textContent = j.state === "queued"
          ? `${method}: ${ordinal(j.position)} in the queue, ${j.elapsed_s.toFixed(1)} s`
          : `${method}: running ${(j.running_s || 0).toFixed(1)} s` + (bar ? `, ${bar.desc} ${bar.n}/${bar.total ?? "?"}` : "");
        $("progress").dataset.state = j.state;
        $("progress").hidden = false;
      }
      return { stop() { stopped = true; clearTimeout(timer); $("progress").hidden = true; delete $("progress").dataset.state; } };
    }
    // resolves once the browser has painted what the last handler drew
    const painted = () => new Promise((ok) => requestAnimationFrame(() => setTimeout(ok, 0)));
    return { api, painted };
  };
})(window);
