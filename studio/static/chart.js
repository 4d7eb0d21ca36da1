// kiln chart: line charts on a <canvas>, no library. KilnChart.draw(canvas, {series, xLabel, yLabel, title})
// series: [{name, color, points: [[x, y], ...], dashed, dots}]. Redraw with the whole data each time.
"use strict";
(function (global) {
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toFixed(10));
    return ticks;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return String(+v.toPrecision(4));
  }

  function draw(canvas, opts) {
    const dpr = global.devicePixelRatio || 1;
    const w = canvas.clientWidth || 480, h = canvas.clientHeight || 260;
    canvas.width = w * dpr; canvas.height = h * dpr;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "12px system-ui, sans-serif";
    const series = (opts.series || []).filter((s) => s.points && s.points.length);
    const pad = { l: 52, r: 12, t: opts.title || series.length ? 26 : 10, b: 34 };
    if (opts.title) { ctx.fillStyle = "#222"; ctx.fillText(opts.title, pad.l, 14); }
    const pts = series.flatMap((s) => s.points);
    if (!pts.length) {
      ctx.fillStyle = "#888"; ctx.fillText(opts.empty || "no data yet", pad.l + 10, h / 2);
      return;
    }
    let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
    let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
    if (opts.xMin !== undefined) x0 = Math.min(x0, opts.xMin);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const ym = (y1 - y0) * 0.05; y0 -= ym; y1 += ym;
    const X = (x) => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
    const Y = (y) => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
    ctx.strokeStyle = "#e4e4e4"; ctx.fillStyle = "#555"; ctx.lineWidth = 1;
    for (const t of niceTicks(y0, y1, 5)) {
      ctx.beginPath(); ctx.moveTo(pad.l, Y(t)); ctx.lineTo(w - pad.r, Y(t)); ctx.stroke();
      ctx.fillText(fmt(t), 4, Y(t) + 4);
    }
    const xt = niceTicks(x0, x1, 6).filter((t) => !opts.xInteger || Number.isInteger(t));
    for (const t of xt) {
      ctx.beginPath(); ctx.moveTo(X(t), pad.t); ctx.lineTo(X(t), h - pad.b); ctx.stroke();
      ctx.fillText(fmt(t), X(t) - 8, h - pad.b + 14);
    }
    ctx.fillStyle = "#333";
    if (opts.xLabel) ctx.fillText(opts.xLabel, w / 2 - 20, h - 4);
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = s.width || 2;
      ctx.setLineDash(s.dashed ? [5, 4] : []);
      ctx.beginPath();
      s.points.forEach((p, j) => (j ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
      ctx.stroke();
      ctx.setLineDash([]);
      if (s.dots !== false && s.points.length < 60) {
        for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3, 0, 7); ctx.fill(); }
      }
    });
    // legend on the title line, right-aligned
    let lx = w - pad.r;
    for (let i = series.length - 1; i >= 0; i--) {
      const s = series[i], label = s.name || "";
      const tw = ctx.measureText(label).width;
      lx -= tw;
      ctx.fillStyle = "#222"; ctx.fillText(label, lx, 14);
      ctx.fillStyle = s.color || PALETTE[i % PALETTE.length];
      ctx.fillRect(lx - 18, 9, 14, 4);
      lx -= 30;
    }
    canvas.dataset.points = String(pts.length);
  }

  global.KilnChart = { draw, PALETTE };
})(window);
