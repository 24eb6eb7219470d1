"""Choosing a replica, read-your-writes tokens and the WAL position, against a real
primary and streaming replica (``middleware_sessions._replicas``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from middleware_sessions._replicas import Replay, ReplicaSet, Route, bind_route, routed_class
from middleware_sessions._tokens import UNVERIFIED, Tokens, insert_lsn, track_writes, wrote
from middleware_sessions.exceptions import ReadOnlySessionError

from ._replica import Replication
from .helpers import Item

pytestmark = pytest.mark.postgres

IN_RECOVERY = text("SELECT pg_is_in_recovery()")


@pytest.fixture
def engines(replicated: Replication) -> Iterator[tuple[Engine, Engine]]:
    """Sync engines on the primary and the replica."""
    primary = create_engine(replicated.url("psycopg"), pool_pre_ping=True)
    replica = create_engine(replicated.replica_url("psycopg"), pool_pre_ping=True)
    yield primary, replica
    primary.dispose()
    replica.dispose()


def replica_set(replica: Engine, **options: Any) -> ReplicaSet:
    settings = {"max_lag": 60.0, "wait": 0.05, "quarantine": 60.0, **options}
    return ReplicaSet([replica], ["replica"], **settings)


def write_and_commit(primary: Engine, name: str) -> int:
    """Insert an item through a session that tracks writes; the token it earns."""
    factory = sessionmaker(primary)
    track_writes(factory.class_)
    with factory() as session:
        session.add(Item(name=name))
        session.commit()
        assert wrote(session)
        return insert_lsn(session)


def visible_on(engine: Engine, name: str) -> bool:
    with engine.connect() as conn:
        return conn.scalar(select(Item.id).where(Item.name == name)) is not None


def test_a_healthy_replica_is_chosen_without_a_token(engines: tuple[Engine, Engine]) -> None:
    _, replica = engines
    chosen = replica_set(replica).choose(None)
    assert chosen is not None
    with chosen.engine.connect() as conn:
        assert conn.scalar(IN_RECOVERY) is True


def test_a_token_the_replica_has_not_replayed_sends_the_read_to_the_primary(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    replicated.replica.pause_replay()
    token = write_and_commit(primary, "paused")
    assert not visible_on(replica, "paused")
    assert replica_set(replica).choose(token) is None


def test_a_token_the_replica_has_replayed_is_served_by_it(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    token = write_and_commit(primary, "replayed")
    replicated.replica.catch_up()
    assert replica_set(replica).choose(token) is not None


def test_a_token_waits_for_the_replica_to_replay_it(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    replicated.replica.pause_replay()
    token = write_and_commit(primary, "waited-for")
    replicas = replica_set(replica, wait=60.0)
    result: list[Any] = []
    chooser = threading.Thread(target=lambda: result.append(replicas.choose(token)))
    chooser.start()
    # Resume only once the chooser is waiting on the replica.
    deadline = time.monotonic() + 30
    while "1" not in replicated.replica.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'DO $$%pg_sleep%'"
    ):
        assert time.monotonic() < deadline, "the chooser never waited on the replica"
        time.sleep(0.01)
    assert chooser.is_alive()
    replicated.replica.resume_replay()
    chooser.join(timeout=60)
    assert result
    assert result[0] is not None
    assert visible_on(result[0].engine, "waited-for")


def test_a_token_position_is_at_or_after_its_commit(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    """Once the replica has replayed up to the token, the write is visible there."""
    primary, replica = engines
    replicated.replica.set_apply_delay(0.05)
    for n in range(20):
        token = write_and_commit(primary, f"row-{n}")
        while replicated.replica.replay_lsn() < token:
            time.sleep(0.005)
        assert visible_on(replica, f"row-{n}")


def test_an_unverified_token_goes_to_the_primary_without_probing(
    engines: tuple[Engine, Engine],
) -> None:
    _, replica = engines
    replicas = replica_set(replica)
    assert replicas.choose(UNVERIFIED) is None
    assert replicas.replicas[0].health is None


def test_a_stopped_replica_is_skipped_then_used_again(
    replicated: Replication, engines: tuple[Engine, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    _, replica = engines
    replicas = replica_set(replica, quarantine=0.0)
    assert replicas.choose(None) is not None
    replicated.replica.stop_server_only()
    replicas.replicas[0].health = None  # as if the last probe were too old
    with caplog.at_level(logging.WARNING, "middleware_sessions"):
        assert replicas.choose(None) is None
    assert "is unreachable" in caplog.text
    assert "secret-pw" not in caplog.text
    replicated.replica.start_again()
    assert replicas.choose(None) is not None


def test_a_quarantined_replica_is_not_probed(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    _, replica = engines
    replicas = replica_set(replica, quarantine=60.0)
    replicated.replica.stop_server_only()
    assert replicas.choose(None) is None
    replicated.replica.start_again()
    assert replicas.choose(None) is None  # still within its quarantine


def test_a_replica_lagging_beyond_the_bound_is_skipped(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    primary, replica = engines
    replicated.replica.pause_replay()
    write_and_commit(primary, "unreplayed")
    # Received but not applied: the replica now measures a lag above zero.
    deadline = time.monotonic() + 30
    while (
        replicated.replica.psql(
            "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"
        ).strip()
        != "t"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert replica_set(replica, max_lag=0.0).choose(None) is None
    assert replica_set(replica, max_lag=3600.0).choose(None) is not None


async def routed_read(flavour: str, request: pytest.FixtureRequest, token: int | None) -> Any:
    """``(pg_is_in_recovery(), first item name)`` read through a routed session."""
    query = select(func.pg_is_in_recovery(), select(Item.name).limit(1).scalar_subquery())
    if flavour == "sync":
        primary, replica = request.getfixturevalue("engines")
        with sessionmaker(primary, class_=routed_class(Session))() as session:
            bind_route(session, Route(replica_set(replica), token, "read_only=True"))
            return tuple(session.execute(query).one())
    replicated: Replication = request.getfixturevalue("replicated")
    async_primary = create_async_engine(replicated.url("asyncpg"))
    async_replica = create_async_engine(replicated.replica_url("asyncpg"))
    try:
        factory = async_sessionmaker(async_primary, sync_session_class=routed_class(Session))
        async with factory() as async_session:
            route = Route(replica_set(async_replica.sync_engine), token, "read_only=True")
            bind_route(async_session.sync_session, route)
            return tuple((await async_session.execute(query)).one())
    finally:
        await async_primary.dispose()
        await async_replica.dispose()


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_routed_session_reads_from_the_replica(
    request: pytest.FixtureRequest, flavour: str
) -> None:
    assert await routed_read(flavour, request, None) == (True, None)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_routed_session_reads_from_the_primary_when_no_replica_fits(
    replicated: Replication,
    engines: tuple[Engine, Engine],
    request: pytest.FixtureRequest,
    flavour: str,
) -> None:
    replicated.replica.pause_replay()
    token = write_and_commit(engines[0], "fresh")
    assert await routed_read(flavour, request, token) == (False, "fresh")


def test_a_routed_session_refuses_to_write(engines: tuple[Engine, Engine]) -> None:
    primary, replica = engines
    with sessionmaker(primary, class_=routed_class(Session))() as session:
        bind_route(
            session, Route(replica_set(replica), None, "@transaction_policy(read_only=True)")
        )
        session.add(Item(name="nope"))
        with pytest.raises(ReadOnlySessionError, match=r"transaction_policy\(read_only=True\)"):
            session.flush()
    assert not visible_on(primary, "nope")


def test_only_sessions_that_wrote_are_marked(engines: tuple[Engine, Engine]) -> None:
    primary, _ = engines
    factory = sessionmaker(primary)
    track_writes(factory.class_)
    with factory() as reader:
        reader.scalars(select(Item)).all()
        reader.execute(text("SELECT 1"))
        reader.flush()
        assert not wrote(reader)
    with factory() as writer:
        writer.execute(text("UPDATE items SET name = name"))
        assert wrote(writer)


async def test_the_async_flavour_reads_the_position_after_commit(
    replicated: Replication,
) -> None:
    engine = create_async_engine(replicated.url("asyncpg"))
    try:
        sync_class = type("TrackedSession", (Session,), {})
        track_writes(sync_class)
        factory = async_sessionmaker(engine, sync_session_class=sync_class)
        async with factory() as session:
            session.add(Item(name="async-write"))
            await session.commit()
            token = await session.run_sync(insert_lsn)
    finally:
        await engine.dispose()
    replicated.replica.catch_up()
    assert replicated.replica.replay_lsn() >= token > 0


def test_tokens_are_signed() -> None:
    tokens = Tokens("lsn", "s3cret", 5)
    assert tokens.read(tokens.sign(0x16B3748)) == 0x16B3748
    forged = tokens.sign(5).replace("5.", "6.", 1)
    assert tokens.read(forged) == UNVERIFIED
    assert tokens.read("garbage") == UNVERIFIED
    assert Tokens("lsn", "another", 5).read(tokens.sign(5)) == UNVERIFIED
    assert Tokens("other", "s3cret", 5).read(tokens.sign(5)) == UNVERIFIED


def test_tokens_without_a_secret_are_only_accepted_by_their_own_process() -> None:
    one, two = Tokens("lsn", None, 5), Tokens("lsn", None, 5)
    assert one.read(one.sign(7)) == 7
    assert two.read(one.sign(7)) == UNVERIFIED


def test_a_token_is_found_among_the_request_cookies() -> None:
    tokens = Tokens("db_lsn", "k", max_age=5)
    name, value = tokens.header(tokens.sign(42))
    assert name == b"set-cookie"
    assert value.startswith(b"db_lsn=")
    assert b"; Max-Age=5; Path=/; HttpOnly; SameSite=Lax" in value
    cookie = value.split(b";")[0]
    headers = [(b"accept", b"*/*"), (b"cookie", b"a=1; " + cookie + b"; b=2")]
    assert tokens.from_headers(headers) == 42
    assert tokens.from_headers([(b"cookie", b"a=1")]) is None
    assert tokens.from_headers([]) is None


def test_a_token_read_at_a_page_boundary_is_reached_by_the_replica(
    replicated: Replication, engines: tuple[Engine, Engine]
) -> None:
    """After a WAL switch the insert position sits past a page header; the token must not."""
    primary, _ = engines
    write_and_commit(primary, "before-the-switch")
    replicated.primary.psql("SELECT pg_switch_wal()")
    with sessionmaker(primary)() as session:
        token = insert_lsn(session)
    # Caught up with all the primary wrote (its write position, where records end).
    replicated.replica.catch_up()
    assert replicated.replica.replay_lsn() >= token


async def test_a_bodiless_request_can_be_received_again() -> None:
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    replay = Replay(receive)
    first = await replay.receive()
    assert replay.rewind()
    assert await replay.receive() == first


async def test_a_request_with_a_body_cannot_be_received_again() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    replay = Replay(receive)
    await replay.receive()
    assert not replay.rewind()


def test_a_server_that_is_not_in_recovery_is_not_used_as_a_replica(
    engines: tuple[Engine, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    primary, _ = engines
    with caplog.at_level(logging.WARNING, "middleware_sessions"):
        assert replica_set(primary).choose(None) is None
    assert "is not in recovery" in caplog.text
