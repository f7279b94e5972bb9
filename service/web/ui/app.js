// ViT Serve web page: calls the public API (/models, /model, /classify, /classify_batch) like
// any client.
"use strict";
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const SVG = "http://www.w3.org/2000/svg";
  const el = (tag, attrs = {}, text) => {
    const node = tag.startsWith("svg:")
      ? document.createElementNS(SVG, tag.slice(4))
      : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const fmt = (x, d = 1) => Number(x).toFixed(d);
  const pct = (x) => `${fmt(x * 100)}%`;
  const dims = (a) => a.join("×");

  const ui = {
    drop: $("#dropzone"), input: $("#file-input"), topK: $("#top-k"), status: $("#status"),
    results: $("#results"), model: $("#model"), summary: $("#model-summary"),
    fields: $("#model-fields"), card: $("#card-t"), pick: $("#model-pick"),
  };
  const state = { model: null, files: [], run: 0, urls: [] };
  const TITLES = {
    400: "This file could not be read as an image",
    413: "Too large",
    415: "Not a supported image type",
    422: "The image or an option was rejected",
    503: "The service is busy or still loading",
  };

  // --- model panel -------------------------------------------------------------------------
  // The model picked (null: the server's default); the picker lists what GET /models says.
  const picked = () => ui.pick.value || null;
  const withModel = (path) => (picked() ? `${path}?model=${encodeURIComponent(picked())}` : path);

  async function loadModels() {
    try {
      const res = await fetch("/models", { headers: { Accept: "application/json" } });
      const body = await res.json();
      const names = body.models.map((m) => m.name).filter((n) => n);
      if (!names.length) throw new Error("no model named yet");
      const was = picked();
      ui.pick.replaceChildren(...body.models.filter((m) => m.name).map((m) => {
        const versions = m.versions.map((v) => `v${v.version}${v.traffic_percent < 100 ? ` ${v.traffic_percent}%` : ""}`);
        const text = `${m.name}${m.default ? " (default)" : ""}${versions.length ? ` · ${versions.join(", ")}` : ` · ${m.state}`}`;
        return el("option", { value: m.name, "data-state": m.state }, text);
      }));
      if (was && names.includes(was)) ui.pick.value = was;
      ui.pick.disabled = names.length < 2;
    } catch (err) {
      setTimeout(loadModels, 3000);
    }
  }

  ui.pick.addEventListener("change", () => {
    ui.model.dataset.state = "loading";
    loadModel();
  });

  async function loadModel() {
    let body;
    try {
      const res = await fetch(withModel("/model"), { headers: { Accept: "application/json" } });
      body = await res.json();
      if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    } catch (err) {
      ui.model.dataset.state = "error";
      ui.summary.textContent = `Could not load the model description: ${err.message}`;
      setTimeout(loadModel, 3000);
      return;
    }
    state.model = body;
    renderModel(body);
  }

  function renderModel(body) {
    const m = body.model;
    const [c, h, w] = m.input_size;
    const [ph, pw] = m.patch_size;
    const patch = ph === pw ? `${ph}` : `${ph}×${pw}`;
    ui.summary.textContent =
      `${h}×${w} input, patch ${patch} → ${m.num_patches} patches of ${m.patch_dim} values → ` +
      `${m.embed_dim}-dim embeddings`;
    const prefix = [];
    if (m.has_class_token) prefix.push("CLS");
    const distill = m.num_prefix_tokens - (m.has_class_token ? 1 : 0) - m.num_register_tokens;
    if (distill > 0) prefix.push(`${distill} distillation`);
    if (m.num_register_tokens) prefix.push(`${m.num_register_tokens} registers`);
    const rows = [
      ["name", "Model", m.name],
      ["architecture", "Architecture", `${m.architecture} (${m.model_class})`],
      ["input_size", "Input size", `${h}×${w}, ${c} channels`],
      ["patch_size", "Patch size", `${ph}×${pw}`],
      ["grid", "Grid", `${dims(m.grid)} (rows × cols)`],
      ["num_patches", "Patches", m.num_patches],
      ["patch_dim", "Patch dim", `${m.patch_dim} = ${c}·${ph}·${pw} (C·P·P)`],
      ["embed_dim", "Embedding dim", m.embed_dim],
      ["depth", "Depth (blocks)", m.depth],
      ["num_heads", "Heads", m.num_heads],
      ["num_prefix_tokens", "Prefix tokens", `${m.num_prefix_tokens}${prefix.length ? ` (${prefix.join(", ")})` : ""}`],
      ["sequence_length", "Sequence length", m.sequence_length],
      ["position_embedding", "Position embedding",
        `${m.position_embedding_kind}${m.position_embedding_shape ? ` [${m.position_embedding_shape.join(", ")}]` : ""}`],
      ["num_params", "Parameters", Number(m.num_params).toLocaleString("en-US")],
      ["version", "Version", m.version],
      ["dtype", "dtype", m.dtype],
      ["device", "Device", m.device],
      ["classes", "Classes", body.labels.length],
    ];
    ui.fields.replaceChildren();
    for (const [key, label, value] of rows) {
      ui.fields.append(el("dt", {}, label), el("dd", { "data-field": key }, String(value)));
    }
    ui.topK.max = String(body.labels.length);
    ui.topK.value = String(Math.min(body.defaults.top_k, body.labels.length));
    const mode = document.querySelector(`input[name=attention][value="${body.defaults.attention}"]`);
    if (mode) mode.checked = true;
    ui.model.dataset.state = "ready";
  }

  // --- picking files -----------------------------------------------------------------------
  function take(files, started) {
    const list = [...files];
    if (list.length) classify(list, started);
  }

  ui.drop.addEventListener("click", () => ui.input.click());
  ui.drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      ui.input.click();
    }
  });
  for (const type of ["dragenter", "dragover"]) {
    ui.drop.addEventListener(type, (e) => {
      e.preventDefault();
      ui.drop.classList.add("over");
    });
  }
  ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
  ui.drop.addEventListener("drop", (e) => {
    const started = performance.now();
    e.preventDefault();
    ui.drop.classList.remove("over");
    take(e.dataTransfer.files, started);
  });
  // A file dropped next to the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  ui.input.addEventListener("change", () => {
    const started = performance.now();
    take(ui.input.files, started);
    ui.input.value = "";
  });
  document.addEventListener("paste", (e) => {
    const started = performance.now();
    const files = [...(e.clipboardData ? e.clipboardData.files : [])].map((f, i) =>
      f.name && f.name !== "image.png" ? f
        : new File([f], `pasted-${i + 1}.${(f.type.split("/")[1] || "png")}`, { type: f.type }));
    if (files.length) {
      e.preventDefault();
      take(files, started);
    }
  });
  let rerun;
  $("#controls").addEventListener("change", (e) => {
    if (e.target === ui.input || e.target.name === "ink" || !state.files.length) return;
    clearTimeout(rerun);
    rerun = setTimeout(() => classify(state.files, performance.now()), 250);
  });
  $("#controls").addEventListener("submit", (e) => e.preventDefault());

  function options() {
    const max = state.model ? state.model.labels.length : 1000;
    const k = Math.min(Math.max(parseInt(ui.topK.value, 10) || 5, 1), max);
    ui.topK.value = String(k);
    return { top_k: String(k), attention: $("input[name=attention]:checked").value, heatmap: "true" };
  }

  // Split into requests that respect the service's per-request limits.
  function chunks(files) {
    const lim = state.model ? state.model.batching.max_images_per_request : 32;
    const bytes = (state.model ? state.model.limits.max_body_bytes : 64 << 20) - (64 << 10);
    const out = [];
    let cur = [];
    let size = 0;
    files.forEach((file, index) => {
      if (cur.length && (cur.length >= lim || size + file.size > bytes)) {
        out.push(cur);
        cur = [];
        size = 0;
      }
      cur.push({ file, index });
      size += file.size;
    });
    if (cur.length) out.push(cur);
    return out;
  }

  // --- drawing pad: mouse, touch and pen through pointer events -----------------------------
  // Strokes are kept as points so switching the ink repaints the same drawing; each lifted
  // stroke sends the whole pad as a PNG, which is then shown exactly like an upload.
  const pad = {
    canvas: $("#pad"), clear: $("#pad-clear"), strokes: [], active: null, seq: 0,
  };
  pad.ctx = pad.canvas.getContext("2d");
  const inkColors = () => ($("input[name=ink]:checked").value === "light"
    ? { paper: "#000", ink: "#fff" } : { paper: "#fff", ink: "#000" });

  function padPaint() {
    const { ctx, canvas } = pad;
    const { paper, ink } = inkColors();
    canvas.style.background = paper;
    ctx.fillStyle = paper;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = ink;
    ctx.fillStyle = ink;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    // A pen about as wide as a marker on paper: 1/15 of the pad.
    ctx.lineWidth = canvas.width / 15;
    for (const points of pad.strokes) {
      ctx.beginPath();
      if (points.length === 1) {
        ctx.arc(points[0][0], points[0][1], ctx.lineWidth / 2, 0, 2 * Math.PI);
        ctx.fill();
        continue;
      }
      ctx.moveTo(points[0][0], points[0][1]);
      for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
      ctx.stroke();
    }
  }

  function padPoint(e) {
    const r = pad.canvas.getBoundingClientRect();
    return [
      ((e.clientX - r.left) * pad.canvas.width) / r.width,
      ((e.clientY - r.top) * pad.canvas.height) / r.height,
    ];
  }

  function padSend() {
    if (!pad.strokes.length) return;
    const started = performance.now();
    const name = `drawing-${++pad.seq}.png`;
    pad.canvas.toBlob((blob) => {
      if (blob) classify([new File([blob], name, { type: "image/png" })], started);
    }, "image/png");
  }

  pad.canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 && e.pointerType === "mouse") return;
    e.preventDefault();
    pad.canvas.setPointerCapture(e.pointerId);
    pad.active = { id: e.pointerId, points: [padPoint(e)] };
    pad.strokes.push(pad.active.points);
    padPaint();
  });
  pad.canvas.addEventListener("pointermove", (e) => {
    if (!pad.active || e.pointerId !== pad.active.id) return;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of events.length ? events : [e]) pad.active.points.push(padPoint(ev));
    padPaint();
  });
  for (const type of ["pointerup", "pointercancel"]) {
    pad.canvas.addEventListener(type, (e) => {
      if (!pad.active || e.pointerId !== pad.active.id) return;
      pad.active = null;
      padSend();
    });
  }
  pad.clear.addEventListener("click", () => {
    pad.strokes = [];
    pad.active = null;
    padPaint();
    pad.canvas.focus();
  });
  pad.canvas.addEventListener("keydown", (e) => {
    if (e.key === "Delete" || e.key === "Backspace" || e.key === "Escape") {
      e.preventDefault();
      pad.clear.click();
    }
  });
  for (const radio of document.querySelectorAll("input[name=ink]")) {
    radio.addEventListener("change", () => {
      padPaint();
      padSend();
    });
  }
  padPaint();

  // --- classify ----------------------------------------------------------------------------
  async function classify(files, started) {
    const run = ++state.run;
    state.files = files;
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [];
    delete ui.results.dataset.dropToResultMs;
    ui.results.dataset.state = "loading";
    const opts = options();
    const cards = files.map((file) => newCard(file));
    ui.results.replaceChildren(...cards.map((c) => c.root));
    ui.status.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`;
    const batch = files.length > 1;
    await Promise.all(chunks(files).map(async (group) => {
      const form = new FormData();
      for (const [k, v] of Object.entries(opts)) form.append(k, v);
      for (const { file } of group) form.append(batch ? "images" : "image", file, file.name);
      let answers;
      try {
        const res = await fetch(withModel(batch ? "/classify_batch" : "/classify"), { method: "POST", body: form });
        const body = await res.json().catch(() => null);
        if (run !== state.run) return;
        if (!res.ok) {
          const slot = {
            status: res.status,
            error: (body && body.error) || { code: `http_${res.status}`, message: res.statusText },
          };
          answers = group.map(() => slot);
        } else {
          answers = batch ? body : [body];
        }
      } catch (err) {
        if (run !== state.run) return;
        const slot = { status: 0, error: { code: "network", message: `Could not reach the service (${err.message}).` } };
        answers = group.map(() => slot);
      }
      await Promise.all(group.map(({ index }, i) => {
        const card = cards[index];
        return answers[i] && answers[i].error
          ? showError(card, answers[i])
          : showResult(card, answers[i], started);
      }));
    }));
    if (run !== state.run) return;
    const ms = performance.now() - started;
    const bad = cards.filter((c) => c.root.dataset.state === "error").length;
    ui.results.dataset.dropToResultMs = fmt(ms);
    ui.results.dataset.state = "done";
    ui.status.textContent =
      `${files.length - bad} result${files.length - bad === 1 ? "" : "s"}` +
      `${bad ? `, ${bad} error${bad > 1 ? "s" : ""}` : ""} in ${fmt(ms, 0)} ms (drop to result).`;
  }

  function newCard(file) {
    const root = ui.card.content.firstElementChild.cloneNode(true);
    const card = {
      root, file,
      name: $(".name", root), meta: $(".meta", root), stage: $(".stage", root),
      orig: $(".orig", root), heat: $(".heat", root), svg: $(".grid", root), tip: $(".tip", root),
      ctl: $(".viz-ctl", root), info: $(".info", root), patchInfo: $(".patch-info", root),
    };
    root.dataset.filename = file.name;
    card.name.textContent = file.name || "(unnamed)";
    card.meta.textContent = `${file.type || "unknown type"}, ${file.size.toLocaleString("en-US")} bytes`;
    const url = URL.createObjectURL(file);
    state.urls.push(url);
    card.orig.alt = `Uploaded image ${file.name}`;
    card.orig.addEventListener("error", () => { $(".viz", root).hidden = true; }, { once: true });
    card.orig.src = url;
    return card;
  }

  function showError(card, slot) {
    const { root, info } = card;
    const { code, message } = slot.error;
    root.dataset.state = "error";
    const box = el("div", {
      class: "error", role: "alert", "data-testid": "error",
      "data-status": String(slot.status), "data-code": code,
    });
    box.append(
      el("strong", {}, TITLES[slot.status] || "The request failed"),
      el("p", {}, message),
      el("p", { class: "code" }, `HTTP ${slot.status || "—"} · ${code}`),
    );
    info.replaceChildren(box);
    card.ctl.hidden = true;
  }

  async function showResult(card, a, started) {
    const { root, info } = card;
    const { width: W, height: H } = a.image;
    root.dataset.state = "ok";
    root.dataset.top1 = a.predictions[0].label;
    card.meta.textContent = `${W}×${H} ${a.image.format} ${a.image.mode}, ${card.file.size.toLocaleString("en-US")} bytes`;
    card.stage.hidden = false;
    card.stage.style.setProperty("--ar", `${W / H}`);

    // Predictions as labelled bars.
    const preds = el("ol", { class: "preds", "data-testid": "predictions" });
    for (const p of a.predictions) {
      const li = el("li", { "data-testid": "prediction", "data-label": p.label, "data-score": String(p.score) });
      const bar = el("span", { class: "bar", "aria-hidden": "true" });
      bar.style.setProperty("--w", pct(p.score));
      li.append(el("span", { class: "label" }, p.label), bar, el("span", { class: "pct" }, pct(p.score)));
      preds.append(li);
    }
    const parts = [el("h4", {}, "Predictions"), preds];

    if (a.attention) {
      drawGrid(card, a);
      parts.push(topTable(a));
    }
    parts.push(timingList(a));
    info.replaceChildren(...parts);

    if (a.attention && a.attention.heatmap_png) {
      card.heat.src = `data:image/png;base64,${a.attention.heatmap_png}`;
      card.heat.alt = `Attention heatmap (${a.attention.mode}) over ${card.file.name}`;
      card.heat.hidden = false;
      card.ctl.hidden = false;
      wireControls(card);
      try { await card.heat.decode(); } catch { /* shown as broken image */ }
    }
    const ms = performance.now() - started;
    root.dataset.renderMs = fmt(ms);
    const client = el("p", { class: "client", "data-testid": "client-ms" },
      `In the browser, drop → rendered result: ${fmt(ms, 0)} ms`);
    info.append(client);
  }

  function wireControls(card) {
    const show = $(".show-heat", card.root);
    const opacity = $(".opacity", card.root);
    const grid = $(".show-grid", card.root);
    const apply = () => {
      card.heat.style.opacity = show.checked ? opacity.value : "0";
      opacity.disabled = !show.checked;
      card.svg.classList.toggle("nogrid", !grid.checked);
    };
    show.addEventListener("change", apply);
    opacity.addEventListener("input", apply);
    grid.addEventListener("change", apply);
    apply();
  }

  // Patch grid in the upload's own pixels: patch (r, c) spans crop_box split into grid cells.
  function drawGrid(card, a) {
    const { svg, tip, patchInfo } = card;
    const { width: W, height: H } = a.image;
    const [x0, y0, x1, y1] = a.patches.crop_box;
    const [rows, cols] = a.attention.grid;
    const cw = (x1 - x0) / cols;
    const ch = (y1 - y0) / rows;
    const weights = a.attention.weights;
    const rank = new Map(a.patches.top.map((t, i) => [t.index, i + 1]));
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.dataset.cropBox = a.patches.crop_box.join(",");
    svg.setAttribute("role", "group");
    svg.setAttribute("aria-label",
      `Patch grid, ${rows} rows by ${cols} columns; arrow keys move between patches`);
    svg.removeAttribute("aria-hidden");
    svg.replaceChildren();
    svg.append(el("svg:rect", {
      class: "crop", x: x0, y: y0, width: x1 - x0, height: y1 - y0, "vector-effect": "non-scaling-stroke",
    }));
    const cells = [];
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const index = r * cols + c;
        const w = weights[r][c];
        const cell = el("svg:rect", {
          class: "cell", x: x0 + c * cw, y: y0 + r * ch, width: cw, height: ch,
          tabindex: index === 0 ? "0" : "-1", "data-testid": "patch-cell",
          "data-index": index, "data-row": r, "data-col": c, "data-attention": w,
          "vector-effect": "non-scaling-stroke", role: "img",
          "aria-label": `Patch ${index}, row ${r}, column ${c}, attention ${fmt(w, 4)}` +
            (rank.has(index) ? `, top ${rank.get(index)}` : ""),
        });
        cells.push(cell);
        svg.append(cell);
      }
    }
    for (const t of a.patches.top) {
      const [bx0, by0, bx1, by1] = t.box;
      svg.append(el("svg:rect", {
        class: "top", x: bx0, y: by0, width: bx1 - bx0, height: by1 - by0,
        "data-testid": "top-patch", "data-index": t.index, "vector-effect": "non-scaling-stroke",
      }));
      const size = Math.min(bx1 - bx0, by1 - by0) * 0.3;
      svg.append(el("svg:text", {
        class: "rank", x: bx0 + size * 0.25, y: by0 + size * 1.05, "font-size": size,
      }, String(rank.get(t.index))));
    }
    svg.removeAttribute("hidden");

    const describe = (cell) => {
      const d = cell.dataset;
      const r = rank.has(+d.index) ? ` · top ${rank.get(+d.index)}` : "";
      return `Patch ${d.index} · row ${d.row}, col ${d.col} · attention ${fmt(d.attention, 4)} (${pct(d.attention)})${r}`;
    };
    const show = (cell) => {
      const text = describe(cell);
      tip.textContent = text;
      const c = +cell.dataset.col;
      const r = +cell.dataset.row;
      tip.style.left = `${((x0 + (c + 0.5) * cw) / W) * 100}%`;
      tip.style.top = `${((y0 + (r + 1) * ch) / H) * 100}%`;
      tip.classList.toggle("up", r >= rows / 2);
      if (r >= rows / 2) tip.style.top = `${((y0 + r * ch) / H) * 100}%`;
      tip.hidden = false;
      patchInfo.textContent = text;
    };
    const hide = () => { tip.hidden = true; };
    svg.addEventListener("pointerover", (e) => { if (e.target.classList.contains("cell")) show(e.target); });
    svg.addEventListener("pointerleave", hide);
    svg.addEventListener("focusin", (e) => { if (e.target.classList.contains("cell")) show(e.target); });
    svg.addEventListener("focusout", hide);
    svg.addEventListener("keydown", (e) => {
      const cell = e.target;
      if (!cell.classList.contains("cell")) return;
      let r = +cell.dataset.row;
      let c = +cell.dataset.col;
      const moves = {
        ArrowLeft: () => { c = Math.max(0, c - 1); }, ArrowRight: () => { c = Math.min(cols - 1, c + 1); },
        ArrowUp: () => { r = Math.max(0, r - 1); }, ArrowDown: () => { r = Math.min(rows - 1, r + 1); },
        Home: () => { r = 0; c = 0; }, End: () => { r = rows - 1; c = cols - 1; },
      };
      if (!moves[e.key]) return;
      e.preventDefault();
      moves[e.key]();
      const next = cells[r * cols + c];
      cell.setAttribute("tabindex", "-1");
      next.setAttribute("tabindex", "0");
      next.focus();
    });
  }

  function topTable(a) {
    const wrap = el("div", { class: "scroll" });
    const table = el("table", { class: "top-t", "data-testid": "top-patches" });
    table.append(el("caption", {}, `Most-attended patches (${a.attention.mode})`));
    const head = el("tr");
    for (const h of ["#", "Patch", "Row, col", "Attention", "Box (px)"]) head.append(el("th", { scope: "col" }, h));
    const thead = el("thead");
    thead.append(head);
    table.append(thead);
    const body = el("tbody");
    a.patches.top.forEach((t, i) => {
      const tr = el("tr", { "data-index": t.index });
      const [bx0, by0, bx1, by1] = t.box.map((x) => fmt(x, 0));
      for (const v of [i + 1, t.index, `${t.row}, ${t.col}`, pct(t.attention), `${bx0},${by0}–${bx1},${by1}`]) {
        tr.append(el("td", {}, String(v)));
      }
      body.append(tr);
    });
    table.append(body);
    wrap.append(table);
    return wrap;
  }

  function timingList(a) {
    const t = a.timing_ms;
    const box = el("div", { class: "timing" });
    const dl = el("dl", { class: "kv small", "data-testid": "timing" });
    // Which version answered: a load swaps versions while the page is open.
    dl.append(el("dt", {}, "answered by"),
      el("dd", { "data-field": "model_version" }, `${a.model.name} version ${a.model.version}`));
    if (a.cache) dl.append(el("dt", {}, "cache"), el("dd", { "data-field": "cache" }, a.cache));
    for (const k of ["decode", "queue", "inference", "postprocess", "total"]) {
      dl.append(el("dt", {}, k), el("dd", { "data-field": k }, `${fmt(t[k])} ms`));
    }
    dl.append(el("dt", {}, "batch size"), el("dd", { "data-field": "batch_size" }, String(t.batch_size)));
    box.append(el("h4", {}, "Server timing"), dl);
    return box;
  }

  loadModels();
  loadModel();
})();
