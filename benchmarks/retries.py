"""What retrying costs: the same app with ``retries=0``, with ``retries=3``, and (optionally)
with another checkout of the library, measured side by side in ABBA rounds in-process.

    python -m benchmarks.retries                       # ours (retries=0) vs retrying (retries=3)
    python -m benchmarks.retries --baseline ../main    # ... and the library of another checkout

``--baseline`` loads that checkout's ``middleware_sessions`` package under another
name, so both libraries serve the same endpoints on the same engine in one
process: the ratio ``ours / baseline`` is what this checkout's ``retries=0`` path
costs (or saves) against it. No conflicts happen here; ``retrying / ours`` is what a
request pays for being ready to run again (its body kept, its scope copied).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

import middleware_sessions

from . import apps, backends, inprocess
from .inprocess import Cell, Settings

ENDPOINTS = ("ping", "read", "insert")


def load_library(checkout: Path) -> ModuleType:
    """``middleware_sessions`` of another checkout, imported as ``baseline_middleware_sessions``."""
    package = checkout / "middleware_sessions"
    name = "baseline_middleware_sessions"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"No middleware_sessions package in {checkout}.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(library: ModuleType, engine: AsyncEngine, **options: Any) -> FastAPI:
    """Variant (f) of ``apps`` on ``library``: AsyncDatabase, the three endpoints."""
    db = library.AsyncDatabase(engine=engine)
    app = FastAPI()
    app.add_middleware(library.DBSessionMiddleware, db=db, **options)
    apps._ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        item = await db.session.get(apps.Item, item_id)
        assert item is not None
        return apps._out(item)

    @app.post("/items", status_code=201)
    async def create(body: apps.ItemIn) -> dict[str, Any]:
        item = apps.Item(name=body.name)
        db.session.add(item)
        await db.session.flush()
        return apps._out(item)

    return app


async def run(
    baseline: Path | None, settings: Settings, endpoints: list[str], concurrencies: list[int]
) -> None:
    with backends.sqlite() as backend:
        async_engine, sync_engine = backend.engines()
        built = {
            "ours": build(middleware_sessions, async_engine),
            "retrying": build(middleware_sessions, async_engine, retries=3),
        }
        if baseline is not None:
            built["baseline"] = build(load_library(baseline), async_engine)
        gc.collect()
        gc.freeze()
        try:
            for endpoint in endpoints:
                for concurrency in concurrencies:
                    cell = Cell("sqlite", endpoint, concurrency, list(built))
                    await inprocess.run_cell(
                        cell, built, settings, after_round=lambda: apps.trim_inserted(sync_engine)
                    )
                    report(cell)
        finally:
            gc.unfreeze()
            await async_engine.dispose()
            sync_engine.dispose()


def report(cell: Cell) -> None:
    rates = "  ".join(
        f"{key}={summary.fmt_rate()}/s"
        for key in cell.variants
        if (summary := cell.summary(key)) is not None
    )
    print(f"{cell.key:<20} {rates}")
    for num, den in (("ours", "baseline"), ("retrying", "ours")):
        ratio = cell.ratio(num, den)
        per_cpu = cell.ratio(num, den, cpu=True)
        if ratio is not None and per_cpu is not None:
            print(
                f"{'':<20} {num}/{den} = {ratio.fmt_ratio()} per wall second, "
                f"{per_cpu.fmt_ratio()} per CPU second"
            )
    for key, error in cell.errors.items():
        print(f"{'':<20} {key} failed: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retries", description=__doc__)
    parser.add_argument("--baseline", type=Path, help="another checkout of this repository")
    parser.add_argument("--rounds", type=int, default=5, help="ABBA rounds (default: 5)")
    parser.add_argument("--window", type=float, default=0.5, help="seconds per variant per round")
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1 and 16")
    parser.add_argument("--endpoint", choices=ENDPOINTS, action="append", help="default: all three")
    args = parser.parse_args(argv)
    settings = Settings(rounds=args.rounds, warm=0.1, window=args.window, min_rounds=args.rounds)
    endpoints = args.endpoint or list(ENDPOINTS)
    asyncio.run(run(args.baseline, settings, endpoints, args.concurrency or [1, 16]))


if __name__ == "__main__":
    main()
