"""session_scope(): a session for work outside a request."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import select

from middleware_sessions import AsyncDatabase, Database, MissingSessionError

from .helpers import AnyDatabase, Item, checked_out, committed_names


async def add_in_scope(db: AnyDatabase, name: str, *, fail: bool = False) -> None:
    """Add an item inside ``db.session_scope()``; raise afterwards if ``fail``."""
    if isinstance(db, AsyncDatabase):
        async with db.session_scope() as session:
            session.add(Item(name=name))
            assert db.session is session
            if fail:
                raise LookupError("failed inside the scope")
    else:
        with db.session_scope() as sync_session:
            sync_session.add(Item(name=name))
            assert db.session is sync_session
            if fail:
                raise LookupError("failed inside the scope")


async def test_scope_commits_on_normal_exit(database: AnyDatabase) -> None:
    await add_in_scope(database, "seed")

    assert await committed_names(database) == {"seed"}
    assert checked_out(database) == 0


async def test_scope_rolls_back_and_reraises_on_exception(database: AnyDatabase) -> None:
    with pytest.raises(LookupError):
        await add_in_scope(database, "dropped", fail=True)

    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def test_scope_reraises_a_failed_commit_and_rolls_back(database: AnyDatabase) -> None:
    if isinstance(database, AsyncDatabase):
        with pytest.raises(Exception, match=r"FOREIGN KEY|foreign key"):
            async with database.session_scope() as session:
                session.add(Item(name="orphan", parent_id=12345))
    else:
        with (
            pytest.raises(Exception, match=r"FOREIGN KEY|foreign key"),
            database.session_scope() as sync_session,
        ):
            sync_session.add(Item(name="orphan", parent_id=12345))

    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def test_db_session_outside_the_scope_raises_again(database: AnyDatabase) -> None:
    await add_in_scope(database, "x")

    with pytest.raises(MissingSessionError):
        _ = database.session


async def test_nested_scopes_each_get_their_own_session(database: AnyDatabase) -> None:
    if isinstance(database, AsyncDatabase):
        async with database.session_scope() as outer:
            async with database.session_scope() as inner:
                assert inner is not outer
                assert database.session is inner
                inner.add(Item(name="inner"))
            assert database.session is outer
            outer.add(Item(name="outer"))
    else:
        with database.session_scope() as sync_outer:
            with database.session_scope() as sync_inner:
                assert sync_inner is not sync_outer
                assert database.session is sync_inner
                sync_inner.add(Item(name="inner"))
            assert database.session is sync_outer
            sync_outer.add(Item(name="outer"))

    assert await committed_names(database) == {"inner", "outer"}
    assert checked_out(database) == 0


async def test_inner_scope_failure_does_not_undo_the_outer_scope(database: AnyDatabase) -> None:
    if isinstance(database, AsyncDatabase):
        async with database.session_scope() as outer:
            outer.add(Item(name="outer"))
            with pytest.raises(LookupError):
                async with database.session_scope() as inner:
                    inner.add(Item(name="inner"))
                    raise LookupError
    else:
        with database.session_scope() as sync_outer:
            sync_outer.add(Item(name="outer"))
            with pytest.raises(LookupError), database.session_scope() as sync_inner:
                sync_inner.add(Item(name="inner"))
                raise LookupError

    assert await committed_names(database) == {"outer"}


async def test_concurrent_tasks_with_their_own_scopes_do_not_interfere(
    async_database: AsyncDatabase,
) -> None:
    adb = async_database
    seen: dict[int, object] = {}  # the sessions themselves: ids are unique among live objects

    async def worker(n: int) -> None:
        async with adb.session_scope() as session:
            session.add(Item(name=f"task-{n}"))
            await anyio.sleep(0.01)
            seen[n] = adb.session
            assert adb.session is session

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(worker, n)

    assert len({id(session) for session in seen.values()}) == 20
    assert await committed_names(adb) == {f"task-{n}" for n in range(20)}
    assert checked_out(adb) == 0


async def test_threads_with_their_own_scopes_do_not_interfere(sync_database: Database) -> None:
    sdb = sync_database

    def worker(n: int) -> None:
        with sdb.session_scope() as session:
            session.add(Item(name=f"thread-{n}"))
            session.flush()
            assert sdb.session is session

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(anyio.to_thread.run_sync, worker, n)

    with sdb.sessionmaker() as session:
        assert set(session.scalars(select(Item.name))) == {f"thread-{n}" for n in range(10)}
    assert checked_out(sdb) == 0


async def test_scope_cancelled_from_outside_rolls_back_and_closes(
    async_database: AsyncDatabase,
) -> None:
    adb = async_database
    with anyio.CancelScope() as outside:
        async with adb.session_scope() as session:
            session.add(Item(name="cancelled"))
            await session.flush()
            outside.cancel()  # delivered at the next await: once the row is flushed
            await anyio.sleep_forever()

    assert await committed_names(adb) == set()
    assert checked_out(adb) == 0


def test_scope_works_with_no_event_loop_at_all(tmp_path: object) -> None:
    db = Database(f"sqlite:///{tmp_path}/plain.db")
    from .helpers import Base

    Base.metadata.create_all(db.engine)
    with db.session_scope() as session:
        session.add(Item(name="script"))
    with db.session_scope() as session:
        assert list(session.scalars(select(Item.name))) == ["script"]
    db.engine.dispose()


async def test_scope_with_commit_false_rolls_back_at_the_end(database: AnyDatabase) -> None:
    if isinstance(database, AsyncDatabase):
        async with database.session_scope(commit=False) as session:
            session.add(Item(name="preview"))
            await session.flush()
    else:
        with database.session_scope(commit=False) as sync_session:
            sync_session.add(Item(name="preview"))
            sync_session.flush()

    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def test_scope_with_commit_false_keeps_what_the_block_committed(
    database: AnyDatabase,
) -> None:
    if isinstance(database, AsyncDatabase):
        async with database.session_scope(commit=False) as session:
            session.add(Item(name="explicit"))
            await session.commit()
            session.add(Item(name="left over"))
    else:
        with database.session_scope(commit=False) as sync_session:
            sync_session.add(Item(name="explicit"))
            sync_session.commit()
            sync_session.add(Item(name="left over"))

    assert await committed_names(database) == {"explicit"}


async def test_scope_takes_session_options_for_that_scope_only(database: AnyDatabase) -> None:
    if isinstance(database, AsyncDatabase):
        async with database.session_scope(autoflush=False, info={"job": 7}) as session:
            assert session.sync_session.autoflush is False
            assert session.info["job"] == 7
        async with database.session_scope() as session:
            assert session.sync_session.autoflush is True
            assert "job" not in session.info
    else:
        with database.session_scope(autoflush=False, info={"job": 7}) as sync_session:
            assert sync_session.autoflush is False
            assert sync_session.info["job"] == 7
        with database.session_scope() as sync_session:
            assert sync_session.autoflush is True
            assert "job" not in sync_session.info
