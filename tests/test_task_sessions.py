"""Per-task sessions: ``db.task_sessions()``, ``db.gather()`` and ``db.task_session()``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import text

from middleware_sessions import AsyncDatabase, DBSessionMiddleware, MissingSessionError
from middleware_sessions.exceptions import CONCURRENT_USE

from ._backends import URL_BACKENDS, enforce_foreign_keys, fresh_urls
from .helpers import Item, add_orphan, checked_out, committed_names


@pytest.fixture(params=URL_BACKENDS)
async def adb(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncDatabase]:
    """An AsyncDatabase on SQLite or PostgreSQL, with empty tables."""
    _, async_url = fresh_urls(request, tmp_path)
    db = AsyncDatabase(async_url)
    yield db
    await db.engine.dispose()


async def test_each_task_gets_its_own_session_and_the_block_keeps_the_scope_session(
    adb: AsyncDatabase,
) -> None:
    async def whose() -> object:
        return adb.session

    async with adb.session_scope() as scope_session, adb.task_sessions():
        first, second = await asyncio.gather(whose(), whose())
        assert adb.session is scope_session
    assert len({id(first), id(second), id(scope_session)}) == 3


async def test_a_task_that_finishes_cleanly_commits_its_session(adb: AsyncDatabase) -> None:
    async def add(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()

    async with adb.session_scope(), adb.task_sessions():
        await asyncio.create_task(add("from-task"))
    assert await committed_names(adb) == {"from-task"}


async def test_a_task_that_raises_rolls_back_its_session(adb: AsyncDatabase) -> None:
    async def add_then_fail(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()
        raise LookupError(name)

    async def add(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()

    async with adb.session_scope(), adb.task_sessions():
        results = await asyncio.gather(add_then_fail("bad"), add("good"), return_exceptions=True)
    assert isinstance(results[0], LookupError)
    assert await committed_names(adb) == {"good"}
    assert checked_out(adb) == 0


async def test_gather_settles_each_session_before_it_returns(adb: AsyncDatabase) -> None:
    async def add(name: str) -> str:
        adb.session.add(Item(name=name))
        await adb.session.flush()
        return name

    async with adb.session_scope():
        names = await adb.gather(add("a"), add("b"), add("c"))
        # Still inside the scope: the rows are committed already.
        assert await committed_names(adb) == {"a", "b", "c"}
    assert names == ["a", "b", "c"]


async def test_gather_rolls_back_the_coroutine_that_raised(adb: AsyncDatabase) -> None:
    """The sibling of a failure still ends and commits: gather raises only after it."""
    failed = asyncio.Event()

    async def add(name: str, fail: bool) -> None:
        if not fail:
            await failed.wait()  # writes and ends only after its sibling has raised
        adb.session.add(Item(name=name))
        await adb.session.flush()
        if fail:
            failed.set()
            raise LookupError(name)

    async with adb.session_scope():
        with pytest.raises(LookupError):
            await adb.gather(add("kept", False), add("dropped", True))
    assert await committed_names(adb) == {"kept"}
    assert checked_out(adb) == 0


async def test_a_task_whose_commit_fails_is_logged_and_its_connection_returned(
    adb: AsyncDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    enforce_foreign_keys(adb.engine.sync_engine)

    async def orphan() -> None:
        await adb.session.run_sync(add_orphan, "orphan")  # the foreign key fails at COMMIT

    with caplog.at_level(logging.ERROR, logger="middleware_sessions"):
        async with adb.session_scope(), adb.task_sessions():
            await asyncio.create_task(orphan())
    assert [r.getMessage() for r in caplog.records] == [
        "Could not commit the session of a finished task; it was rolled back."
    ]
    assert await committed_names(adb) == set()
    assert checked_out(adb) == 0


async def test_rollback_only_in_a_task_rolls_back_that_task_alone(adb: AsyncDatabase) -> None:
    async def add(name: str, dry_run: bool) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()
        if dry_run:
            adb.rollback_only()

    async with adb.session_scope(), adb.task_sessions():
        await adb.gather(add("kept", False), add("previewed", True))
        await asyncio.create_task(add("previewed-in-a-task", True))
        await add("the-scopes-own", False)
    assert await committed_names(adb) == {"kept", "the-scopes-own"}


async def test_no_task_commits_under_a_scope_that_never_commits(adb: AsyncDatabase) -> None:
    async def add(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()

    async with adb.session_scope(commit=False):
        await adb.gather(add("a"), add("b"))
    assert await committed_names(adb) == set()


async def test_no_task_commits_in_a_request_whose_middleware_never_commits(
    adb: AsyncDatabase,
) -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=adb, commit_on=None)

    async def add(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()

    @app.post("/items", status_code=201)
    async def create() -> None:
        await adb.gather(add("a"), add("b"))

    from httpx import ASGITransport, AsyncClient

    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/items")).status_code == 201
    assert await committed_names(adb) == set()


async def test_gather_in_a_route_commits_each_coroutine_with_a_2xx(adb: AsyncDatabase) -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=adb)

    async def count() -> int:
        return (await adb.session.execute(text("SELECT count(*) FROM items"))).scalar_one()

    async def add(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()

    @app.post("/items", status_code=201)
    async def create() -> dict[str, int]:
        await adb.gather(add("a"), add("b"))
        counts = await adb.gather(count(), count())
        return {"seen": min(counts)}

    from httpx import ASGITransport, AsyncClient

    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as client:
        response = await client.post("/items")
    assert response.status_code == 201
    assert response.json() == {"seen": 2}
    assert checked_out(adb) == 0


async def test_max_concurrent_caps_the_sessions_open_at_once(adb: AsyncDatabase) -> None:
    open_now = peak = 0
    started = 0
    all_started = asyncio.Event()

    async def work(n: int) -> int:
        nonlocal open_now, peak, started
        open_now += 1
        peak = max(peak, open_now)
        await adb.session.execute(text("SELECT 1"))
        started += 1
        if started == 2:
            all_started.set()
        # Hold the slot until two tasks hold one: without the cap, all six would.
        await all_started.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        open_now -= 1
        return n

    async with adb.session_scope(), adb.task_sessions(max_concurrent=2):
        results = await adb.gather(*(work(n) for n in range(6)))
    assert results == list(range(6))
    assert peak == 2
    assert checked_out(adb) == 0


async def test_task_session_waits_for_a_slot_and_is_the_tasks_db_session(
    adb: AsyncDatabase,
) -> None:
    async def work() -> bool:
        async with adb.task_session() as session, adb.task_session() as again:
            await session.execute(text("SELECT 1"))
            return session is again is adb.session

    async with adb.session_scope(), adb.task_sessions(max_concurrent=1):
        results = await asyncio.gather(*(asyncio.create_task(work()) for _ in range(3)))
    assert results == [True, True, True]
    assert checked_out(adb) == 0


async def test_a_task_without_a_slot_is_told_to_use_gather(adb: AsyncDatabase) -> None:
    async def bare() -> object:
        return adb.session

    async with adb.session_scope(), adb.task_sessions(max_concurrent=2):
        with pytest.raises(RuntimeError, match=r"db\.gather\(\)"):
            await asyncio.create_task(bare())


async def test_gather_with_max_concurrent_refuses_tasks(adb: AsyncDatabase) -> None:
    async def nothing() -> None:
        return None

    async with adb.session_scope(), adb.task_sessions(max_concurrent=2):
        task = asyncio.create_task(nothing())
        with pytest.raises(TypeError, match="coroutine objects only"):
            await adb.gather(task)
        await task


@pytest.mark.parametrize("bad", [0, -1])
async def test_max_concurrent_below_one_is_refused(adb: AsyncDatabase, bad: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        async with adb.task_sessions(max_concurrent=bad):
            pass


async def test_a_task_that_outlives_the_block_gets_missing_session_error(
    adb: AsyncDatabase,
) -> None:
    leave = asyncio.Event()

    async def late() -> object:
        await leave.wait()
        return adb.session

    async with adb.session_scope(), adb.task_sessions():
        task = asyncio.create_task(late())
    leave.set()
    with pytest.raises(MissingSessionError, match="outlived"):
        await task


async def test_a_task_running_at_block_end_is_rolled_back_and_its_connection_returned(
    adb: AsyncDatabase,
) -> None:
    written = asyncio.Event()
    leave = asyncio.Event()

    async def slow(name: str) -> None:
        adb.session.add(Item(name=name))
        await adb.session.flush()
        written.set()
        await leave.wait()

    async with adb.session_scope(), adb.task_sessions():
        task = asyncio.create_task(slow("unfinished"))
        await written.wait()
    assert checked_out(adb) == 0
    leave.set()
    await task
    assert await committed_names(adb) == set()


async def test_the_block_outside_any_scope_has_no_session_for_its_own_task(
    adb: AsyncDatabase,
) -> None:
    async with adb.task_sessions():
        with pytest.raises(MissingSessionError):
            _ = adb.session


def test_concurrent_session_error_points_to_per_task_sessions() -> None:
    assert "db.gather(" in CONCURRENT_USE
    assert "db.task_sessions()" in CONCURRENT_USE
