"""Self-tests for the throwaway PostgreSQL server in ``tests/_postgres.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from ._postgres import PostgresServer, ShutdownMode, skip_reason
from ._replica import Replication

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


def _scalar(url: str, sql: str) -> object:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar_one()
    finally:
        engine.dispose()


async def _async_scalar(url: str, sql: str) -> object:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(sql))).scalar_one()
    finally:
        await engine.dispose()


def test_connect_with_every_driver_and_password_is_checked(pg: PostgresServer) -> None:
    assert pg.url("asyncpg") == f"postgresql+asyncpg://app:app-secret-pw@127.0.0.1:{pg.port}/app"
    assert _scalar(pg.url("psycopg"), "SELECT current_user") == "app"
    assert asyncio.run(_async_scalar(pg.url("asyncpg"), "SELECT 1")) == 1
    assert asyncio.run(_async_scalar(pg.url("psycopg_async"), "SELECT 1")) == 1
    assert _scalar(pg.superuser_url("psycopg"), "SELECT current_user") == "postgres"

    wrong_password = pg.url("psycopg").replace(pg.password, "wrong")
    with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
        _scalar(wrong_password, "SELECT 1")


def test_create_database_is_owned_by_app_role(pg: PostgresServer) -> None:
    pg.create_database("isolated_one")
    try:
        url = pg.url("psycopg", database="isolated_one")
        owner = _scalar(
            url,
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()",
        )
        assert owner == "app"
    finally:
        pg.drop_database("isolated_one")
    with pytest.raises(ValueError, match="identifier"):
        pg.create_database('x"; DROP DATABASE app; --')


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_port_and_data(pg: PostgresServer, mode: ShutdownMode) -> None:
    url, port = pg.url("psycopg"), pg.port
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE survivor_{mode} (value int)"))
            conn.execute(sa.text(f"INSERT INTO survivor_{mode} VALUES (42)"))

        pg.stop_server_only(mode)
        assert not pg.running
        engine.dispose()
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass

        pg.start_again()
        assert pg.running
        assert pg.port == port
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT value FROM survivor_{mode}")).scalar_one() == 42
    finally:
        engine.dispose()


def test_stop_is_idempotent_and_cleans_up() -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PostgresServer().start()
    tempdir = server.tempdir
    assert server.running
    server.stop()
    server.stop()
    assert not server.running
    assert not tempdir.exists()


def test_the_replica_streams_and_its_replay_can_be_paused(replicated: Replication) -> None:
    primary, replica = replicated.primary, replicated.replica
    assert replica.psql("SELECT pg_is_in_recovery()").strip() == "t"
    db = replicated.database
    primary.psql("CREATE TABLE streamed (value int)", database=db)
    replica.pause_replay()
    primary.psql("INSERT INTO streamed VALUES (1)", database=db)
    # Paused: the replica still has the table (replayed before) but not the row.
    assert replica.psql("SELECT count(*) FROM streamed", database=db).strip() == "0"
    replica.resume_replay()
    replica.catch_up()
    assert replica.psql("SELECT count(*) FROM streamed", database=db).strip() == "1"


def test_the_replica_comes_back_after_a_stop(replicated: Replication) -> None:
    primary, replica = replicated.primary, replicated.replica
    replica.stop_server_only()
    primary.psql("CREATE TABLE while_stopped (value int)", database=replicated.database)
    replica.start_again()
    replica.catch_up()
    assert (
        replica.psql("SELECT count(*) FROM while_stopped", database=replicated.database).strip()
        == "0"
    )
