"""200 concurrent mixed requests to a sync app through uvicorn: nothing fails, nothing stalls.

The app (``syncapp``) is written the way most FastAPI + SQLAlchemy apps are: ``def``
routes with response models, one uvicorn worker. Before the library lent the
thread tokens of route threads waiting for a connection, this burst locked up
with SQLAlchemy's defaults (pool 5 + 10 overflow, 40 threads): requests waited
for ``pool_timeout`` (30 s) and many got 503. The defaults must now serve it all;
the settings we used to recommend run beside them for comparison.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ..demo.conftest import DemoServer
from .conftest import PgDatabase
from .syncapp import SEEDED, create_schema

pytestmark = pytest.mark.postgres

APP = ("-m", "uvicorn", "--factory", "--no-access-log", "tests.reliability.syncapp:create_app")
REQUESTS = 200
# Reads, writes, updates and a route without database, as in a typical CRUD app.
MIX = {"list": 40, "create": 25, "read": 20, "update": 10, "health": 5}
SETTINGS: dict[str, tuple[dict[str, Any], int | None]] = {
    # (engine_options, thread tokens)
    "defaults": ({}, None),
    # What the README used to recommend: a thread pool no larger than the pool.
    "threads-shrunk-to-pool": ({"pool_timeout": 2}, 15),
    # The other workaround: a pool larger than the thread pool, a short pool_timeout.
    "pool-above-threads": ({"pool_size": 40, "max_overflow": 10, "pool_timeout": 2}, None),
}


async def burst(base_url: str) -> tuple[Counter[str], float, float]:
    """All requests at once; the statuses (or error names), wall time and slowest request."""
    rng = random.Random(15)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=REQUESTS)
    outcomes: Counter[str] = Counter()
    slowest = 0.0
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one(n: int, kind: str) -> None:
            nonlocal slowest
            note = rng.randint(1, SEEDED)
            started = time.monotonic()
            try:
                if kind == "list":
                    response = await client.get("/notes", params={"skip": n % 30, "limit": 20})
                elif kind == "create":
                    response = await client.post("/notes", json={"title": f"new {n}"})
                elif kind == "read":
                    response = await client.get(f"/notes/{note}")
                elif kind == "update":
                    response = await client.patch(f"/notes/{note}", json={"body": f"edit {n}"})
                else:
                    response = await client.get("/health")
                outcomes[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
            slowest = max(slowest, time.monotonic() - started)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for n, kind in enumerate(kinds):
                tg.start_soon(one, n, kind)
        elapsed = time.monotonic() - started
    return outcomes, elapsed, slowest


async def quiet_stats(client: httpx.AsyncClient) -> dict[str, Any]:
    """``/stats`` once the last sessions are closed (cleanup runs after responses)."""
    with anyio.move_on_after(10):
        while True:
            stats: dict[str, Any] = (await client.get("/stats")).json()
            if stats["checked_out"] == 0 and stats["threads_borrowed"] == 0:
                break
            await anyio.sleep(0.05)
    return stats


@pytest.mark.parametrize("settings", list(SETTINGS))
async def test_200_concurrent_mixed_requests_to_a_sync_app_all_succeed(
    pg_database: PgDatabase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    figures: dict[str, Any],
    settings: str,
) -> None:
    """200 concurrent mixed requests (def routes, response models) through one uvicorn worker."""
    engine_options, tokens = SETTINGS[settings]
    create_schema(pg_database.sync_url)
    monkeypatch.setenv("RELIABILITY_ENGINE_OPTIONS", json.dumps(engine_options))
    if tokens is not None:
        monkeypatch.setenv("RELIABILITY_THREAD_TOKENS", str(tokens))
    server = DemoServer(tmp_path, pg_database.sync_url, command=APP).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await client.get("/notes/1")  # one connection made, as in a running app
            outcomes, elapsed, slowest = await burst(server.base_url)
            end = await quiet_stats(client)
    finally:
        server.stop()

    failed = sum(n for outcome, n in outcomes.items() if not outcome.startswith("2"))
    figures.update(
        settings=settings,
        engine_options=engine_options,
        thread_tokens=tokens or 40,
        requests=REQUESTS,
        statuses=dict(outcomes),
        failed=failed,
        wall_time_s=round(elapsed, 2),
        slowest_request_s=round(slowest, 2),
        leaks={"connections_checked_out": end["checked_out"]},
    )
    assert end == {"checked_out": 0, "thread_tokens": tokens or 40, "threads_borrowed": 0}
    if settings == "defaults":
        assert failed == 0, outcomes
