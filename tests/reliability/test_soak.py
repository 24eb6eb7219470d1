"""Mixed requests through a real uvicorn: memory flat, nothing leaked, the truth told.

The mix (``uvicorn_load.MIX``): successful writes, 409s, exceptions, failing
COMMITs, unique violations, streamed responses, requests that touch no
database, and clients that hang up mid-body, mid-query and mid-stream. The
normal suite runs 1,500 of them; ``make reliability`` runs 20,000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import RELIABILITY, PgDatabase
from .load import truth
from .security import problems_in_body, problems_in_log
from .uvicorn_load import MixedLoad, fault_server, quiet_stats

pytestmark = pytest.mark.postgres

REQUESTS = 20_000 if RELIABILITY else 1_500
CLIENTS = 16
WARM_UP = 2_000 if RELIABILITY else 500  # RSS is compared from here on
RSS_GROWTH_LIMIT = 16 * 2**20  # bytes, after the warm-up


async def test_soak_through_uvicorn_leaks_nothing_and_every_2xx_is_committed(
    pg_database: PgDatabase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    figures: dict[str, Any],
) -> None:
    """Mixed requests (2xx, 4xx, exceptions, failed COMMITs, hang-ups) through uvicorn."""
    options = '{"pool_size": 10, "max_overflow": 5, "pool_timeout": 5}'
    monkeypatch.setenv("RELIABILITY_ENGINE_OPTIONS", options)
    server = fault_server(tmp_path, pg_database.url("asyncpg")).start()
    try:
        load = MixedLoad(REQUESTS, CLIENTS, seed=1, every=WARM_UP // 2)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            start = (await client.get("/stats")).json()
            await load.run(server.base_url)
            end = await quiet_stats(client)
    finally:
        server.stop()
    log = server.log()

    outcomes = load.outcomes
    check = truth(pg_database.sync_url, outcomes)
    kinds = load.kinds
    warm = next(s for s in load.samples if s["requests"] >= WARM_UP)
    body_hangups = {key for key, kind in kinds.items() if kind == "hangup-body"}
    figures.update(
        requests=REQUESTS,
        faults=sum(load.hangups.values())
        + sum(1 for kind in kinds.values() if kind in ("crash", "commit", "dup")),
        statuses=outcomes.counts(),
        hangups=dict(load.hangups),
        rss_start_mib=round(start["rss"] / 2**20, 1),
        rss_after_warm_up_mib=round(warm["rss"] / 2**20, 1),
        rss_end_mib=round(end["rss"] / 2**20, 1),
        rss_series_mib=[round(sample["rss"] / 2**20, 1) for sample in load.samples],
        rss_every=load.every,
        sessions_opened=end["sessions_opened"],
        leaks={
            "connections_checked_out": end["checked_out"],
            "sessions_open": end["sessions_open"],
            "transactions_open": end["transactions_open"],
        },
        ambiguous=len(check.failed_present),
        log_lines_with_sql=log.count("[SQL:"),
        log_lines_with_values=log.count("DETAIL:  Key ("),
    )

    # Nothing left behind.
    assert (end["checked_out"], end["sessions_open"], end["transactions_open"]) == (0, 0, 0)
    # The truth: every 2xx is there; no 4xx, no 5xx, no body hang-up is.
    assert check.acknowledged_missing == set()
    assert check.refused_present == set()
    assert check.failed_present == set()
    assert check.unexplained == set()
    assert committed_keys_of(pg_database, body_hangups) == set()
    # Exactly the statuses the mix asks for.
    expected = {"ok": 201, "reject": 409, "crash": 500, "commit": 500, "dup": 500, "stream": 200}
    wrong = {k: s for k, s in outcomes.statuses.items() if s != expected[kinds[k]]}
    assert wrong == {}
    # Memory flat once warm.
    assert end["rss"] - warm["rss"] < RSS_GROWTH_LIMIT, load.samples
    # Errors say nothing about the database, to the client or in the log.
    assert [p for r in outcomes.errors.values() for p in problems_in_body(r)] == []
    assert problems_in_log(log, strict=True) == []


def committed_keys_of(database: PgDatabase, keys: set[str]) -> set[str]:
    from .faultapp import committed_keys

    return committed_keys(database.sync_url) & keys
