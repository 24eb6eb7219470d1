"""Behind PgBouncer in transaction pooling mode: the settings that make each driver work.

In transaction mode a client's consecutive transactions may run on different
server connections, so nothing may outlive a transaction on the server;
prepared statements do (named ones, until deallocated). The settings:

- asyncpg: ``connect_args={"statement_cache_size": 0}``. asyncpg then uses the
  unnamed statement and parses it again for every execution.
  SQLAlchemy's ``prepared_statement_name_func`` (unique names) is *not* enough on
  its own: SQLAlchemy's own statement cache then reuses a name in a later
  transaction, on a server connection that never saw it.
- psycopg (sync and async): ``connect_args={"prepare_threshold": None}``; by
  default psycopg prepares a query the 5th time it runs, as ``_pg3_N``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from .._postgres import Driver, PostgresServer
from ..helpers import REQUIRE_POSTGRES
from ._pgbouncer import PgBouncer, pgbouncer_skip_reason
from .conftest import assert_no_leaks, dispose
from .faultapp import build_app, checked_out, create_schema, make_database
from .load import Outcomes, post_write, truth

pytestmark = pytest.mark.postgres

# What each driver needs behind PgBouncer's transaction pooling.
PGBOUNCER_CONNECT_ARGS: dict[Driver, dict[str, Any]] = {
    "asyncpg": {"statement_cache_size": 0},
    "psycopg": {"prepare_threshold": None},
    "psycopg_async": {"prepare_threshold": None},
}
DRIVERS: list[Driver] = ["asyncpg", "psycopg", "psycopg_async"]
_names = (f"bounced{n}" for n in itertools.count())


@pytest.fixture(scope="module")
def bouncer(postgres_server: PostgresServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with 2 server connections per database."""
    reason = pgbouncer_skip_reason()
    if reason is not None:
        if REQUIRE_POSTGRES:  # CI: these tests must run, not skip
            pytest.fail(f"PgBouncer is required here: {reason}")
        pytest.skip(reason)
    with PgBouncer(postgres_server, pool_mode="transaction", default_pool_size=2) as bouncer:
        yield bouncer


@pytest.fixture
def bounced_database(postgres_server: PostgresServer) -> Iterator[str]:
    name = next(_names)
    postgres_server.create_database(name)
    create_schema(postgres_server.url("psycopg", database=name))
    yield name
    postgres_server.drop_database(name)


QUERY = sa.text("SELECT count(*) FROM writes WHERE key = :k")


async def transactions(url: str, connect_args: dict[str, Any], n: int = 60) -> list[str]:
    """``n`` small transactions from 8 pooled connections at once; the errors they met."""
    errors: list[str] = []
    limiter = anyio.Semaphore(8)
    query = QUERY

    if url.startswith("postgresql+psycopg:"):
        engine = sa.create_engine(url, connect_args=connect_args, pool_size=8)

        def sync_one(i: int) -> None:
            with engine.begin() as conn:
                conn.execute(query, {"k": str(i)})
                conn.execute(query, {"k": str(i + 1)})

        async def one(i: int) -> None:
            async with limiter:
                try:
                    await anyio.to_thread.run_sync(sync_one, i)
                except sa.exc.DBAPIError as exc:
                    errors.append(str(exc.orig).splitlines()[0])

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        engine.dispose()
        return errors

    async_engine = create_async_engine(url, connect_args=connect_args, pool_size=8)

    async def async_one(i: int) -> None:
        async with limiter:
            try:
                async with async_engine.begin() as conn:
                    await conn.execute(query, {"k": str(i)})
                    await conn.execute(query, {"k": str(i + 1)})
            except sa.exc.DBAPIError as exc:
                errors.append(str(exc.orig).splitlines()[0])

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(async_one, i)
    await async_engine.dispose()
    return errors


async def server_swap(url: str, connect_args: dict[str, Any]) -> str | None:
    """Run a query in two transactions of one client that land on different server connections.

    Client A runs the query (six times: psycopg prepares it from the fifth), and
    commits; client B then begins a transaction, which PgBouncer serves with the
    server connection A just released (it reuses the most recent one first); A's
    second transaction so runs on the other one. Returns the error A met, if any.
    """
    if url.startswith("postgresql+psycopg:"):
        return await anyio.to_thread.run_sync(sync_server_swap, url, connect_args)
    engine = create_async_engine(url, connect_args=connect_args)
    try:
        async with engine.connect() as a, engine.connect() as b:
            for _ in range(6):
                await a.execute(QUERY, {"k": "x"})
            await a.commit()
            await b.execute(sa.text("SELECT 1"))
            try:
                await a.execute(QUERY, {"k": "x"})
            except sa.exc.DBAPIError as exc:
                return str(exc.orig).splitlines()[0]
            finally:
                await b.rollback()
        return None
    finally:
        await engine.dispose()


def sync_server_swap(url: str, connect_args: dict[str, Any]) -> str | None:
    engine = sa.create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as a, engine.connect() as b:
            for _ in range(6):
                a.execute(QUERY, {"k": "x"})
            a.commit()
            b.execute(sa.text("SELECT 1"))
            try:
                a.execute(QUERY, {"k": "x"})
            except sa.exc.DBAPIError as exc:
                return str(exc.orig).splitlines()[0]
            finally:
                b.rollback()
        return None
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_driver_defaults_break_behind_transaction_pooling(
    bouncer: PgBouncer, bounced_database: str, driver: Driver
) -> None:
    """Without the settings, a prepared statement goes missing on the next server connection."""
    error = await server_swap(bouncer.url(driver, bounced_database), {})
    assert error is not None, "the defaults worked behind PgBouncer: is it in transaction mode?"
    assert error.endswith("does not exist"), error


@pytest.mark.parametrize("driver", DRIVERS)
async def test_driver_settings_work_behind_transaction_pooling(
    bouncer: PgBouncer, bounced_database: str, driver: Driver, figures: dict[str, Any]
) -> None:
    """With the settings, the same switch works, and so do 60 concurrent transactions."""
    url = bouncer.url(driver, bounced_database)
    assert await server_swap(url, PGBOUNCER_CONNECT_ARGS[driver]) is None
    errors = await transactions(url, PGBOUNCER_CONNECT_ARGS[driver])
    figures.update(requests=60, statuses={"error": len(errors)})
    assert errors == []


async def test_sqlalchemy_statement_names_alone_do_not_make_asyncpg_work(
    bouncer: PgBouncer, bounced_database: str
) -> None:
    """SQLAlchemy's documented ``prepared_statement_name_func`` recipe, without the cache setting."""
    counter = itertools.count()
    connect_args = {"prepared_statement_name_func": lambda: f"__asyncpg_{next(counter)}__"}
    error = await server_swap(bouncer.url("asyncpg", bounced_database), connect_args)
    assert error is not None
    assert error.endswith("does not exist"), error


@pytest.fixture
async def bounced_app(
    bouncer: PgBouncer, bounced_database: str
) -> AsyncIterator[Callable[[str], Any]]:
    made: list[Any] = []

    def make(flavour: str) -> Any:
        driver: Driver = "asyncpg" if flavour == "async" else "psycopg"
        options = {"connect_args": PGBOUNCER_CONNECT_ARGS[driver], "pool_size": 8}
        db, tracker = make_database(bouncer.url(driver, bounced_database), flavour, options)
        made.append(db)
        return db, tracker, build_app(db, tracker)

    yield make
    for db in made:
        await dispose(db)


MIX = ["ok"] * 6 + ["reject", "crash", "commit", "dup"]


@pytest.mark.parametrize("flavour", ["async", "sync"], ids=["asyncpg", "psycopg"])
async def test_truth_through_pgbouncer(
    bounced_app: Callable[[str], Any],
    postgres_server: PostgresServer,
    bounced_database: str,
    flavour: str,
    figures: dict[str, Any],
) -> None:
    """300 mixed writes from 16 clients through PgBouncer: every 2xx committed, nothing else."""
    db, tracker, app = bounced_app(flavour)
    outcomes = Outcomes()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    keys = iter(range(300))

    async def client_loop() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for n in keys:
                await post_write(client, outcomes, f"p{n}", mode=MIX[n % len(MIX)])

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(client_loop)

    sync_url = postgres_server.url("psycopg", database=bounced_database)
    check = truth(sync_url, outcomes)
    figures.update(requests=300, statuses=outcomes.counts())
    expected = {"ok": 201, "reject": 409, "crash": 500, "commit": 500, "dup": 500}
    assert all(outcomes.statuses[f"p{n}"] == expected[MIX[n % len(MIX)]] for n in range(300)), (
        outcomes.counts()
    )
    assert check.acknowledged_missing == set()
    assert check.refused_present == set()
    assert check.failed_present == set()
    assert check.unexplained == set()
    await assert_no_leaks(lambda: checked_out(db), tracker, figures)
