// The search page: plain DOM, no framework, no network beyond this server's JSON API.
//
// Everything that comes from the index (document text, ids, metadata) or from the server (error
// messages) is untrusted: it reaches the page only through textContent / text nodes, never as HTML.
"use strict";

(function () {
  const CHANNELS = ["dense", "sparse", "colbert", "bm25"];
  const LABELS = { dense: "dense", sparse: "sparse", colbert: "ColBERT", bm25: "BM25" };
  const KEY_STORE = "hybridsearch.apiKey";
  const MAX_K = 1000;

  const $ = (id) => document.getElementById(id);
  const form = $("search-form");
  const queryBox = $("query");
  const modeBox = $("mode");
  const kBox = $("k");
  const fusionBox = $("fusion");
  const filterBox = $("filter");
  const keyBox = $("api-key");
  const errorBox = $("error");
  const summary = $("summary");
  const hitList = $("hits");
  const weights = $("weights");
  const sliders = $("weight-sliders");

  let channels = CHANNELS.slice(); // what the index has, from /stats
  let seq = 0; // the newest request; older answers are dropped
  let done = 0; // searches answered (shown or failed): tests wait on body[data-searches]

  // ------------------------------------------------------------------ small DOM helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "className") node.className = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || ["title", "role", "id", "for"].includes(k))
        node.setAttribute(k, String(v));
      else node[k] = v;
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c); // strings become text nodes
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || !Number.isFinite(x)) return "–";
    const d = digits === undefined ? 4 : digits;
    return Math.abs(x) >= 1000 ? x.toFixed(0) : x.toFixed(d);
  }

  function showError(msg) {
    errorBox.textContent = msg;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.textContent = "";
    errorBox.hidden = true;
  }

  // ------------------------------------------------------------------ API

  function headers(json) {
    const h = { Accept: "application/json" };
    if (json) h["Content-Type"] = "application/json";
    const key = keyBox.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // Server-reported time: a Server-Timing header (dur=, milliseconds), X-Process-Time (seconds),
  // or a took_ms / latency_ms field in the body; null when the server gives none.
  function serverMs(resp, body) {
    const st = resp.headers.get("Server-Timing");
    if (st) {
      let total = 0, seen = false;
      for (const m of st.matchAll(/dur=([0-9.]+)/g)) { total += parseFloat(m[1]); seen = true; }
      if (seen) return total;
    }
    const pt = resp.headers.get("X-Process-Time");
    if (pt && Number.isFinite(parseFloat(pt))) return parseFloat(pt) * 1000;
    if (body && typeof body === "object") {
      for (const f of ["took_ms", "latency_ms", "elapsed_ms"]) if (Number.isFinite(body[f])) return body[f];
    }
    return null;
  }

  async function call(path, payload) {
    const t0 = performance.now();
    const resp = await fetch(path, payload === undefined
      ? { headers: headers(false), cache: "no-store" }
      : { method: "POST", headers: headers(true), body: JSON.stringify(payload), cache: "no-store" });
    let body = null;
    const text = await resp.text();
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
    const ms = performance.now() - t0;
    if (!resp.ok) {
      let msg = `${resp.status} ${resp.statusText}`.trim();
      if (body && typeof body === "object") {
        const detail = body.error !== undefined ? body.error : body.detail;
        if (typeof detail === "string") msg += ": " + detail;
        else if (detail !== undefined) msg += ": " + JSON.stringify(detail);
      } else if (text) {
        msg += ": " + text.slice(0, 300);
      }
      if (resp.status === 401 || resp.status === 403) msg += " (enter the API key above)";
      const err = new Error(msg);
      err.status = resp.status;
      throw err;
    }
    return { body, ms, server: serverMs(resp, body) };
  }

  // ------------------------------------------------------------------ stats

  async function loadStats() {
    const box = $("stats");
    try {
      const { body } = await call("stats");
      const had = channels.join();
      channels = Array.isArray(body.channels) ? body.channels.filter((c) => CHANNELS.includes(c)) : CHANNELS.slice();
      box.replaceChildren(
        stat("documents", body.documents),
        stat("segments", body.segments),
        stat("generation", body.generation),
        stat("channels", channels.map((c) => LABELS[c]).join(" · ")),
        body.model ? stat("model", String(body.model).split("/").pop()) : null,
      );
      box.dataset.loaded = "1";
      if (channels.join() !== had || !box.dataset.channels) applyChannels(); // keep the user's sliders
      box.dataset.channels = channels.join();
    } catch (e) {
      box.replaceChildren(el("span", { className: "muted", text: "stats unavailable: " + e.message }));
      box.dataset.loaded = "error";
    }
  }

  function stat(name, value) {
    return el("span", { className: "stat", "data-stat": name },
      el("span", { className: "stat-name", text: name }), " ",
      el("strong", { text: value === undefined || value === null ? "–" : value }));
  }

  // Modes of channels the index lacks are disabled; hybrid always works (dense is always there).
  function applyChannels() {
    for (const opt of modeBox.options) {
      opt.disabled = opt.value !== "hybrid" && !channels.includes(opt.value);
    }
    if (modeBox.selectedOptions[0] && modeBox.selectedOptions[0].disabled) modeBox.value = "hybrid";
    buildSliders();
    buildLegend();
    syncMode();
  }

  // ------------------------------------------------------------------ weights

  function buildSliders() {
    sliders.replaceChildren();
    for (const c of channels) {
      const id = "w-" + c;
      const out = el("output", { id: id + "-value", for: id, className: "wval", text: "default" });
      const range = el("input", {
        id, type: "range", min: "0", max: "1", step: "0.05", value: "0.5",
        "data-channel": c, "aria-describedby": "weights-help",
      });
      range.addEventListener("input", () => {
        range.dataset.touched = "1";
        out.textContent = Number(range.value).toFixed(2);
      });
      sliders.append(el("div", { className: "slider" },
        el("span", { className: "swatch ch-" + c, "aria-hidden": "true" }),
        el("label", { for: id, text: LABELS[c] }), range, out));
    }
  }

  function chosenWeights() {
    const w = {};
    for (const r of sliders.querySelectorAll("input[type=range]")) {
      if (r.dataset.touched) w[r.dataset.channel] = Number(r.value);
    }
    return Object.keys(w).length ? w : null;
  }

  $("reset-weights").addEventListener("click", () => {
    for (const r of sliders.querySelectorAll("input[type=range]")) {
      delete r.dataset.touched;
      r.value = "0.5";
      $(r.id + "-value").textContent = "default";
    }
  });

  function syncMode() {
    const hybrid = modeBox.value === "hybrid";
    weights.disabled = !hybrid;
    fusionBox.disabled = !hybrid;
    weights.classList.toggle("off", !hybrid);
  }

  function buildLegend() {
    const legend = $("legend");
    legend.replaceChildren(...channels.map((c) =>
      el("li", {}, el("span", { className: "swatch ch-" + c, "aria-hidden": "true" }), LABELS[c])));
  }

  // ------------------------------------------------------------------ request

  // The request body from the form, or throws an Error whose message the page shows.
  function buildRequest() {
    const query = queryBox.value;
    if (!query.trim()) throw new Error("Type a query first.");
    const k = Number(kBox.value);
    if (!Number.isInteger(k) || k < 1 || k > MAX_K) {
      throw new Error(`Hits (k) must be a whole number from 1 to ${MAX_K}.`);
    }
    const req = { query, k, mode: modeBox.value };
    const ftext = filterBox.value.trim();
    filterBox.removeAttribute("aria-invalid");
    if (ftext) {
      let f;
      try {
        f = JSON.parse(ftext);
      } catch (e) {
        filterBox.setAttribute("aria-invalid", "true");
        throw new Error(`Filter is not valid JSON (${e.message}). Example: {"lang": "en"}`);
      }
      if (f === null || typeof f !== "object" || Array.isArray(f)) {
        filterBox.setAttribute("aria-invalid", "true");
        throw new Error('Filter must be a JSON object of field -> value, ' +
                        'e.g. {"lang": "en"} or {"year": {"gte": 2020}}.');
      }
      req.filter = f;
    }
    if (req.mode === "hybrid") {
      const w = chosenWeights();
      if (w) req.weights = w;
      if (fusionBox.value !== "weighted") req.fusion = fusionBox.value;
    }
    return req;
  }

  async function search() {
    const my = ++seq;
    clearError();
    let req;
    try {
      req = buildRequest();
    } catch (e) {
      hitList.replaceChildren(); // never leave hits of another request under the message
      summary.textContent = "";
      showError(e.message);
      finish(my);
      return;
    }
    hitList.setAttribute("aria-busy", "true");
    summary.textContent = "searching…";
    try {
      const res = await call("search", req);
      if (my !== seq) return; // a newer search was started meanwhile
      render(req, res.body && Array.isArray(res.body.hits) ? res.body.hits : []);
      const took = res.server !== null
        ? `${fmt(res.server, 1)} ms on the server, ${fmt(res.ms, 1)} ms in all`
        : `${fmt(res.ms, 1)} ms (measured in the page)`;
      const n = hitList.children.length;
      summary.textContent = `${n} hit${n === 1 ? "" : "s"} for ${req.mode} · ${took}`;
      loadStats(); // the index may have moved on (another writer committed)
    } catch (e) {
      if (my !== seq) return;
      hitList.replaceChildren();
      summary.textContent = "";
      showError(e.message);
    } finally {
      if (my === seq) {
        hitList.removeAttribute("aria-busy");
        finish(my);
      }
    }
  }

  function finish(my) {
    if (my === seq) document.body.dataset.searches = String(++done);
  }

  // ------------------------------------------------------------------ results

  // Lower-cased words of the query, and a crude stem so that "ranking" also marks "ranked".
  function words(text) {
    return text.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [];
  }

  function stem(w) {
    for (const suf of ["ingly", "edly", "ing", "ed", "es", "ly", "s"]) {
      if (w.length - suf.length >= 3 && w.endsWith(suf)) return w.slice(0, -suf.length);
    }
    return w;
  }

  // Text with the query's words wrapped in <mark>, built as DOM nodes (the text stays text).
  function highlighted(text, terms) {
    const frag = document.createDocumentFragment();
    if (!terms.size) {
      frag.append(text);
      return frag;
    }
    const re = /[\p{L}\p{N}]+/gu;
    let last = 0;
    for (const m of text.matchAll(re)) {
      if (!terms.has(stem(m[0].toLowerCase()))) continue;
      if (m.index > last) frag.append(text.slice(last, m.index));
      frag.append(el("mark", { text: m[0] }));
      last = m.index + m[0].length;
    }
    if (last < text.length) frag.append(text.slice(last));
    return frag;
  }

  // Not marked (unless the query has nothing else): marking every "the" hides the words that matter.
  const STOP = new Set(("a an and are as at be but by do does for from has have how i if in into is it its " +
    "not of on or so than that the their then there these they this to was were what when where which " +
    "who why will with you your").split(" "));

  function queryTerms(query) {
    const all = words(query);
    const content = all.filter((w) => !STOP.has(w));
    return new Set((content.length ? content : all).map(stem));
  }

  function render(req, hits) {
    const terms = queryTerms(req.query);
    // one scale for every hit's bars, so that bars compare across hits; 0 always on the axis
    let lo = 0, hi = 0;
    for (const h of hits) {
      for (const v of Object.values(h.contributions || {})) {
        if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      }
    }
    const span = hi - lo || 1;
    const zero = (-lo / span) * 100;
    hitList.dataset.mode = req.mode;
    hitList.replaceChildren(...hits.map((h, i) => hitItem(h, i, terms, zero, span)));
  }

  function hitItem(h, i, terms, zero, span) {
    const text = typeof h.text === "string" ? h.text : "";
    const li = el("li", { className: "hit", "data-id": String(h.id), "data-score": String(h.score) });
    li.append(el("div", { className: "hit-head" },
      el("span", { className: "rank", text: `${i + 1}.` }),
      el("code", { className: "doc-id", text: String(h.id) }),
      el("span", { className: "score", title: "fused score" }, "score ", el("strong", { text: fmt(h.score) })),
      h.rerank_score !== undefined && h.rerank_score !== null
        ? el("span", { className: "score", text: `rerank ${fmt(h.rerank_score)}` }) : null));
    li.append(el("p", { className: "text" }, highlighted(text, terms)));
    const md = h.metadata && typeof h.metadata === "object" ? Object.entries(h.metadata) : [];
    if (md.length) {
      const dl = el("dl", { className: "metadata" });
      for (const [key, v] of md) {
        const shown = typeof v === "string" ? v : JSON.stringify(v);
        dl.append(el("div", {}, el("dt", { text: key }), el("dd", { text: shown })));
      }
      li.append(dl);
    }
    if (h.contributions && typeof h.contributions === "object") {
      li.append(bars(h, zero, span));
    } else if (h.scores && typeof h.scores === "object") {
      const only = Object.entries(h.scores).map(([c, s]) => `${LABELS[c] || c} score ${fmt(s)}`).join(" · ");
      li.append(el("p", { className: "muted small channel-only", text: only }));
    }
    return li;
  }

  function bars(h, zero, span) {
    const box = el("div", { className: "bars", role: "list",
                            "aria-label": "Contribution of each channel to the fused score" });
    for (const c of CHANNELS) {
      if (!(c in h.contributions)) continue;
      const v = Number(h.contributions[c]);
      const raw = h.scores ? h.scores[c] : undefined;
      const tip = `${LABELS[c]}: ${fmt(v)} of the fused score` +
        (raw === null ? " (not retrieved by this channel)" : raw !== undefined ? ` (channel score ${fmt(raw)})` : "");
      const width = Number.isFinite(v) ? (Math.abs(v) / span) * 100 : 0;
      const left = v < 0 ? zero - width : zero;
      const bar = el("span", {
        className: "bar ch-" + c + (v < 0 ? " neg" : ""),
        "data-channel": c, "data-contribution": String(v),
      });
      bar.style.left = left.toFixed(3) + "%";
      bar.style.width = Math.max(width, v ? 0.5 : 0).toFixed(3) + "%";
      const axis = el("span", { className: "axis" });
      axis.style.left = zero.toFixed(3) + "%";
      box.append(el("div", { className: "bar-row", role: "listitem", title: tip, "aria-label": tip },
        el("span", { className: "bar-label", text: LABELS[c] }),
        el("span", { className: "track" }, axis, bar),
        el("span", { className: "bar-value", text: fmt(v, 3) })));
    }
    return box;
  }

  // ------------------------------------------------------------------ wiring

  try { keyBox.value = sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { /* storage off */ }
  keyBox.addEventListener("change", () => {
    try {
      if (keyBox.value) sessionStorage.setItem(KEY_STORE, keyBox.value);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage off: the key lives in the box only */ }
    loadStats();
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    search();
  });
  modeBox.addEventListener("change", () => {
    syncMode();
    if (queryBox.value.trim()) search();
  });
  buildSliders();
  buildLegend();
  syncMode();
  loadStats();
})();
