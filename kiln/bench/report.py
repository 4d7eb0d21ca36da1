"""What a benchmark prints and writes: text tables, the JSON report and the engine plot."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.bench.engine import PHASES
from kiln.errors import KilnError
from kiln.figures import new_figure, save_figure
from kiln.fsutil import atomic_write_json

Table = tuple[list[str], list[list[str]], list[str]]


def _fmt(value: float | None) -> str:
    """Three significant digits below 100, whole numbers (with separators) above."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ms(stats: dict[str, float] | None, key: str) -> str:
    return f"{stats[key]:.2f}" if stats else "-"


def engine_table(report: dict[str, Any]) -> Table:
    """(header, rows, notes) of an engine report; notes list the skipped combinations once each."""
    header = ["backend", "precision", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "items/s",
              "speedup"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for r in report["results"]:
        if r["status"] != "ok":
            note = f"skipped {r['backend']} {r['precision']}" + (
                f" batch {r['batch']}" if "batch" in (r.get("reason") or "") else "") + f": {r.get('reason')}"
            if note not in notes:
                notes.append(note)
            continue
        lat = r["latency_ms"]
        name = r["backend"] + (" (baseline)" if r.get("requested") == "baseline" else "")
        speed = "1.00x (ref)" if r.get("baseline") else (f"{r['speedup']:.2f}x" if r.get("speedup") else "-")
        rows.append([name, r["precision"], r.get("device") or "-", str(r["batch"]), _fmt(lat["p50"]),
                     _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["mean"]), _fmt(r["throughput"]), speed])
    for r in report["results"]:
        if r["status"] == "ok" and r.get("phases_ms"):
            ph = r["phases_ms"]
            notes.append(f"{r['backend']} {r['precision']} batch {r['batch']} phases (p50 ms): " + ", ".join(
                f"{k} {_fmt(ph[k]['p50'])}" for k in PHASES if k in ph))
    return header, rows, notes


def engine_title(report: dict[str, Any]) -> str:
    env = report["environment"]
    where = env.get("gpu") or env.get("cpu")
    cfg = report["config"]
    timed = f"{cfg['iters']} iters" if cfg.get("iters") else f"{cfg['duration_s']} s"
    return (f"kiln bench {report['bundle']} on {where} "
            f"({timed} after {cfg['warmup']} warm-up, {cfg['inputs']})")


def load_table(report: dict[str, Any]) -> Table:
    """(header, rows, notes) of a server report: one row per level, batch sizes and warnings as notes."""
    header = ["level", "requests", "req/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "errors", "batch mean",
              "client cpu"]
    rows: list[list[str]] = []
    notes: list[str] = []
    for lv in report["levels"]:
        mode = lv["mode"]
        label = f"c={lv[mode]:g}" if mode == "concurrency" else f"rate={lv[mode]:g}/s"
        lat = lv["latency_ms"]
        errors = ", ".join(f"{k}:{v}" for k, v in lv["errors"].items()) or "0"
        sb = lv.get("server_batch_size")
        mean = f"{sb['mean']:.2f}" if sb and sb.get("mean") is not None else "-"
        rows.append([label, str(lv["requests"]), f"{lv['ok_per_s']:.1f}", _ms(lat, "p50"), _ms(lat, "p90"),
                     _ms(lat, "p95"), _ms(lat, "p99"), errors, mean, f"{lv['client_cpu_fraction']:.0%}"])
        if sb and sb["distribution"]:
            notes.append(f"{label} server batch sizes: "
                         + ", ".join(f"{d['range']}: {d['batches']}" for d in sb["distribution"]))
        elif lv.get("metrics_note"):
            notes.append(f"{label}: {lv['metrics_note']}")
    notes.extend(f"warning: {w}" for w in report["warnings"])
    return header, rows, notes


def load_title(report: dict[str, Any]) -> str:
    cfg = report["config"]
    server = report["server"].get("parameters") or {}
    where = f"{server.get('backend', '?')} {server.get('precision', '')}".strip()
    procs = cfg["client_procs"]
    return (f"kiln bench {cfg['url']} model {cfg['model']} ({cfg['protocol']}, {where}; {cfg['duration']:g} "
            f"s per level; {procs} client process{'es' if procs > 1 else ''}; client cpu in % of one core; "
            f"client and server share {os.cpu_count()} cores if on one machine)")


def render_table(title: str, header: list[str], rows: list[list[str]], notes: Sequence[str] = (),
                 use_rich: bool | None = None, left: int = 3) -> str:
    """The table as text: rich's rendering when rich is installed (and not disabled), else plain columns.

    The first ``left`` columns are labels (left-aligned); the others are numbers (right-aligned).
    """
    if use_rich is None:
        use_rich = _has_rich()
    text = _rich_table(title, header, rows, left) if use_rich else _plain_table(title, header, rows, left)
    return text + "".join(f"  {n}\n" for n in notes)


def _plain_table(title: str, header: list[str], rows: list[list[str]], left: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join(
        [title, line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]) + "\n"


def _rich_table(title: str, header: list[str], rows: list[list[str]], left: int) -> str:
    from rich.console import Console
    from rich.table import Table as RichTable

    table = RichTable(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False).print(table)
    return buf.getvalue()


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    atomic_write_json(Path(path), report)


def plot_engine(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Latency (p50 solid, p99 dashed) and throughput against batch size, one line per backend."""
    series: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        if r["status"] == "ok":
            series.setdefault(f"{r['backend']} {r['precision']} ({r.get('device')})", []).append(r)
    if not series:
        raise KilnError("nothing to plot: every combination was skipped")
    fig = new_figure(figsize=(11, 4.2))
    ax_lat, ax_tp = fig.subplots(1, 2)
    batches = sorted({r["batch"] for rows in series.values() for r in rows})
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        line = ax_lat.plot(xs, [r["latency_ms"]["p50"] for r in rows], marker="o", label=f"{label} p50")[0]
        ax_lat.plot(xs, [r["latency_ms"]["p99"] for r in rows], linestyle="--", linewidth=1,
                    color=line.get_color(), label=f"{label} p99")
        ax_tp.plot(xs, [r["throughput"] for r in rows], marker="o", label=label, color=line.get_color())
    for ax, ylabel in ((ax_lat, "latency ms (solid p50, dashed p99)"), (ax_tp, "throughput items/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_tp.legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"{Path(report['bundle']).name} on {env.get('gpu') or env.get('cpu')}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
