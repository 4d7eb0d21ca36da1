// kiln test panel: drop or pick images, see top-k bars (classification) or boxes in a colour per class with
// score and IoU sliders that re-filter the boxes in the page, no new request (detection), and each
// image's latency. One component for the studio and for kiln serve's page:
//   KilnTestPanel.mount(element, {predict: async (files) => ({task, backend, precision, results: [...]}),
//                                 score: 0.25, iou: 0.45})
// results[i]: {name, width, height, ms, top_k: [{label, score}]} or {..., boxes: [{box, label, index, score}]}
// or {name, error}. Detection answers should carry boxes before NMS (iou 1.0) and under a low score.
"use strict";
(function (global) {
  const COLOURS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#d2f53c",
    "#fabebe", "#008080", "#aa6e28", "#800000", "#808000", "#000080"];

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const c of children) if (c) e.append(c);
    return e;
  }

  function iou(a, b) {
    const ix = Math.max(0, Math.min(a[2], b[2]) - Math.max(a[0], b[0]));
    const iy = Math.max(0, Math.min(a[3], b[3]) - Math.max(a[1], b[1]));
    const inter = ix * iy;
    const area = (r) => Math.max(0, r[2] - r[0]) * Math.max(0, r[3] - r[1]);
    return inter / Math.max(1e-9, area(a) + area(b) - inter);
  }

  // boxes over `score`, then per-class NMS at `iouMax` (greedy, best first), as the server does it
  function filterBoxes(boxes, score, iouMax) {
    const kept = [];
    const sorted = boxes.filter((d) => d.score >= score).sort((p, q) => q.score - p.score);
    for (const d of sorted) {
      if (!kept.some((k) => k.index === d.index && iou(k.box, d.box) > iouMax)) kept.push(d);
    }
    return kept;
  }

  function mount(root, opts) {
    root.classList.add("kiln-test");
    const input = el("input", { type: "file", accept: "image/*", multiple: "", class: "kt-file" });
    const drop = el("div", { class: "kt-drop", tabindex: "0" },
      el("span", { text: "Drop images here, paste them, or " }), el("label", { class: "kt-pick" }, "choose files", input));
    const score = el("input", { type: "range", min: "0", max: "1", step: "0.01", value: String(opts.score ?? 0.25), class: "kt-score" });
    const iouIn = el("input", { type: "range", min: "0", max: "1", step: "0.01", value: String(opts.iou ?? 0.45), class: "kt-iou" });
    const scoreV = el("span"), iouV = el("span");
    const controls = el("div", { class: "kt-controls", hidden: "" },
      el("label", {}, "score ≥ ", score, scoreV), el("label", {}, "NMS IoU ≤ ", iouIn, iouV));
    const status = el("div", { class: "kt-status" });
    const grid = el("div", { class: "kt-results" });
    root.replaceChildren(drop, controls, status, grid);
    let shown = [];

    function render() {
      scoreV.textContent = " " + (+score.value).toFixed(2); iouV.textContent = " " + (+iouIn.value).toFixed(2);
      for (const item of shown) item.paint();
    }
    score.addEventListener("input", render);
    iouIn.addEventListener("input", render);

    async function run(files) {
      files = [...files].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp|gif|webp|tiff?)$/i.test(f.name));
      if (!files.length) return;
      status.textContent = `predicting ${files.length} image(s)...`;
      status.classList.remove("kt-error");
      let body;
      try { body = await opts.predict(files); } catch (e) {
        status.textContent = String(e.message || e); status.classList.add("kt-error"); return;
      }
      status.textContent = `${body.results.length} image(s), ${body.backend || ""} ${body.precision || ""}`;
      controls.hidden = body.task !== "detect";
      shown = body.results.map((r, i) => card(r, files[i], body.task));
      grid.replaceChildren(...shown.map((s) => s.node));
      render();
    }

    function card(res, file, task) {
      const node = el("div", { class: "kt-card" });
      const title = el("div", { class: "kt-name", text: res.name || file.name });
      const lat = el("div", { class: "kt-ms", text: res.ms !== undefined ? `${res.ms.toFixed(1)} ms` : "" });
      const canvas = el("canvas", { class: "kt-canvas" });
      const out = el("div", { class: "kt-out" });
      node.append(title, canvas, lat, out);
      if (res.error) { out.append(el("div", { class: "kt-error", text: res.error })); return { node, paint() {} }; }
      const img = new Image();
      const url = URL.createObjectURL(file);
      img.src = url;
      let ready = false;
      img.onload = () => { ready = true; paint(); URL.revokeObjectURL(url); };
      function paint() {
        if (!ready) return;
        const scale = Math.min(320 / img.naturalWidth, 320 / img.naturalHeight, 8);
        canvas.width = Math.round(img.naturalWidth * scale); canvas.height = Math.round(img.naturalHeight * scale);
        const ctx = canvas.getContext("2d");
        ctx.imageSmoothingEnabled = scale < 1;
        ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
        out.replaceChildren();
        if (task === "detect") {
          const sx = canvas.width / res.width, sy = canvas.height / res.height;
          const kept = filterBoxes(res.boxes || [], +score.value, +iouIn.value);
          ctx.lineWidth = 2; ctx.font = "12px system-ui, sans-serif";
          for (const d of kept) {
            const c = COLOURS[d.index % COLOURS.length];
            const [x1, y1, x2, y2] = d.box;
            ctx.strokeStyle = c; ctx.strokeRect(x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy);
            const text = `${d.label} ${d.score.toFixed(2)}`;
            ctx.fillStyle = c; ctx.fillRect(x1 * sx, Math.max(0, y1 * sy - 14), ctx.measureText(text).width + 6, 14);
            ctx.fillStyle = "#fff"; ctx.fillText(text, x1 * sx + 3, Math.max(11, y1 * sy - 3));
          }
          out.append(el("div", { class: "kt-count", text: `${kept.length} object(s)` }));
          for (const d of kept) {
            const row = el("div", { class: "kt-box" }, el("span", { class: "kt-swatch" }), el("span", { text: `${d.label} ${d.score.toFixed(3)}` }));
            row.firstChild.style.background = COLOURS[d.index % COLOURS.length];
            out.append(row);
          }
        } else {
          for (const r of res.top_k || []) {
            const bar = el("div", { class: "kt-bar-fill" });
            bar.style.width = `${Math.max(0.5, 100 * r.score).toFixed(1)}%`;
            out.append(el("div", { class: "kt-bar" }, el("span", { class: "kt-label", text: r.label }),
              el("div", { class: "kt-bar-track" }, bar), el("span", { class: "kt-score-v", text: `${(100 * r.score).toFixed(1)}%` })));
          }
        }
      }
      return { node, paint };
    }

    // emptied after each pick: the same file can be picked again, and a new pick replaces the last
    input.addEventListener("change", () => { const files = [...input.files]; input.value = ""; run(files); });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("kt-over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("kt-over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("kt-over"); run(e.dataTransfer.files); });
    root.addEventListener("paste", (e) => run([...e.clipboardData.items].filter((i) => i.kind === "file").map((i) => i.getAsFile())));
    return { run, filterBoxes };
  }

  global.KilnTestPanel = { mount, filterBoxes, COLOURS };
})(window);
