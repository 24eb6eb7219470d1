"""``python -m benchmarks [--quick]``: run every part, write RESULTS.md and ratios.png."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import apps, backends, ceiling, httpbench, inprocess, memory, replicas, report
from .inprocess import Cell, Settings


@dataclass(frozen=True)
class Plan:
    untouched: Settings
    database: Settings
    http: httpbench.Settings
    ceiling_window: float
    memory_requests: int
    replica_rounds: int = 8
    replica_window: float = 0.5


FULL = Plan(
    untouched=Settings(rounds=30, warm=0.02, window=0.06, budget=6),
    database=Settings(rounds=16, warm=0.05, window=0.1, budget=12, min_rounds=6),
    http=httpbench.Settings(rounds=3, warm=0.05, window=0.4),
    ceiling_window=1.6,
    memory_requests=20_000,
)
QUICK = Plan(
    untouched=Settings(rounds=3, warm=0.01, window=0.02, budget=1),
    database=Settings(rounds=2, warm=0.02, window=0.04, budget=1, min_rounds=2),
    http=httpbench.Settings(rounds=1, warm=0.05, window=0.1),
    ceiling_window=0.4,
    memory_requests=1_000,
    replica_rounds=2,
    replica_window=0.2,
)
SQLITE_POOL = {"pool_size": 1, "max_overflow": 0}
POSTGRES_POOL = {"pool_size": 32, "max_overflow": 0}
CONCURRENCIES = (1, 32)


_STARTED = time.perf_counter()


def _say(text: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:5.0f}s] {text}", flush=True)


def _progress(cell: Cell) -> None:
    _say(inprocess.describe(cell).strip())


async def _database_cells(
    backend: backends.Backend, pool: dict[str, int], plan: Plan, *, untouched: bool
) -> list[Cell]:
    async_engine, sync_engine = backend.engines(**pool)
    built, missing = inprocess.build_apps(inprocess.DB_VARIANTS, async_engine, sync_engine)
    gc.collect()
    gc.freeze()  # what exists now is not garbage: keep it out of every collection

    def trim() -> None:
        apps.trim_inserted(sync_engine)

    cells = []
    try:
        plans = []
        if untouched:
            plans += [
                ("ping", c, inprocess.UNTOUCHED_VARIANTS, plan.untouched) for c in CONCURRENCIES
            ]
        plans += [
            (endpoint, c, inprocess.DB_VARIANTS, plan.database)
            for endpoint in ("read", "insert")
            for c in CONCURRENCIES
        ]
        for endpoint, concurrency, variants, settings in plans:
            name = "any" if endpoint == "ping" else backend.name
            cell = Cell(name, endpoint, concurrency, list(variants), missing=dict(missing))
            await inprocess.run_cell(cell, built, settings, after_round=trim)
            _progress(cell)
            cells.append(cell)
    finally:
        gc.unfreeze()
        await async_engine.dispose()
        sync_engine.dispose()
    return cells


def _notes(results: report.Results) -> list[str]:
    """What the figures of this run say that a table does not."""
    notes = [
        "In-process, a route that never waits (GET /ping on (a), (f), (g)) runs start to "
        "finish without yielding, so its 32 loops take turns: concurrency 32 behaves like 1 "
        "for it, while (d) and (e) (BaseHTTPMiddleware, task groups) really interleave.",
        "HTTP: (b) declares no dependency on GET /ping, so there it is a second (a): the "
        "spread between the two is the noise of that table.",
    ]
    c = results.ceiling
    if c is not None:
        if c.failures.get("g"):
            notes.append(
                "Ceiling, (g): a def route's request holds its connection after the route "
                "returns, and then needs more thread-pool tokens: one for FastAPI's validation "
                "of the return value, one for the commit at http.response.start. With 64 "
                "clients, 40 route threads (all the tokens) wait for one of the 5 connections, "
                "while the requests holding the connections wait for a token to release them: "
                "nothing moves until pool_timeout fails the waiters "
                f"({c.failures['g']} failed requests in this run). A pool at least as large as "
                "the thread pool (40) avoids it."
            )
        f, f0 = c.fraction("f"), c.fraction("f0")
        if f is not None and f0 is not None:
            notes.append(
                f"Ceiling, pool_pre_ping: (f) reaches {f:.0%} with the default pre-ping and "
                f"{f0:.0%} without. asyncpg's ping is BEGIN, ';', ROLLBACK: three round trips "
                "on every checkout, while the pool is the bottleneck."
            )
        ia = c.fraction("ia")
        if ia is not None:
            notes.append(
                f"Ceiling, the hand-written floor (i) reaches {ia:.0%}: even with no framework "
                "help a request holds its connection for BEGIN, the 10 ms query, COMMIT and "
                "the event loop's queue at each step."
            )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    parser.add_argument("--no-http", action="store_true", help="skip part 2 (uvicorn)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL parts")
    parser.add_argument("--no-memory", action="store_true", help="skip part 4")
    parser.add_argument(
        "--out", type=Path, default=report.HERE, help="directory for RESULTS.md and ratios.png"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    settings = {
        **asdict(plan.database),
        "untouched_rounds": plan.untouched.rounds,
        "untouched_budget": plan.untouched.budget,
        "untouched_window": plan.untouched.window,
        "http_rounds": plan.http.rounds,
        "http_window": plan.http.window,
    }
    results = report.Results(
        mode="quick" if args.quick else "full",
        settings=settings,
        load_at_start=report.load_average(),
    )
    for key in ("d", "e"):
        problem = apps.peer_problem(key)
        if problem:
            results.notes.append(f"({key}) is n/a: {problem}")

    _say("1. in-process, SQLite (and the endpoint that never touches the database)")
    with backends.sqlite() as sqlite:
        results.cells += asyncio.run(_database_cells(sqlite, SQLITE_POOL, plan, untouched=True))
        if args.no_http:
            results.http_skipped = "--no-http"
        else:
            _say("2. HTTP, uvicorn")
            results.http = httpbench.run(sqlite, plan.http, progress=_progress)

    if args.no_postgres:
        results.postgres, results.postgres_skipped = "skipped: --no-postgres", True
    else:
        with backends.postgresql() as pg:
            if isinstance(pg, str):
                results.postgres, results.postgres_skipped = f"skipped: {pg}", True
                _say(f"PostgreSQL parts skipped: {pg}")
            else:
                results.postgres = pg.versions
                _say(f"1. in-process, PostgreSQL {results.postgres}")
                results.cells += asyncio.run(
                    _database_cells(pg, POSTGRES_POOL, plan, untouched=False)
                )
                _say("3. concurrency ceiling")
                results.ceiling = asyncio.run(
                    ceiling.run(pg, rounds=1, warm=0.3, window=plan.ceiling_window)
                )
                for key in ceiling.VARIANTS:
                    fraction = results.ceiling.fraction(key)
                    failed = results.ceiling.failures.get(key, 0)
                    _say(
                        f"({key}) {0 if fraction is None else fraction:.0%} of 500 req/s"
                        + (f", {failed} failed" if failed else "")
                    )

    if not args.no_postgres:
        _say("5. read replicas (a primary and a streaming replica)")
        measured = replicas.run(plan.replica_rounds, window=plan.replica_window)
        lines = [f"Replicas: {measured}"] if isinstance(measured, str) else measured.lines()
        for line in lines:
            _say(line)
        results.notes += lines

    if args.no_memory:
        results.memory_skipped = "--no-memory"
    else:
        _say(f"4. memory, {plan.memory_requests:,} requests")
        results.memory = memory.run(plan.memory_requests)

    results.seconds = time.perf_counter() - started
    results.notes += _notes(results)
    path, found = report.write(results, args.out)
    print(f"\nTargets ({results.mode} run, {results.seconds:.0f} s):")
    for t in found:
        ratio = t.ratio.fmt_ratio() if t.ratio else "n/a"
        extra = "; ".join(x for x in (t.resolved, t.note) if x)
        print(f"  {t.verdict:<4} {t.cell:<26} {t.name:<22} {ratio:<20} {extra}")
    print(f"\nWrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
