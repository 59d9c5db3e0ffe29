"""Benchmark tabserve against unmodified TabPy.  Usage: ``python -m bench.run --help``.

Full run (a few minutes):  python -m bench.run
CI smoke run (tabserve only, results to a temp dir):  python -m bench.run --smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import loadgen, report, servers
from bench.servers import Server, ServerOptions
from bench.workloads import Settings, Workload, catalogue, python_candidates

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "benchmarks"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="about 1 s per workload, tabserve only, results to a temp dir",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output directory (default {DEFAULT_OUT}; a temp dir with --smoke)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load per server per throughput workload (default 12; 1 smoke)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternation rounds per workload (default 4: ABBA ABBA; 1 smoke)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated workload ids or groups, e.g. w1,w2,rows,workers"
    )
    p.add_argument("--skip-tabpy", action="store_true", help="measure tabserve only")
    p.add_argument(
        "--skip-tabserve",
        action="store_true",
        help="measure TabPy only (useful before tabserve exists)",
    )
    p.add_argument(
        "--skip-ceiling",
        action="store_true",
        help="do not run the bare Tornado reference server beside the small-call workloads",
    )
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "asyncio"),
        default="auto",
        help="load generator (auto = wrk if installed)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 2,
        help="TABSERVE_WORKERS for the main comparison (default cpu_count, the "
        "size of TabPy's evaluate pool)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="TABSERVE_PROCESSES for tabserve (front-end processes; the arrow profile stays at 1)",
    )
    p.add_argument(
        "--timeout", type=float, default=30.0, help="TABPY_EVALUATE_TIMEOUT for both servers"
    )
    p.add_argument(
        "--tabpy-venv",
        type=Path,
        default=None,
        help="existing TabPy venv (default: cached under ~/.cache/tabserve-bench)",
    )
    p.add_argument("--tabpy-version", default=None, help="pin TabPy's version when installing")
    p.add_argument(
        "--tabserve-python",
        default=sys.executable,
        help="interpreter that has tabserve installed (default: this one)",
    )
    return p.parse_args(argv)


def selected(items: list[Workload], only: str) -> list[Workload]:
    if not only:
        return items
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    return [w for w in items if w.id in wanted or w.group in wanted]


def profile_options(profile: str, args: argparse.Namespace) -> ServerOptions:
    """plain | auth | arrow | workers:N -> the settings both servers get for that profile."""
    if profile == "arrow":  # Flight is refused with several front ends
        return ServerOptions(timeout_s=args.timeout, workers=args.workers, arrow=True)
    processes = getattr(args, "processes", 1)
    settings = {"TABSERVE_PROCESSES": str(processes)} if processes > 1 else {}
    if profile == "auth":
        return ServerOptions(
            timeout_s=args.timeout, auth=True, workers=args.workers, settings=settings
        )
    if profile.startswith("workers:"):
        workers = int(profile.split(":")[1])
        return ServerOptions(timeout_s=args.timeout, workers=workers, settings=settings)
    return ServerOptions(timeout_s=args.timeout, workers=args.workers, settings=settings)


class Runner:
    """Starts server pairs per profile and runs the workloads, alternating servers."""

    def __init__(self, args: argparse.Namespace, settings: Settings, root: Path) -> None:
        self.args, self.settings, self.root = args, settings, root
        self.tabpy_venv: Path | None = None
        self.results: dict[str, dict[str, Any]] = {}

    def start(self, name: str, opts: ServerOptions) -> Server:
        if name == "tabpy":
            assert self.tabpy_venv is not None
            return servers.start_tabpy(self.tabpy_venv, opts, self.root)
        if name == "ceiling":
            return servers.start_ceiling(sys.executable, opts, self.root)
        return servers.start_tabserve(self.args.tabserve_python, opts, self.root)

    def names_for(self, wl: Workload) -> list[str]:
        names = [] if self.args.skip_tabserve else ["tabserve"]
        if not (self.args.skip_tabpy or wl.tabserve_only):
            names.append("tabpy")
        if wl.ceiling and names and not self.args.skip_ceiling:
            names.append("ceiling")  # only beside a server it is the ceiling of
        return names

    def run(self, items: list[Workload]) -> None:
        profiles: list[str] = []
        for wl in items:
            if wl.profile not in profiles:
                profiles.append(wl.profile)
        for profile in profiles:
            # Workloads with no server left to run (e.g. tabserve-only ones under
            # --skip-tabserve) are left out of the results rather than shown empty.
            group = [w for w in items if w.profile == profile and self.names_for(w)]
            if group:
                self.run_profile(profile, group)

    def run_profile(self, profile: str, group: list[Workload]) -> None:
        opts = profile_options(profile, self.args)
        wanted = {n for w in group for n in self.names_for(w)}
        names = [n for n in ("tabserve", "tabpy", "ceiling") if n in wanted]
        running: dict[str, Server] = {}
        failed: dict[str, str] = {}
        for name in names:
            log(f"starting {name} ({profile})")
            try:
                running[name] = self.start(name, opts)
            except Exception as exc:  # recorded as n/a; the other server still runs
                failed[name] = f"server did not start: {exc}"
                log(failed[name])
        try:
            for wl in group:
                self.run_workload(wl, running, failed, opts)
        finally:
            for srv in running.values():
                srv.stop()

    def run_workload(
        self,
        wl: Workload,
        running: dict[str, Server],
        failed: dict[str, str],
        opts: ServerOptions,
    ) -> None:
        s = self.settings
        entry: dict[str, Any] = {
            "title": wl.title,
            "group": wl.group,
            "kind": wl.kind,
            "params": dict(wl.params),
            "target": None,
            "servers": {},
        }
        if wl.target:
            entry["target"] = {
                "metric": wl.target.metric,
                "kind": wl.target.kind,
                "value": wl.target.value,
                "text": wl.target.describe(),
            }
        self.results[wl.id] = entry
        names = self.names_for(wl)
        ready: list[str] = []
        for name in names:
            if name in failed:
                entry["servers"][name] = {"error": failed[name]}
                continue
            srv = self._revive(name, running, opts)
            try:
                wl.setup(srv, s)
                ready.append(name)
            except Exception as exc:
                entry["servers"][name] = {"error": _describe(exc)}
                log(f"{wl.id} {name}: n/a ({_describe(exc)})")
        rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in ready}
        for i in range(wl.rounds(s)):
            # ABBA...: even rounds go tabserve first, odd rounds the other way round.
            order = ready if i % 2 == 0 else list(reversed(ready))
            for name in order:
                if name not in rounds:
                    continue
                try:
                    rounds[name].append(wl.measure(self._revive(name, running, opts), s))
                except Exception as exc:
                    entry["servers"][name] = {"error": _describe(exc)}
                    log(f"{wl.id} {name}: n/a ({_describe(exc)})")
                    del rounds[name]
        for name, got in rounds.items():
            entry["servers"][name] = wl.merge(got)
        report.add_ratios(entry)
        if wl.target:
            entry["target_met"] = wl.target.met(
                entry["servers"].get("tabserve"), entry["servers"].get("tabpy")
            )
        if wl.ceiling_target is not None:
            share = entry["ratios"].get("ceiling_share")
            entry["ceiling_target"] = wl.ceiling_target
            entry["ceiling_target_met"] = None if share is None else share >= wl.ceiling_target
        log(f"{wl.id}: " + "; ".join(f"{n}={_brief(v)}" for n, v in entry["servers"].items()))

    def _revive(self, name: str, running: dict[str, Server], opts: ServerOptions) -> Server:
        """Restart a server that died (e.g. killed by a workload) so later workloads run."""
        srv = running[name]
        if not srv.alive():
            log(f"{name} died (exit {srv.proc.returncode}); restarting\n{srv.log_tail(10)}")
            srv.stop()
            running[name] = srv = self.start(name, opts)
        return srv


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text[:600]


def _brief(res: dict[str, Any]) -> str:
    if "error" in res:
        return "n/a"
    for key in ("rps", "p50_ms", "peak_rss_mb"):
        if key in res:
            return f"{key} {res[key]}"
    return "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.skip_tabpy = True
    duration = args.duration or (1.0 if args.smoke else 12.0)
    settings = Settings(
        duration=duration,
        # Short rounds, many times alternated: bursts from other work on a shared machine
        # then land on both servers instead of on whichever happened to be running.
        rounds=args.rounds or (1 if args.smoke else 4),
        smoke=args.smoke,
        tool=args.loadgen,
        cpu_count=os.cpu_count() or 2,
        busy_seconds=1.5 if args.smoke else 5.0,
    )
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="tabserve-bench-smoke-")) if args.smoke else DEFAULT_OUT
    )
    items = selected(catalogue(args.smoke), args.only)
    if not items:
        log(f"--only {args.only!r} matches no workload")
        return 2
    root = Path(tempfile.mkdtemp(prefix="tabserve-bench-run-"))
    runner = Runner(args, settings, root)
    meta: dict[str, Any] = {
        "date": report.now_utc(),
        "machine": report.machine_info(),
        "smoke": args.smoke,
        "duration_s": duration,
        "rounds": settings.rounds,
        "loadgen": "wrk" if args.loadgen != "asyncio" and loadgen.wrk_available() else "asyncio",
        "tabserve_workers": args.workers,
        "evaluate_timeout_s": args.timeout,
        "tabpy_version": None,
        "loadavg_start": report.load_average(),
        "skipped": [
            n
            for n, skip in (
                ("tabpy", args.skip_tabpy),
                ("tabserve", args.skip_tabserve),
                ("ceiling", args.skip_ceiling),
            )
            if skip
        ],
    }
    try:
        if not args.skip_tabpy:
            runner.tabpy_venv = args.tabpy_venv or servers.ensure_tabpy_venv(
                version=args.tabpy_version
            )
            meta["tabpy_version"] = servers.tabpy_version(runner.tabpy_venv)
        # w6 deploys with TabPy's own client: from the server's own interpreter if it has
        # tabpy, else the TabPy venv (also reused in smoke mode when already cached) or this
        # interpreter, whichever has the server's Python version.
        cached = servers.DEFAULT_CACHE / "tabpy-venv"
        venv = runner.tabpy_venv or (cached if (cached / "bin" / "python").exists() else None)
        settings.deploy_pythons = python_candidates(venv)
        runner.run(items)
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
    except Exception:
        log("harness error:\n" + traceback.format_exc())
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    meta["loadavg_end"] = report.load_average()
    meta["finished"] = report.now_utc()
    busy = max((meta["loadavg_start"] or [0])[0], (meta["loadavg_end"] or [0])[0])
    if busy > 0.5 * (os.cpu_count() or 1) and not args.smoke:
        # Alternation spreads noise over both servers, but absolute figures still suffer.
        log(
            f"warning: machine load average was {busy} on {os.cpu_count()} CPUs; "
            "absolute figures are noisy, compare ratios"
        )
    results = {"meta": meta, "workloads": runner.results}
    print(report.format_table(results))
    path = report.write_json(results, out)
    log(f"wrote {path}")
    try:
        log(f"wrote {report.write_chart(results, out)}")
    except ImportError as exc:
        log(f"no chart (install the bench extra: matplotlib): {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
