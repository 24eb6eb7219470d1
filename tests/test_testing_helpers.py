"""outer_transaction() / async_outer_transaction() and db.override(), used in-process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import create_async_engine

from middleware_sessions import AsyncDatabase, Database
from middleware_sessions.testing import async_outer_transaction, outer_transaction

from .helpers import (
    AnyDatabase,
    Base,
    Client,
    Item,
    add_item,
    checked_out,
    committed_names,
    make_app,
    route,
)


async def test_everything_inside_the_outer_transaction_is_rolled_back(
    database: AnyDatabase, client: Client
) -> None:
    db = database
    app = make_app(db)
    route(app, db, "/items", add_item, status_code=201)

    async def work() -> None:
        assert (await client(app).post("/items", params={"name": "route"})).status_code == 201
        if isinstance(db, AsyncDatabase):
            async with db.session_scope() as session:
                session.add(Item(name="scope"))
        else:
            with db.session_scope() as sync_session:
                sync_session.add(Item(name="scope"))
        # Inside the test, the writes are visible through the database's sessions.
        assert await committed_names(db) == {"route", "scope"}

    if isinstance(db, AsyncDatabase):
        async with async_outer_transaction(db):
            await work()
    else:
        with outer_transaction(db):
            await work()

    assert await committed_names(db) == set()


async def test_the_helpers_refuse_the_other_kind_of_database(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="async_outer_transaction"):  # noqa: SIM117
        with outer_transaction(AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path}/a.db")):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="outer_transaction"):
        async with async_outer_transaction(Database(f"sqlite:///{tmp_path}/s.db")):  # type: ignore[arg-type]
            pass


async def test_override_with_an_engine_leaves_that_engine_to_its_owner(tmp_path: Path) -> None:
    db = AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path}/real.db")
    original = db.engine
    test_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/test.db")

    with db.override(engine=test_engine):
        assert db.engine is test_engine
        assert not db.owns_engine
    assert db.engine is original
    assert db.owns_engine
    await test_engine.dispose()
    await original.dispose()


async def test_override_of_a_sync_database_in_async_with(tmp_path: Path, client: Client) -> None:
    path = tmp_path / "override.db"
    Base.metadata.create_all(create_engine(f"sqlite:///{path}"))
    db = Database(f"sqlite:///{tmp_path}/real.db", blocking_check="ignore")
    app = make_app(db)
    route(app, db, "/items", add_item, status_code=201)

    async with db.override(f"sqlite:///{path}"):
        assert (await client(app).post("/items", params={"name": "there"})).status_code == 201
        assert await committed_names(db) == {"there"}
    assert db.engine.url.database == f"{tmp_path}/real.db"


async def test_a_failed_override_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    """The bug of issue 12: a failing override must not change repr or engine ownership."""
    user_engine = create_engine(f"sqlite:///{tmp_path}/user.db")
    db = Database(engine=user_engine, blocking_check="ignore")
    before = repr(db)

    with pytest.raises(ValueError, match="dialect"):  # noqa: SIM117
        with db.override("mysql+nonexistentdriver://user:secret@host/db"):
            pass

    assert repr(db) == before
    assert "mysql" not in repr(db)
    assert db.engine is user_engine
    assert not db.owns_engine
    user_engine.dispose()


async def test_override_keeps_the_constructors_session_options(tmp_path: Path) -> None:
    db = Database(
        f"sqlite:///{tmp_path}/real.db",
        session_options={"info": {"marker": "kept"}, "autoflush": False},
    )

    with db.override(f"sqlite:///{tmp_path}/test.db"), db.session_scope() as session:
        assert session.info["marker"] == "kept"
        assert session.autoflush is False
    with db.override(f"sqlite:///{tmp_path}/test.db", session_options={}):  # noqa: SIM117
        with db.session_scope() as session:
            assert "marker" not in session.info
    db.engine.dispose()


async def test_nested_outer_transactions_roll_back_to_the_outer_one(
    database: AnyDatabase, client: Client
) -> None:
    """Data made in a wider block survives the inner block; the inner block's does not."""
    app = make_app(database)
    route(app, database, "/items", add_item, status_code=201)

    async def post(name: str) -> None:
        assert (await client(app).post("/items", params={"name": name})).status_code == 201

    if isinstance(database, AsyncDatabase):
        async with async_outer_transaction(database):
            await post("wide")
            async with async_outer_transaction(database):
                await post("narrow")
                assert await names_in_the_test(database) == {"wide", "narrow"}
            assert await names_in_the_test(database) == {"wide"}
    else:
        with outer_transaction(database):
            await post("wide")
            with outer_transaction(database):
                await post("narrow")
                assert await names_in_the_test(database) == {"wide", "narrow"}
            assert await names_in_the_test(database) == {"wide"}

    assert await committed_names(database) == set()
    assert checked_out(database) == 0


async def names_in_the_test(db: AnyDatabase) -> set[str]:
    """What a session bound to the test's connection sees (committed or not)."""
    if isinstance(db, AsyncDatabase):
        async with db.session_scope() as session:
            return set((await session.scalars(select(Item.name))).all())
    with db.session_scope() as sync_session:
        return set(sync_session.scalars(select(Item.name)))


def test_the_helpers_import_without_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from middleware_sessions.testing import outer_transaction, async_outer_transaction\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
