"""Turn results into a console table, results.json and chart.png."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SERVERS = ("tabserve", "tabpy")
# The bare Tornado reference server (bench.ceiling), run beside the small-call workloads.
CEILING = "ceiling"
# Metrics shown per workload kind, and whether bigger is better (for the speed-up column).
METRICS: dict[str, list[tuple[str, bool]]] = {
    "throughput": [("rps", True), ("p50_ms", False), ("p99_ms", False)],
    "latency": [("p50_ms", False), ("p99_ms", False)],
    "memory": [("peak_pss_mb", False), ("peak_rss_mb", False), ("idle_rss_mb", False)],
}


def machine_info() -> dict[str, Any]:
    """CPU count and model, so figures from different machines are never mixed up."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load: other work on a shared machine skews absolute figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def metrics_for(entry: dict[str, Any]) -> list[tuple[str, bool]]:
    if entry.get("group") == "w9":
        return METRICS["memory"]
    return METRICS.get(entry["kind"], METRICS["latency"])


def _val(d: dict[str, Any] | None, key: str) -> float | None:
    if not d or "error" in d:
        return None
    v = d.get(key)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def add_ratios(entry: dict[str, Any]) -> None:
    """ratio = tabserve / TabPy for every headline metric (n/a when either side is missing);
    ``ceiling_share`` = tabserve's req/s / the bare Tornado server's, where that one ran."""
    ts, tp = entry["servers"].get("tabserve"), entry["servers"].get("tabpy")
    ratios: dict[str, float | None] = {}
    for metric, _ in metrics_for(entry):
        a, b = _val(ts, metric), _val(tp, metric)
        ratios[metric] = round(a / b, 3) if a is not None and b else None
    if CEILING in entry["servers"]:
        a, c = _val(ts, "rps"), _val(entry["servers"][CEILING], "rps")
        ratios["ceiling_share"] = round(a / c, 3) if a is not None and c else None
    entry["ratios"] = ratios


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: absolute figures, tabserve ÷ TabPy, tabserve as a share of the bare
    Tornado ceiling (small calls only), and the issues' targets."""
    head = (
        "| workload | metric | tabserve | TabPy | bare Tornado | tabserve ÷ TabPy "
        "| tabserve ÷ bare Tornado | target | met |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for wid, entry in results["workloads"].items():
        target = entry.get("target")
        servers = entry["servers"]
        for i, (metric, _) in enumerate(metrics_for(entry)):
            ratio = entry.get("ratios", {}).get(metric)
            is_target = target is not None and target["metric"] == metric
            met = entry.get("target_met")
            texts, verdicts = [], []
            if is_target:
                texts.append(target["text"])
                verdicts.append(_verdict(met))
            share = ""
            if metric == "rps" and CEILING in servers:
                value = entry.get("ratios", {}).get("ceiling_share")
                share = "n/a" if value is None else f"{value:.2f}"
                if entry.get("ceiling_target") is not None:
                    texts.append(f"rps >= {entry['ceiling_target']:g} of bare Tornado")
                    verdicts.append(_verdict(entry.get("ceiling_target_met")))
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    f"{wid} {entry['title']}" if i == 0 else "",
                    metric,
                    _cell(servers.get("tabserve"), metric),
                    _cell(servers.get("tabpy"), metric),
                    _cell(servers.get(CEILING), metric) if CEILING in servers else "",
                    "n/a" if ratio is None else f"{ratio:.2f}",
                    share,
                    "; ".join(texts),
                    "; ".join(verdicts),
                )
            )
    errors = [
        f"- {wid} / {name}: {res['error']}"
        for wid, entry in results["workloads"].items()
        for name, res in entry["servers"].items()
        if isinstance(res, dict) and "error" in res
    ]
    if errors:
        lines += ["", "Not measured (n/a):", *errors]
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "yes" if met else "no" if met is False else "?"


def _cell(d: dict[str, Any] | None, metric: str) -> str:
    if d is None:
        return "—"  # server not run at all (e.g. --skip-tabpy)
    if "error" in d:
        return "n/a"
    return _fmt(_val(d, metric))


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def write_chart(results: dict[str, Any], out_dir: Path) -> Path:
    """Four panels: throughput, p50/p99 latency per workload, rows sweep, workers sweep."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI
    import matplotlib.pyplot as plt

    wl = results["workloads"]
    colors = {"tabserve": "#1f77b4", "tabpy": "#ff7f0e", CEILING: "#7f7f7f"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    meta = results["meta"]
    fig.suptitle(
        f"tabserve vs TabPy {meta.get('tabpy_version') or ''} — {meta['machine']['cpu_count']} "
        f"CPUs ({meta['machine']['cpu_model']}), {meta['date']}"
        + (" — SMOKE (not representative)" if meta.get("smoke") else ""),
        fontsize=11,
    )

    # 1. Throughput per throughput workload.
    ax = axes[0][0]
    ids = [k for k, e in wl.items() if e["kind"] == "throughput" and e["group"] != "workers"]
    shown = (*SERVERS, CEILING)
    _grouped_bars(ax, ids, [(s, "rps", colors[s], 1.0) for s in shown], wl)
    ax.set_title("Throughput (req/s, higher is better; grey: bare Tornado ceiling)")
    ax.set_yscale("log")
    for j, wid in enumerate(ids):
        ratio = wl[wid].get("ratios", {}).get("rps")
        if ratio:
            top = max(_val(wl[wid]["servers"].get(s), "rps") or 0 for s in SERVERS)
            ax.annotate(f"×{ratio:.2f}", (j, top), ha="center", va="bottom", fontsize=9)

    # 2. p50 (solid) and p99 (hatched) latency per workload.
    ax = axes[0][1]
    ids = [
        k
        for k, e in wl.items()
        if e["group"] not in ("workers", "rows", "w9") and e["kind"] in ("throughput", "latency")
    ]
    series = []
    for s in SERVERS:
        series += [(s, "p50_ms", colors[s], 1.0), (s, "p99_ms", colors[s], 0.45)]
    _grouped_bars(ax, ids, series, wl)
    ax.set_title("Latency p50 (dark) / p99 (light), ms, lower is better")
    ax.set_yscale("log")

    # 3. Latency vs rows (log-log), with cost per row annotated.
    ax = axes[1][0]
    for s in SERVERS:
        pts = []
        for e in wl.values():
            if e["group"] in ("rows", "w3", "w4") and _val(e["servers"].get(s), "p50_ms"):
                pts.append((e["params"]["rows"], e["servers"][s]["p50_ms"]))
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[s], label=s)
            r, ms = pts[-1]
            ax.annotate(f"{ms * 1000 / r:.2f} µs/row", (r, ms), fontsize=8, color=colors[s])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows per call")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("Latency vs rows (zip-sum, one call)")
    ax.legend()

    # 4. Throughput vs tabserve's worker count; TabPy measured alongside each point.
    ax = axes[1][1]
    ids = [k for k, e in wl.items() if e["group"] == "workers"]
    _grouped_bars(ax, ids, [(s, "rps", colors[s], 1.0) for s in SERVERS], wl)
    ax.set_xticklabels([str(wl[k]["params"]["workers"]) for k in ids], rotation=0)
    ax.set_xlabel("TABSERVE_WORKERS")
    ax.set_ylabel("req/s")
    ax.set_title("w1 throughput vs tabserve workers (c=64; TabPy has cpu_count threads)")

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "chart.png"
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except ValueError:
        # A panel with no positive value (a smoke run's) cannot be drawn on a log scale.
        for axis in fig.axes:
            axis.set_xscale("linear")
            axis.set_yscale("linear")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped_bars(
    ax: Any, ids: list[str], series: list[tuple[str, str, str, float]], wl: dict[str, Any]
) -> None:
    width = 0.8 / max(1, len(series))
    for i, (server, metric, color, alpha) in enumerate(series):
        xs, ys = [], []
        for j, wid in enumerate(ids):
            x = j + (i - (len(series) - 1) / 2) * width
            res = wl[wid]["servers"].get(server)
            v = _val(res, metric)
            if v:
                xs.append(x)
                ys.append(v)
            elif res is not None and metric in ("rps", "p50_ms"):
                # A missing bar must not read as "zero": say the server could not do it.
                ax.annotate(
                    "n/a",
                    (x, 0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=color,
                    rotation=90,
                )
        label = server if metric in ("rps", "p50_ms") else None
        ax.bar(xs, ys, width, color=color, alpha=alpha, label=label)
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels(ids, rotation=30, ha="right")
    ax.legend()
