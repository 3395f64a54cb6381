// The stepd dashboard: polls the server's JSON API and draws it. No build step: plain
// browser JavaScript; plots by uPlot (vendored under /static/vendor/uplot).
(() => {
  "use strict";

  const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 1000;
  const TOKEN_KEY = "stepd-token";
  const $ = (sel) => document.querySelector(sel);
  const needsToken = document.querySelector('meta[name="stepd-token"]').content === "required";

  const view = {
    run: null, // the run shown
    param: null, // the selected parameter
    sort: { key: "name", dir: 1 },
    params: [], // the last /stats rows
    runSeries: null, // {step: [], ...} of the run's history
    paramSeries: null,
    plots: { run: {}, param: {} }, // uPlot instances, by metric
    timer: null,
    busy: false,
  };
  window.stepdDashboard = view; // for people poking at it (and the browser tests)

  // -- the API ----------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = `Bearer ${token}`;
    const r = await fetch(path, { headers, cache: "no-store" });
    if (r.status === 401) throw new Unauthorized("missing or wrong token");
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail; } catch (_) { /* not JSON */ }
      throw new Error(`${r.status} ${detail}`);
    }
    return r.json();
  }
  const runPath = (run) => `/v1/runs/${encodeURIComponent(run)}`;

  // -- formatting --------------------------------------------------------------------------

  const num = (x) => (x === null || x === undefined ? "–" : Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3)
    ? x.toExponential(2) : Number(x.toPrecision(4)).toString());
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
      if (n >= scale) return `${(n / scale).toFixed(1)} ${unit}`;
    }
    return `${n} B`;
  }
  const ago = (epoch) => `${Math.max(0, Date.now() / 1000 - epoch).toFixed(1)} s ago`;
  const when = (epoch) => new Date(epoch * 1000).toLocaleString();

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows.map((cells) => {
      const tr = document.createElement("tr");
      tr.append(...cells);
      return tr;
    }));
  }
  function state(text, error) {
    const el = $("#state");
    el.textContent = text;
    el.classList.toggle("error", Boolean(error));
  }

  // -- plots -------------------------------------------------------------------------------

  const COLORS = ["#2a7ae2", "#e2682a", "#2aa876", "#9b59b6"];
  const RUN_PLOTS = {
    norms: { title: "gradient and update norm", series: ["grad_norm", "update_norm"] },
    ratio: { title: "update / param", series: ["update_ratio"] },
    lr: { title: "learning rate", series: ["lr"] },
    rate: { title: "steps / s", series: ["steps_per_s"] },
  };
  const PARAM_PLOTS = {
    norms: { title: "gradient and update norm", series: ["grad_norm", "update_norm"] },
    ratio: { title: "update / param", series: ["update_ratio"] },
    lr: { title: "lr (× lr_scale)", series: ["lr"] },
  };

  function makePlots(container, specs, xLabel, into) {
    container.replaceChildren();
    for (const key of Object.keys(into)) delete into[key];
    for (const [key, spec] of Object.entries(specs)) {
      const box = document.createElement("div");
      box.className = "plot";
      box.dataset.metric = key;
      container.append(box);
      const width = Math.max(260, box.clientWidth - 8);
      // Two series (gradient and update norms, orders of magnitude apart): an axis each.
      const scaleOf = (i) => (i === 0 ? "y" : "y2");
      const axes = [{}, { scale: "y" }];
      if (spec.series.length > 1) {
        axes[1].stroke = COLORS[0];
        axes.push({ scale: "y2", side: 1, stroke: COLORS[1], grid: { show: false } });
      }
      into[key] = new uPlot({
        title: spec.title,
        width,
        height: 190,
        scales: { x: { time: false } },
        axes,
        series: [{ label: xLabel }, ...spec.series.map((s, i) => ({
          label: s.replace(/_/g, " "), stroke: COLORS[i], width: 1.5, points: { show: false },
          scale: scaleOf(i),
        }))],
        legend: { live: true },
      }, [[], ...spec.series.map(() => [])], box);
      into[key].stepdSeries = spec.series;
    }
  }

  function draw(into, series, xKey) {
    if (!series) return;
    for (const plot of Object.values(into)) {
      plot.setData([series[xKey], ...plot.stepdSeries.map((s) => series[s])]);
    }
  }

  function resize() {
    for (const group of [view.plots.run, view.plots.param]) {
      for (const plot of Object.values(group)) {
        const box = plot.root.parentElement;
        plot.setSize({ width: Math.max(260, box.clientWidth - 8), height: 190 });
      }
    }
  }
  window.addEventListener("resize", resize);

  // A history as columns, new samples appended, at most `capacity` kept (the server's).
  function extend(series, samples, capacity, fields) {
    const out = series || Object.fromEntries(fields.map((f) => [f, []]));
    for (const s of samples) for (const f of fields) out[f].push(s[f]);
    const extra = out[fields[0]].length - capacity;
    if (capacity > 0 && extra > 0) for (const f of fields) out[f].splice(0, extra);
    return out;
  }
  const RUN_FIELDS = ["step", "lr", "steps_per_s", "grad_norm", "update_norm", "update_ratio"];
  const PARAM_FIELDS = ["version", "step", "lr", "grad_norm", "update_norm", "update_ratio"];
  const last = (series, key) => (series && series[key].length ? series[key][series[key].length - 1] : null);

  // -- the page ----------------------------------------------------------------------------

  function runLinks(runs) {
    const nav = $("#runs");
    nav.replaceChildren(...runs.map((r) => {
      const a = document.createElement("a");
      a.href = `#run=${encodeURIComponent(r.name)}`;
      a.textContent = r.name;
      a.dataset.run = r.name;
      a.classList.toggle("current", r.name === view.run);
      return a;
    }));
  }

  function chooseRun(runs) {
    const wanted = new URLSearchParams(location.hash.slice(1)).get("run");
    if (wanted && runs.some((r) => r.name === wanted)) return wanted;
    if (view.run && runs.some((r) => r.name === view.run)) return view.run;
    const named = runs.find((r) => !r.anonymous);
    return (named || runs[0] || {}).name || null;
  }

  function showRun(name) {
    if (name === view.run) return;
    view.run = name;
    view.param = null;
    view.runSeries = null;
    view.paramSeries = null;
    $("#param").hidden = true;
    makePlots($("#run-plots"), RUN_PLOTS, "step", view.plots.run);
  }

  function summary(info, stats, groups) {
    const lrs = groups.map((g) => g.lr);
    const cards = [
      ["step", stats.global_step],
      ["lr", lrs.length > 1 ? lrs.map(num).join(", ") : num(stats.lr)],
      ["steps / s", num(stats.steps_per_s)],
      ["parameters", stats.params.length],
      ["committed", bytes(info.committed_bytes)],
      ["algorithms", [...new Set(groups.map((g) => g.algorithm))].join(", ") || "–"],
      ["grad norm", num(stats.grad_norm)],
      ["update / param", num(stats.update_ratio)],
    ];
    $("#summary").replaceChildren(...cards.map(([k, v]) => {
      const div = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v;
      dd.dataset.card = k;
      div.append(dt, dd);
      return div;
    }));
  }

  function paramTable() {
    let pattern = null;
    const text = $("#filter").value.trim();
    try { pattern = text ? new RegExp(text, "i") : null; } catch (_) { pattern = null; }
    const matches = (p) => !text || (pattern ? pattern.test(p.name) : p.name.includes(text));
    const { key, dir } = view.sort;
    const value = (p) => (key === "shape" ? p.shape.reduce((a, b) => a * b, 1) : p[key]);
    const rows = view.params.filter(matches).sort((a, b) => {
      const x = value(a);
      const y = value(b);
      if (x === y) return 0;
      if (x === null || x === undefined) return 1; // missing values last, either way
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    $("#shown").textContent = `${rows.length} of ${view.params.length}`;
    const tbody = $("#params tbody");
    tbody.replaceChildren(...rows.map((p) => {
      const tr = document.createElement("tr");
      tr.dataset.name = p.name;
      tr.classList.toggle("selected", p.name === view.param);
      const scale = p.lr_scale === 1 ? "" : ` (× ${num(p.lr_scale)})`;
      tr.append(
        cell(p.name),
        cell(p.shape.length ? p.shape.join("×") : "scalar"),
        cell(p.version, "num"),
        cell(num(p.param_norm), "num"),
        cell(num(p.last_grad_norm), "num"),
        cell(num(p.last_update_norm), "num"),
        cell(num(p.update_ratio), "num"),
        cell(num(p.lr) + scale, "num"),
        cell(bytes(p.state_bytes), "num"),
      );
      return tr;
    }));
    for (const th of document.querySelectorAll("#params th")) {
      th.classList.toggle("asc", th.dataset.key === key && dir > 0);
      th.classList.toggle("desc", th.dataset.key === key && dir < 0);
    }
  }

  function selectParam(name) {
    view.param = name;
    view.paramSeries = null;
    $("#param").hidden = false;
    $("#param-name").textContent = name;
    makePlots($("#param-plots"), PARAM_PLOTS, "version", view.plots.param);
    paramTable();
    poll();
  }

  async function refresh() {
    const [status, runs] = await Promise.all([api("/v1/status"), api("/v1/runs")]);
    $("#server").textContent = `${status.version} · ${status.device} · ${runs.length} run(s)`;
    const name = chooseRun(runs);
    $("#run").hidden = !name; // shown first: the plots take their width from the page
    showRun(name);
    runLinks(runs);
    $("#empty").hidden = runs.length > 0;
    if (!view.run) return;
    const base = runPath(view.run);
    const after = last(view.runSeries, "step");
    const [info, stats, history, workers, checkpoints] = await Promise.all([
      api(base),
      api(`${base}/stats`),
      api(`${base}/history${after === null ? "" : `?after=${after}`}`),
      api(`${base}/workers`),
      api(`${base}/checkpoints`),
    ]);
    view.params = stats.params;
    view.runSeries = extend(view.runSeries, history.samples, history.capacity, RUN_FIELDS);
    summary(info, stats, info.groups);
    draw(view.plots.run, view.runSeries, "step");
    paramTable();
    fill($("#workers tbody"), workers.map((w) => [
      cell(w.id), cell(ago(w.last_seen), "num"), cell(w.staleness ?? "–", "num"),
      cell(w.accepted ?? w.gradients, "num"), cell(w.refused ?? 0, "num"),
    ]));
    fill($("#checkpoints tbody"), checkpoints.map((c) => [
      cell(c.name), cell(c.global_step, "num"), cell(bytes(c.bytes), "num"), cell(when(c.created)),
    ]));
    if (view.param && stats.params.some((p) => p.name === view.param)) {
      const since = last(view.paramSeries, "version");
      const path = `${base}/params/${encodeURIComponent(view.param)}/history`;
      const h = await api(since === null ? path : `${path}?after=${since}`);
      view.paramSeries = extend(view.paramSeries, h.samples, h.capacity, PARAM_FIELDS);
      draw(view.plots.param, view.paramSeries, "version");
    }
  }

  async function poll() {
    if (view.busy) return;
    view.busy = true;
    clearTimeout(view.timer);
    try {
      await refresh();
      state(`updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      if (err instanceof Unauthorized) {
        sessionStorage.removeItem(TOKEN_KEY);
        login("The token was refused: enter it again.");
        return;
      }
      state(`cannot update: ${err.message}`, true);
    } finally {
      view.busy = false;
    }
    view.timer = setTimeout(poll, POLL_MS);
  }

  function login(reason) {
    clearTimeout(view.timer);
    $("#main").hidden = true;
    $("#login").hidden = false;
    if (reason) $("#login-reason").textContent = reason;
    $("#token").focus();
  }

  function start() {
    $("#login").hidden = true;
    $("#main").hidden = false;
    poll();
  }

  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value);
    $("#token").value = "";
    start();
  });
  $("#filter").addEventListener("input", paramTable);
  $("#params thead").addEventListener("click", (ev) => {
    const key = ev.target.dataset && ev.target.dataset.key;
    if (!key) return;
    view.sort = { key, dir: view.sort.key === key ? -view.sort.dir : 1 };
    paramTable();
  });
  $("#params tbody").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    if (tr) selectParam(tr.dataset.name);
  });
  window.addEventListener("hashchange", () => poll());

  if (needsToken && !sessionStorage.getItem(TOKEN_KEY)) login();
  else start();
})();
