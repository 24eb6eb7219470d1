"""``pg_terminate_backend`` on the connection serving a request: 5xx, or a 2xx whose row exists.

The route learns its backend's pid from the driver (no query needed), and the
test kills that backend from a superuser connection at a chosen point, or at a
random moment while the request runs.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from .conftest import FLAVOURS, InProcess, PgDatabase, only_lost_connections
from .faultapp import Write, add_work_route
from .load import Outcomes, post_write, truth

pytestmark = pytest.mark.postgres

POINTS = ["before-query", "after-flush", "during-commit"]
RANDOM_REQUESTS = 30
ROUND = 10  # killed requests per round; the latency is measured again before each


def backend_pid(session: Session) -> int:
    """The pid of the server process behind the session's connection."""
    raw = session.connection().connection.driver_connection
    if hasattr(raw, "get_server_pid"):  # asyncpg
        return int(raw.get_server_pid())
    return int(raw.info.backend_pid)  # psycopg


class Killer:
    """Terminates backends through a superuser connection, and waits until they are gone."""

    def __init__(self, admin: psycopg.Connection[Any]) -> None:
        self.admin = admin
        self.killed = 0

    def __call__(self, pid: int) -> None:
        row = self.admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()
        assert row is not None
        self.killed += bool(row[0])


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_killed_connection_gives_a_5xx_and_no_row_and_the_pool_recovers(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    admin: psycopg.Connection[Any],
    flavour: str,
    point: str,
    figures: dict[str, Any],
) -> None:
    """Kill the request's backend before the INSERT, between flush and COMMIT, or at COMMIT."""
    subject = in_process(flavour, {"pool_size": 3})
    db, client = subject.db, subject.client
    kill = Killer(admin)
    sync_engine = db.engine if flavour == "sync" else db.engine.sync_engine  # type: ignore[union-attr]

    @event.listens_for(sync_engine, "commit")
    def kill_at_commit(connection: Any) -> None:
        # Just before the driver sends COMMIT.
        pid = connection.info.pop("kill at commit", None)
        if pid is not None:
            kill(pid)

    def killed_write(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        pid = backend_pid(session)
        if point == "before-query":
            kill(pid)
        session.add(Write(key=params["key"], token=f"token-{params['key']}"))
        session.flush()
        if point == "after-flush":
            kill(pid)
        elif point == "during-commit":
            session.connection().info["kill at commit"] = pid
        return {"key": params["key"]}

    add_work_route(subject.app, db, "/killed", killed_write)
    outcomes = Outcomes()
    with anyio.fail_after(30):
        response = await client.post("/killed", params={"key": "victim"})
        outcomes.record("victim", response, 0)
        # The pool hands out a fresh connection afterwards, without any help.
        for n in range(5):
            await post_write(client, outcomes, f"after-{n}")

    check = truth(pg_database.sync_url, outcomes)
    figures.update(requests=len(outcomes.statuses), faults=kill.killed, statuses=outcomes.counts())
    assert kill.killed == 1
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert [outcomes.statuses[f"after-{n}"] for n in range(5)] == [201] * 5
    assert check.acknowledged_missing == set()
    assert check.failed_present == set()
    await subject.assert_no_leaks(figures)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_connections_killed_at_random_moments_never_lose_an_acknowledged_write(
    in_process: Callable[..., InProcess],
    pg_database: PgDatabase,
    admin: psycopg.Connection[Any],
    flavour: str,
    figures: dict[str, Any],
    loop_errors: list[str],
) -> None:
    """30 writes, each with its backend killed at a random moment of its course.

    The moment is drawn between 0 and the time an unkilled request takes,
    measured before each round of 10: on a busy machine the kills stretch with
    the requests, so some land mid-transaction and some after the COMMIT.
    """
    subject = in_process(flavour, {"pool_size": 3})
    db, client = subject.db, subject.client
    kill = Killer(admin)
    pids: dict[str, int] = {}
    rng = random.Random(5)

    def slow_write(session: Session, params: dict[str, Any]) -> dict[str, Any]:
        pids[params["key"]] = backend_pid(session)
        session.add(Write(key=params["key"], token=f"token-{params['key']}"))
        session.flush()
        session.execute(text("SELECT pg_sleep(0.02)"))
        session.add(Write(key=f"{params['key']}-second", token=f"token-{params['key']}-2"))
        session.flush()
        return {"key": params["key"]}

    add_work_route(subject.app, db, "/slow", slow_write)
    outcomes = Outcomes()

    latencies: list[float] = []

    async def killer(key: str, within: float) -> None:
        for _ in range(10_000):  # the route publishes its backend's pid first
            if key in pids:
                break
            await anyio.sleep(0.001)
        await anyio.sleep(rng.uniform(0, within))
        await anyio.to_thread.run_sync(kill, pids[key])

    with anyio.fail_after(120):
        for n in range(RANDOM_REQUESTS):
            if n % ROUND == 0:  # unkilled requests, keyed like the others: "r<n>-probe<i>"
                took = []
                for i in range(3):
                    started = time.monotonic()
                    key = f"r{n}-probe{i}"
                    outcomes.record(key, await client.post("/slow", params={"key": key}), started)
                    took.append(time.monotonic() - started)
                latencies.append(statistics.median(took))
            key = f"r{n}"
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer, key, latencies[-1])
                response = await client.post("/slow", params={"key": key})
                outcomes.record(key, response, 0)
        for n in range(5):
            await post_write(client, outcomes, f"after-{n}")

    present = truth(pg_database.sync_url, outcomes)
    # Both rows of a request or neither: "-second" rows are checked like their first.
    seconds = {key for key in outcomes.statuses if f"{key}-second" in present.unexplained}
    killed = {f"r{n}" for n in range(RANDOM_REQUESTS)}
    probes = {key for key in outcomes.statuses if "-probe" in key}
    figures.update(
        requests=len(outcomes.statuses),
        faults=kill.killed,
        statuses=outcomes.counts(),
        ambiguous=len(present.failed_present),
        unkilled_latency_ms=[round(seconds * 1000) for seconds in latencies],
        asyncio_errors_logged=len(loop_errors),
    )
    assert only_lost_connections(loop_errors), loop_errors
    assert set(outcomes.statuses.values()) <= {201, 500}
    assert present.acknowledged_missing == set()
    hit = {key for key in outcomes.statuses if key.startswith("r")}
    assert seconds == (outcomes.acknowledged | present.failed_present) & hit
    assert present.unexplained == {f"{key}-second" for key in seconds}
    assert [outcomes.statuses[f"after-{n}"] for n in range(5)] == [201] * 5
    assert {outcomes.statuses[key] for key in probes} == {201}
    await subject.assert_no_leaks(figures)
    # The test had teeth: some requests were hit, some got through.
    assert 0 < len(outcomes.failed & killed) < RANDOM_REQUESTS
