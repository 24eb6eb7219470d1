"""Targets, ``RESULTS.md`` and the bar chart of ratios."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import ceiling, inprocess
from .apps import VARIANTS
from .httpbench import HttpResult
from .inprocess import Cell
from .memory import growth_per_request
from .stats import Summary, Target

HERE = Path(__file__).resolve().parent
PACKAGES = (
    "middleware_sessions",
    "fastapi",
    "starlette",
    "pydantic",
    "sqlalchemy",
    "anyio",
    "aiosqlite",
    "asyncpg",
    "psycopg",
    "uvicorn",
    "httptools",
    "fastapi-sqlalchemy",
    "fastapi-async-sqlalchemy",
)


@dataclass
class Results:
    mode: str
    settings: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    postgres: str = ""  # server version, or why the PostgreSQL parts were skipped
    postgres_skipped: bool = False
    http: HttpResult | None = None
    http_skipped: str = ""
    ceiling: ceiling.CeilingResult | None = None
    memory: dict[str, dict[str, Any]] | None = None
    memory_skipped: str = ""
    seconds: float = 0.0
    load_at_start: str = ""
    notes: list[str] = field(default_factory=list)

    def cell(self, backend: str, endpoint: str, concurrency: int) -> Cell | None:
        for cell in self.cells:
            if (cell.backend, cell.endpoint, cell.concurrency) == (backend, endpoint, concurrency):
                return cell
        return None


def versions() -> list[tuple[str, str]]:
    found = []
    for name in PACKAGES:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, "not installed"))
    return found


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(results: Results) -> list[tuple[str, str]]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores"),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("load average (1, 5, 15 min) at the start", results.load_at_start),
        ("load average at the end", load_average()),
    ]


# -- targets --------------------------------------------------------------------

_UNTOUCHED = (("a", 0.97), ("d", 3.0), ("e", 1.5))
_DB = {"f": (("ia", 0.97), ("b", 1.0), ("e", 1.1)), "g": (("is", 0.97), ("c", 1.1), ("d", 1.0))}
# The compat layers cost nothing over native use: (hd) against (g), (he) against (f).
_COMPAT = (("hd", "g", 0.97), ("he", "f", 0.97))


def targets(results: Results) -> list[Target]:
    found: list[Target] = []
    for cell in results.cells:
        if cell.endpoint == "ping":
            for ours in ("f", "g"):
                for den, threshold in _UNTOUCHED:
                    found.append(_target(cell, ours, den, threshold))
        else:
            for ours, pairs in _DB.items():
                for den, threshold in pairs:
                    found.append(_target(cell, ours, den, threshold))
        for compat, native, threshold in _COMPAT:
            found.append(_target(cell, compat, native, threshold))
    if results.ceiling is not None:
        for variant in ("f", "g"):
            fraction = results.ceiling.fraction(variant)
            summary = None if fraction is None else Summary(fraction, fraction, fraction, 1)
            note = ""
            if results.ceiling.failures.get(variant):
                note = f"{results.ceiling.failures[variant]} requests failed (pool timeout)"
            found.append(
                Target(
                    f"({variant}) reaches 90 % of the ceiling",
                    "postgresql/pg_sleep/c64",
                    variant,
                    "500 req/s",
                    0.9,
                    summary,
                    note,
                )
            )
        # Sync routes at the ceiling keep up with async ones (issue 15).
        ratio = results.ceiling.ratio("g", "f")
        failed = {v: results.ceiling.failures.get(v, 0) for v in ("g", "f")}
        found.append(
            Target(
                "(g) ≥ 0.9 x (f) at the ceiling",
                "postgresql/pg_sleep/c64",
                "g",
                "f",
                0.9,
                None if ratio is None else Summary(ratio, ratio, ratio, 1),
                ", ".join(f"({v}) had {n} failed requests" for v, n in failed.items() if n),
            )
        )
    return found


def _target(cell: Cell, num: str, den: str, threshold: float) -> Target:
    note = ""
    for key in (num, den):
        if key in cell.missing:
            note = f"({key}) n/a: {cell.missing[key]}"
        elif cell.failures.get(key):
            note = f"({key}) had {cell.failures[key]} failed requests: {cell.errors.get(key)}"
    return Target(
        f"({num}) ≥ {threshold:g} x ({den})",
        cell.key,
        num,
        den,
        threshold,
        cell.ratio(num, den),
        note,
    )


# -- RESULTS.md ---------------------------------------------------------------------


def _cell_table(cell: Cell, *, with_b: bool) -> list[str]:
    head = (
        "| variant | requests/s (median ±CI) | x (a) | x (b) |"
        if with_b
        else ("| variant | requests/s (median ±CI) | x (a) |")
    )
    rule = "|---|---:|---:|---:|" if with_b else "|---|---:|---:|"
    lines = [head, rule]
    for key in cell.variants:
        label = VARIANTS[key].label
        summary = cell.summary(key)
        if summary is None:
            why = cell.missing.get(key, "not measured")
            lines.append(f"| {label} | n/a: {why} |" + (" | |" if with_b else " |"))
            continue
        rate = summary.fmt_rate()
        if cell.failures.get(key):
            rate += f" ({cell.failures[key]} failed)"
        to_a = cell.ratio(key, "a")
        row = f"| {label} | {rate} | {to_a.fmt_ratio() if to_a else '—'} |"
        if with_b:
            to_b = cell.ratio(key, "b")
            row += f" {to_b.fmt_ratio() if to_b else '—'} |"
        lines.append(row)
    return lines


def markdown(results: Results, found: list[Target], chart: str | None) -> str:
    s = results.settings
    out = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m benchmarks`); issue 4. "
        f"Mode: **{results.mode}**, {results.seconds:.0f} s in all.",
        "",
        "Every figure is from this one run. Variants are interleaved in rounds "
        "(each round runs them all forward, then backward, in a fresh random order), "
        "a variant's throughput for a round is its two half-windows together, and a "
        "ratio is taken within each round, then summarised over the rounds as "
        "**median [95 % interval of the median]** (order statistics). "
        "`±CI` on a rate is half that interval's width. A target is PASS when the "
        "median meets it; *within noise* means the interval straddles the threshold.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine(results)),
        f"| PostgreSQL | {results.postgres} |",
        *(f"| {k} | {v} |" for k, v in versions()),
        "",
        "## Targets",
        "",
        "| target | cell | ratio | verdict | |",
        "|---|---|---:|---|---|",
    ]
    for t in found:
        ratio = t.ratio.fmt_ratio() if t.ratio else "n/a"
        if t.cell.startswith("postgresql/pg_sleep") and t.ratio:
            ratio = f"{t.ratio.median:.0%}"
        extra = "; ".join(x for x in (t.resolved, t.note) if x)
        out.append(f"| {t.name} | {t.cell} | {ratio} | **{t.verdict}** | {extra} |")
    passed = sum(t.verdict == "PASS" for t in found)
    out += ["", f"{passed} of {len(found)} targets met."]
    if chart:
        out += ["", f"![ratios]({chart})"]
    out += [
        "",
        "## 1. In-process (ASGI called directly)",
        "",
        f"Up to {s['rounds']} rounds per database cell (as many as fit in {s['budget']} s, "
        f"at least {s['min_rounds']}; GET /ping: up to {s['untouched_rounds']} rounds in "
        f"{s['untouched_budget']} s, {s['untouched_window']} s windows; the count is in each "
        f"table's heading); each variant measured for {s['window']} s per round "
        f"(two half-windows) after {s['warm']} s of warm-up at the start of the round; "
        "between variants the same request loops go on, each starting one request of the "
        "next variant while the stragglers of the previous one finish, and neither is "
        "counted. "
        "Scopes are pre-built, `receive` hands over the body, `send` discards. "
        "All variants of a backend share one async and one sync engine (same pool, same "
        "options: the ones `AsyncDatabase(url)`/`Database(url)` apply by default, "
        "`pool_pre_ping=True` on PostgreSQL). SQLite uses a pool of 1 connection (one "
        "writer: with more, concurrent inserts wait in SQLite's sleeping busy handler "
        "and the benchmark measures that); PostgreSQL a pool of 32. Sync routes run on "
        "AnyIO's default thread pool (40 tokens) for every sync variant. The peers run "
        "with `commit_on_exit=True`, so that their middleware owns the transaction as "
        "ours does; (b) and (c) commit in the route.",
        "",
    ]
    if results.postgres_skipped:
        out += [f"PostgreSQL: skipped: {results.postgres}", ""]
    for cell in results.cells:
        title = inprocess.ENDPOINT_TITLES[cell.endpoint]
        backend = "any database" if cell.endpoint == "ping" else cell.backend
        rounds = len(next(iter(cell.rates.values()), []))
        out += [
            f"### {title} — {backend}, concurrency {cell.concurrency} ({rounds} rounds)",
            "",
            *_cell_table(cell, with_b=cell.endpoint != "ping"),
            "",
            *(f"- ({k}) failed requests, the first: `{e}`" for k, e in cell.errors.items()),
            *([""] if cell.errors else []),
        ]
    out += ["## 2. HTTP (uvicorn on 127.0.0.1)", ""]
    if results.http is None:
        out += [f"skipped: {results.http_skipped}", ""]
    else:
        out += [
            f"Server: {results.http.server}; load from `benchmarks/loadgen.py` (closed loop, "
            "keep-alive, its own process); SQLite, pool of 64 so that no request waits for a "
            f"connection. {s['http_rounds']} rounds of {s['http_window']} s per variant.",
            "",
        ]
        for cell in results.http.cells:
            title = inprocess.ENDPOINT_TITLES[cell.endpoint]
            out += [
                f"### {title}, {cell.concurrency} connection(s)",
                "",
                *_cell_table(cell, with_b=True),
                "",
            ]
        if results.http.errors:
            out += ["Errors:", "", *(f"- {e}" for e in results.http.errors), ""]
    out += ["## 3. Concurrency ceiling (PostgreSQL, pg_sleep(0.01), pool of 5, 64 clients)", ""]
    if results.ceiling is None:
        out += [f"skipped: {results.postgres}", ""]
    else:
        c = results.ceiling
        out += [
            f"Ceiling: {ceiling.POOL_SIZE} / {ceiling.SLEEP} s = {ceiling.CEILING:.0f} requests/s. "
            "In-process driver, 64 concurrent clients, same engine options as above "
            f"(`pool_timeout={ceiling.POOL['pool_timeout']}` so that a stall shows as failures "
            "instead of a 30 s hang).",
            "",
            "| variant | requests/s (mean) | fraction of 500 | failed requests |",
            "|---|---:|---:|---:|",
        ]
        for key in ceiling.VARIANTS:
            label = ceiling.LABELS.get(key, VARIANTS[key].label if key in VARIANTS else key)
            values = c.rates.get(key, [])
            rate = sum(values) / len(values) if values else 0.0
            out.append(
                f"| {label} | {rate:,.0f} | {rate / ceiling.CEILING:.0%} | "
                f"{c.failures.get(key, 0)} |"
            )
        out.append("")
    out += ["## 4. Memory (SQLite, read and insert alternating, concurrency 32)", ""]
    if results.memory is None:
        out += [f"skipped: {results.memory_skipped}", ""]
    else:
        out += [
            "| variant | requests | peak RSS | RSS first → last | blocks/request (slope) "
            "| per-request allocation (traced peak) | traced bytes left behind by a batch of requests, "
            "start / end |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, m in results.memory.items():
            if "error" in m:
                out.append(f"| {VARIANTS[key].label} | {m['error']} | | | | | |")
                continue
            cps = m["checkpoints"]
            out.append(
                f"| {VARIANTS[key].label} | {m['requests']:,} | {m['peak_rss_kib'] / 1024:.1f} MiB "
                f"| {cps[0]['rss_kib'] / 1024:.1f} → {cps[-1]['rss_kib'] / 1024:.1f} MiB "
                f"| {growth_per_request(cps, 'blocks'):.4f} "
                f"| {m['per_request_peak_bytes'] / 1024:.1f} KiB "
                f"| {m['left_after_500_at_start']:+,} / {m['left_after_500_at_end']:+,} B "
                f"(batch of {m['left_after_batch']}) |"
            )
        out.append("")
    if results.notes:
        out += ["## Notes", "", *(f"- {n}" for n in results.notes), ""]
    return "\n".join(out) + "\n"


def chart(results: Results, found: list[Target], path: Path) -> str | None:
    """A horizontal bar per target ratio, with its interval and threshold; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.notes.append("matplotlib is not installed: no chart.")
        return None
    shown = [t for t in found if t.ratio is not None]
    if not shown:
        return None
    height = 0.28 * len(shown) + 1.2
    fig, ax = plt.subplots(figsize=(11, height))
    labels: list[str] = []
    values: list[float] = []
    lows: list[float] = []
    highs: list[float] = []
    colors: list[str] = []
    for t in shown:
        assert t.ratio is not None
        labels.append(f"{t.cell}  {t.name}")
        # Show each ratio relative to its own threshold: 1.0 means exactly on target.
        values.append(t.ratio.median / t.threshold)
        lows.append((t.ratio.median - t.ratio.lo) / t.threshold)
        highs.append((t.ratio.hi - t.ratio.median) / t.threshold)
        colors.append("#4c9a5a" if t.verdict == "PASS" else "#c8553d")
    ys = list(range(len(shown)))
    limit = 2.0
    clipped = [min(v, limit) for v in values]
    highs = [
        max(0.0, min(v + h, limit) - c) for v, h, c in zip(values, highs, clipped, strict=True)
    ]
    lows = [min(lo, c) for lo, c in zip(lows, clipped, strict=True)]
    ax.barh(ys, clipped, xerr=[lows, highs], color=colors, ecolor="#333", capsize=2)
    ax.axvline(1.0, color="black", linewidth=1)
    for y, t in zip(ys, shown, strict=True):
        assert t.ratio is not None
        ax.text(limit * 1.01, y, t.ratio.fmt_ratio(), va="center", fontsize=6)
    ax.set_xlim(0, limit)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(
        "ratio / target (1 = exactly on target; clipped at 2); "
        "bar: median, whiskers: 95 % interval; right: the ratio itself"
    )
    ax.set_title(f"middleware_sessions benchmark targets ({results.mode} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def raw(results: Results, found: list[Target]) -> dict[str, Any]:
    """Every measured value, for a closer look than the tables give."""
    return {
        "mode": results.mode,
        "settings": results.settings,
        "seconds": results.seconds,
        "cells": [dataclasses.asdict(c) for c in results.cells],
        "http": [dataclasses.asdict(c) for c in results.http.cells] if results.http else None,
        "ceiling": dataclasses.asdict(results.ceiling) if results.ceiling else None,
        "memory": results.memory,
        "targets": [
            {
                "name": t.name,
                "cell": t.cell,
                "verdict": t.verdict,
                "median": t.ratio.median if t.ratio else None,
                "interval": [t.ratio.lo, t.ratio.hi] if t.ratio else None,
            }
            for t in found
        ],
    }


def write(results: Results, directory: Path = HERE) -> tuple[Path, list[Target]]:
    found = targets(results)
    name = chart(results, found, directory / "ratios.png")
    path = directory / "RESULTS.md"
    path.write_text(markdown(results, found, name))
    (directory / "results.json").write_text(json.dumps(raw(results, found), indent=1) + "\n")
    return path, found
