// The latent dashboard: lays out the numbers Python computed (data/index.js, data/latents_*.js).
// No network and no build step: the data arrive as script files that assign to window globals,
// because browsers refuse fetch() from file://. Per-latent data load when a panel opens.
"use strict";
(function () {
  const D = window.DASHBOARD;
  const META = D.panel_meta;
  const SVG = "http://www.w3.org/2000/svg";
  const position = new Map(D.latents.map((id, i) => [id, i]));
  const columnOf = new Map(D.columns.map((c) => [c.key, c]));
  const state = { sortKey: "latent", sortDir: 1, page: 0, pageSize: 100, ids: null, hideDead: false,
                  rangeKey: "", rangeMin: null, rangeMax: null, open: null };
  let visible = D.latents.map((_, i) => i);  // row positions after filter and sort

  // -- small helpers ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function bytes(b64) {
    const raw = atob(b64), out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  function num(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (a === 0) return "0";
    return a < 1e-3 || a >= 1e4 ? v.toExponential(2) : String(Number(v.toPrecision(3)));
  }
  function fmt(value, kind) {
    if (value === null || value === undefined) return "–";
    if (kind === "bool") return value ? "yes" : "";
    if (kind === "int" || kind === "text") return String(value);
    return num(value);
  }
  function mix(hex, t) {  // white -> hex at t in [0, 1]
    const c = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    return `rgb(${c.map((x) => Math.round(255 + (x - 255) * t)).join(",")})`;
  }
  const ACT = "#2166ac", POWER = "#6a3d9a";

  // -- header, histograms ------------------------------------------------------------------------
  function header() {
    const facts = document.getElementById("facts");
    for (const [k, v] of D.facts) facts.append(el("dt", { text: k }), el("dd", { text: v }));
    const notes = document.getElementById("notes");
    for (const note of D.notes) notes.append(el("div", { class: "note", text: "Not drawn: " + note }));
    const box = document.getElementById("histograms");
    for (const h of D.histograms) box.append(histogram(h));
  }
  function histogram(h) {
    const W = 340, H = 120, pad = 24, top = Math.max(1, ...h.counts);
    const s = svg("svg", { width: W, height: H + pad, role: "img", "aria-label": h.title });
    const bw = (W - 2 * pad) / h.counts.length;
    h.counts.forEach((c, i) => {
      const bh = (c / top) * H;
      const r = svg("rect", { class: "bar", x: pad + i * bw, y: H - bh, width: Math.max(1, bw - 1), height: bh });
      const tip = svg("title", {}); tip.textContent = `${num(h.edges[i])} to ${num(h.edges[i + 1])}: ${c}`;
      r.append(tip); s.append(r);
    });
    s.append(svg("line", { class: "axis", x1: pad, x2: W - pad, y1: H, y2: H }));
    const lo = svg("text", { x: pad, y: H + 14 }); lo.textContent = num(h.edges[0]);
    const hi = svg("text", { x: W - pad, y: H + 14, "text-anchor": "end" }); hi.textContent = num(h.edges[h.edges.length - 1]);
    const mx = svg("text", { x: 2, y: 10 }); mx.textContent = String(top);
    s.append(lo, hi, mx);
    return el("figure", { class: "histogram" }, el("h3", { text: h.title }), s,
              el("figcaption", { text: h.xlabel + (h.note ? ` (${h.note})` : "") }));
  }

  // -- the table: filter, sort, page ---------------------------------------------------------------
  function parseIds(text) {
    const ids = new Set();
    for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
      const m = part.match(/^(\d+)(?:\s*-\s*(\d+))?$/);
      if (!m) return null;
      const a = Number(m[1]), b = m[2] === undefined ? a : Number(m[2]);
      for (let i = a; i <= Math.min(b, a + 100000); i++) ids.add(i);
    }
    return ids.size ? ids : null;
  }
  function refilter() {
    const v = D.values, dead = v.dead;
    visible = [];
    for (let i = 0; i < D.latents.length; i++) {
      if (state.ids && !state.ids.has(D.latents[i])) continue;
      if (state.hideDead && dead && dead[i]) continue;
      if (state.rangeKey) {
        const x = v[state.rangeKey][i];
        if (state.rangeMin !== null && !(x >= state.rangeMin)) continue;
        if (state.rangeMax !== null && !(x <= state.rangeMax)) continue;
      }
      visible.push(i);
    }
    resort();
  }
  function resort() {
    const col = D.values[state.sortKey], dir = state.sortDir;
    visible.sort((i, j) => {
      const a = col[i], b = col[j];
      if (a === b) return D.latents[i] - D.latents[j];
      if (a === null || a === undefined) return 1;  // missing values last in either direction
      if (b === null || b === undefined) return -1;
      return (a < b ? -1 : 1) * dir;
    });
    state.page = 0;
    renderTable();
  }
  function tableHead() {
    const row = el("tr");
    for (const c of D.columns) {
      const th = el("th", { title: c.help, "data-key": c.key, text: c.label + (c.fmt === "freq" ? " (log)" : "") });
      th.addEventListener("click", () => {
        state.sortDir = state.sortKey === c.key ? -state.sortDir : (c.key === "latent" ? 1 : -1);
        state.sortKey = c.key;
        resort();
      });
      row.append(th);
    }
    document.querySelector("#latents thead").append(row);
  }
  function renderTable() {
    for (const th of document.querySelectorAll("#latents th")) {
      th.classList.toggle("sorted-up", th.dataset.key === state.sortKey && state.sortDir > 0);
      th.classList.toggle("sorted-down", th.dataset.key === state.sortKey && state.sortDir < 0);
    }
    const body = document.querySelector("#latents tbody");
    const start = state.page * state.pageSize, rows = visible.slice(start, start + state.pageSize);
    const fragment = document.createDocumentFragment();
    for (const i of rows) {
      const id = D.latents[i];
      const tr = el("tr", { "data-latent": id });
      if (D.values.dead && D.values.dead[i]) tr.classList.add("dead");
      if (id === state.open) tr.classList.add("open");
      for (const c of D.columns) {
        const value = D.values[c.key][i];
        const td = el("td", { text: fmt(value, c.fmt) });
        if (c.fmt === "freq" && value > 0) {  // a bar on a log scale: 1e-6 .. 1
          td.append(el("span", { class: "freqbar", style: `width:${Math.max(1, (Math.log10(value) + 6) * 8)}px` }));
        }
        tr.append(td);
      }
      tr.addEventListener("click", () => { location.hash = "latent=" + id; });
      fragment.append(tr);
    }
    body.replaceChildren(fragment);
    const shown = rows.length ? `${start + 1}–${start + rows.length}` : "0";
    document.getElementById("page-info").textContent =
      `${shown} of ${visible.length}` + (visible.length < D.latents.length ? ` (filtered from ${D.latents.length})` : "");
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = start + state.pageSize >= visible.length;
  }
  function controls() {
    const search = document.getElementById("search");
    search.addEventListener("input", () => { state.ids = parseIds(search.value); refilter(); });
    search.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && /^\d+$/.test(search.value.trim())) location.hash = "latent=" + search.value.trim();
    });
    const hide = document.getElementById("hide-dead");
    if (!D.values.dead) document.getElementById("dead-filter").style.display = "none";
    hide.addEventListener("change", () => { state.hideDead = hide.checked; refilter(); });
    const key = document.getElementById("range-key");
    key.append(el("option", { value: "", text: "(any column)" }));
    for (const c of D.columns) if (["float", "freq", "int"].includes(c.fmt)) key.append(el("option", { value: c.key, text: c.label }));
    const bound = (id, field) => {
      const input = document.getElementById(id);
      input.addEventListener("input", () => { state[field] = input.value === "" ? null : Number(input.value); refilter(); });
    };
    key.addEventListener("change", () => { state.rangeKey = key.value; refilter(); });
    bound("range-min", "rangeMin"); bound("range-max", "rangeMax");
    const size = document.getElementById("page-size");
    size.addEventListener("change", () => { state.pageSize = Number(size.value); state.page = 0; renderTable(); });
    document.getElementById("prev").addEventListener("click", () => { state.page--; renderTable(); });
    document.getElementById("next").addEventListener("click", () => { state.page++; renderTable(); });
  }

  // -- a latent's panel ----------------------------------------------------------------------------
  function loadShard(number) {
    const shards = window.DASHBOARD_SHARDS || {};
    if (shards[number]) return Promise.resolve(shards[number]);
    return new Promise((resolve, reject) => {
      const name = `data/latents_${String(number).padStart(5, "0")}.js`;
      const tag = el("script", { src: name });
      tag.onload = () => resolve(window.DASHBOARD_SHARDS[number]);
      tag.onerror = () => reject(new Error(`could not load ${name} (was the dashboard copied whole?)`));
      document.head.append(tag);
    });
  }
  function openFromHash() {
    const m = location.hash.match(/latent=(\d+)/);
    if (!m) return;
    const id = Number(m[1]), panel = document.getElementById("panel");
    state.open = id;
    renderTable();
    if (!position.has(id)) {
      panel.replaceChildren(el("p", { class: "hint", text: `Latent ${id} is not in this dashboard (it shows ${D.latents.length} latents: ${D.latents[0]}–${D.latents[D.latents.length - 1]}).` }));
      return;
    }
    panel.replaceChildren(el("p", { class: "hint", text: `Loading latent ${id}…` }));
    loadShard(Math.floor(position.get(id) / D.shard_latents))
      .then((shard) => { if (state.open === id) renderPanel(id, shard[String(id)]); })
      .catch((error) => panel.replaceChildren(el("p", { class: "hint", text: error.message })));
  }
  function renderPanel(id, data) {
    const i = position.get(id), panel = document.getElementById("panel");
    const stats = el("div", { class: "stats" });
    for (const c of D.columns.slice(1)) stats.append(el("span", { text: `${c.label}: ${fmt(D.values[c.key][i], c.fmt)}` }));
    const link = el("a", { class: "share", href: `#latent=${id}`, text: "link to this latent" });
    const title = el("h2", { text: `Latent ${id}` }); title.append(link);
    const parts = [title, stats];
    if (D.family === "decoder" || !data) {
      parts.push(el("p", { class: "hint", text: D.notes.length ? "No panel: " + D.notes.join(" ") : "No panel data for this latent." }));
    } else if (D.family === "modular") {
      parts.push(...modularPanel(data));
    } else {
      parts.push(...proteinPanel(data));
    }
    panel.replaceChildren(...parts);
    panel.scrollTop = 0;
  }

  // -- modular panels --------------------------------------------------------------------------------
  const splitCache = [];
  function splitOf(op) { return splitCache[op] || (splitCache[op] = bytes(META.split[op])); }
  function heatmap(op, grid) {
    const p = META.p, cell = Math.max(2, Math.min(10, Math.floor(400 / p)));
    const canvas = el("canvas", { class: "map", width: p * cell, height: p * cell });
    const q = bytes(grid.q), split = splitOf(op), outline = cell >= 5;
    const ctx = canvas.getContext("2d");
    for (let a = 0; a < p; a++) for (let b = 0; b < p; b++) {
      const k = a * p + b;
      ctx.fillStyle = split[k] === 0 ? "#d9d9d9" : mix(ACT, q[k] / 255);
      ctx.fillRect(b * cell, a * cell, cell, cell);
      if (split[k] === 1 && outline) { ctx.strokeStyle = "#777"; ctx.lineWidth = 1; ctx.strokeRect(b * cell + 0.5, a * cell + 0.5, cell - 1, cell - 1); }
      else if (split[k] === 1) { ctx.fillStyle = "#999"; ctx.fillRect(b * cell, a * cell, 1, 1); }  // too small to outline: a corner dot
    }
    const readout = el("div", { class: "caption", text: "hover for (a, b)" });
    canvas.addEventListener("mousemove", (e) => {
      const r = canvas.getBoundingClientRect();
      const b = Math.floor((e.clientX - r.left) / cell), a = Math.floor((e.clientY - r.top) / cell);
      if (a < 0 || b < 0 || a >= p || b >= p) return;
      const k = a * p + b, kind = ["no such pair", "train", "test"][split[k]];
      readout.textContent = `a=${a}, b=${b}: activation ≈ ${num((q[k] / 255) * grid.max)} (${kind})`;
    });
    return el("figure", {}, canvas, el("figcaption", { class: "caption",
      text: `activation over (a ↓, b →), white 0 to blue ${num(grid.max)}; ` + (outline ? "outlined" : "dark corner") + ": training pairs; grey: no such pair" }), readout);
  }
  function spectrum(op, f) {
    const n = META.fourier[op].n, size = Math.floor(n / 2) + 1, cell = Math.max(2, Math.floor(300 / size)), m = 8;
    const canvas = el("canvas", { class: "map", width: size * cell + m, height: size * cell + m });
    const ctx = canvas.getContext("2d"), q = bytes(f.q);
    for (let i = 0; i < size; i++) for (let j = 0; j < size; j++) {
      ctx.fillStyle = mix(POWER, q[i * size + j] / 255);
      ctx.fillRect(m + j * cell, m + i * cell, cell, cell);
    }
    const keys = [];
    for (const [source, byOp] of Object.entries(META.key_frequencies)) {
      const ks = byOp[META.operations[op]] || [];
      keys.push(`${source}: ${ks.join(", ") || "none"}`);
      ctx.fillStyle = "#d62728";
      for (const k of ks) if (k < size) { ctx.fillRect(m + k * cell, 0, cell, m - 2); ctx.fillRect(0, m + k * cell, m - 2, cell); }
    }
    const top = f.top.map(([ka, kb, s]) => `(${ka}, ${kb}) ${(100 * s).toFixed(0)}%`).join(", ");
    return el("figure", {}, canvas, el("figcaption", { class: "caption",
      text: `Fourier power (k_a ↓, k_b →; ${META.fourier[op].axis}); red marks: the host's key frequencies (${keys.join("; ")}). Strongest: ${top || "none (constant map)"}` }));
  }
  function logitChart(source, effects) {
    const box = el("div", { class: "answers" }, el("h3", { text: `writes to the answer (${source})` }));
    if (!effects) { box.append(el("p", { class: "hint", text: "never fires: no logit effect" })); return box; }
    const e = effects.effect, W = 300, H = 90, bw = W / e.length, top = Math.max(1e-9, ...e.map(Math.abs));
    const s = svg("svg", { width: W, height: H + 14, role: "img", "aria-label": "logit effect per answer" });
    e.forEach((v, c) => {
      const h = (Math.abs(v) / top) * (H / 2);
      const r = svg("rect", { class: v >= 0 ? "up" : "down", x: c * bw, y: v >= 0 ? H / 2 - h : H / 2, width: Math.max(1, bw - 0.5), height: h });
      const tip = svg("title", {}); tip.textContent = `answer ${c}: ${num(v)}`; r.append(tip); s.append(r);
    });
    s.append(svg("line", { class: "axis", x1: 0, x2: W, y1: H / 2, y2: H / 2 }));
    const t = svg("text", { x: 0, y: H + 12 }); t.textContent = `answers 0…${e.length - 1}, ±${num(top)}`; s.append(t);
    const list = (rows, cls) => el("div", { class: cls, text: rows.map(([c, v]) => `${c} (${v > 0 ? "+" : ""}${num(v)})`).join(", ") });
    box.append(s, el("div", { text: "promotes:" }), list(effects.promoted, "up"), el("div", { text: "suppresses:" }), list(effects.suppressed, "down"));
    return box;
  }
  function modularPanel(data) {
    const out = [];
    META.operations.forEach((op, o) => {
      const where = META.positions === "all" ? " at the answer position (the table counts every token)" : "";
      out.push(el("h3", { text: (META.operations.length > 1 ? op : `activation over every pair (${op})`) + where }),
               el("div", { class: "maps" }, heatmap(o, data.grids[o]), spectrum(o, data.fourier[o])));
    });
    const rows = data.top.map(([op, a, b, v, train]) => el("tr", {}, el("td", { text: op }), el("td", { text: a }),
      el("td", { text: b }), el("td", { text: num(v) }), el("td", { text: train ? "train" : "test" })));
    out.push(el("h3", { text: "top-activating pairs" }),
             el("table", { class: "small" }, el("tr", {}, ...["op", "a", "b", "activation", "split"].map((h) => el("th", { text: h }))), ...rows));
    out.push(el("div", { class: "sources" }, ...META.sources.map((s, k) => logitChart(s, data.logits ? data.logits[k] : null))),
             el("p", { class: "caption", text: META.effect_note }));
    return out;
  }

  // -- protein panels ----------------------------------------------------------------------------------
  function windowRow(w, shades, first) {
    const row = el("div", { class: "window" });
    const shade = shades.subarray(first, first + w.letters.length);
    row.append(el("span", { class: "meta", text: `${w.record} · residue ${w.residue} · ${num(w.value)} (${w.split})`,
                            title: `${w.length} residues read from this record (longer ones are cropped to a window)` }));
    [...w.letters].forEach((ch, j) => {
      const span = el("span", { class: "res" + (j === META.window ? " centre" : ""), text: ch });
      span.style.background = ch === " " ? "transparent" : mix(ACT, shade[j] / 255);
      if (shade[j] > 150) span.style.color = "#fff";
      row.append(span);
    });
    return row;
  }
  function bars(values, labels, W, H, signed, caption, tips) {
    const s = svg("svg", { width: W, height: H + 16, role: "img", "aria-label": caption });
    const bw = W / values.length, top = Math.max(1e-9, ...values.map((v) => Math.abs(v || 0)));
    const zero = signed ? H / 2 : H;
    values.forEach((v, i) => {
      const h = (Math.abs(v || 0) / top) * (signed ? H / 2 : H);
      const r = svg("rect", { class: signed ? (v >= 0 ? "up" : "down") : "act", x: i * bw + 1, y: v >= 0 ? zero - h : zero, width: Math.max(1, bw - 2), height: h });
      const tip = svg("title", {}); tip.textContent = tips ? tips[i] : `${labels[i]}: ${num(v)}`; r.append(tip); s.append(r);
      if (values.length <= 25) { const t = svg("text", { x: i * bw + bw / 2, y: H + 12, "text-anchor": "middle" }); t.textContent = labels[i]; s.append(t); }
    });
    s.append(svg("line", { class: "axis", x1: 0, x2: W, y1: zero, y2: zero }));
    return el("figure", {}, s, el("figcaption", { class: "caption", text: caption }));
  }
  function proteinPanel(data) {
    const out = [el("h3", { text: "top-activating residues in their sequences" })];
    if (!data.windows.length) out.push(el("p", { class: "hint", text: "never fires" }));
    const shades = bytes(data.shades), width = 2 * META.window + 1;
    data.windows.forEach((w, j) => out.push(windowRow(w, shades, j * width)));
    out.push(el("p", { class: "caption", text: `±${META.window} residues around each; shaded white to blue by activation relative to the strongest; underlined: the residue itself` }));
    const aa = [...META.amino_acids], counts = data.enrichment.counts;
    out.push(el("h3", { text: "amino-acid enrichment of the top residues" }),
             bars(data.enrichment.log2, aa, 420, 90, true,
                  "log2(share among the top residues / share among all residues); green: over-represented, magenta: under",
                  aa.map((a, i) => `${a}: log2 ratio ${num(data.enrichment.log2[i])}, ${counts[i]} of the top residues`)));
    out.push(el("h3", { text: "activation along the sequence" }),
             bars(data.position, data.position.map((_, i) => `${Math.round((100 * i) / data.position.length)}%`), 420, 80, false,
                  `mean activation in ${data.position.length} bins of relative position, N-terminus (left) to C-terminus`));
    return out;
  }

  header();
  tableHead();
  controls();
  refilter();
  window.addEventListener("hashchange", openFromHash);
  openFromHash();
})();
