"""SQLModel sessions as first-class citizens: ``.exec()`` everywhere, typed under mypy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from middleware_sessions import AsyncDatabase, Database
from middleware_sessions.testing import async_outer_transaction, outer_transaction

from ._backends import URL_BACKENDS, fresh_urls
from .helpers import Client, make_app

sqlmodel = pytest.importorskip("sqlmodel")
from sqlmodel import Field, Session, SQLModel, select  # noqa: E402
from sqlmodel.ext.asyncio.session import AsyncSession  # noqa: E402


class Hero(SQLModel, table=True):
    __tablename__ = "heroes"
    id: int | None = Field(default=None, primary_key=True)
    name: str


@pytest.fixture(params=URL_BACKENDS)
def hero_urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """A fresh database with the heroes table: its (sync, async) URLs."""
    return fresh_urls(request, tmp_path, SQLModel.metadata)


@pytest.fixture(params=["sync", "async"])
async def hero_db(request: pytest.FixtureRequest, hero_urls: tuple[str, str]) -> AsyncIterator[Any]:
    """A SQLModel-classed Database or AsyncDatabase over an empty heroes table."""
    sync_url, async_url = hero_urls
    db: Any
    if request.param == "sync":
        db = Database(sync_url, session_options={"class_": Session}, blocking_check="ignore")
    else:
        db = AsyncDatabase(async_url, session_options={"class_": AsyncSession})
    yield db
    if isinstance(db, AsyncDatabase):
        await db.engine.dispose()
    else:
        db.engine.dispose()


def hero_routes(app: FastAPI, db: Any) -> None:
    """POST /heroes adds one; GET /heroes lists them with ``.exec()``."""
    if isinstance(db, AsyncDatabase):

        @app.post("/heroes", status_code=201)
        async def add_async(name: str) -> None:
            assert isinstance(db.session, AsyncSession)
            db.session.add(Hero(name=name))

        @app.get("/heroes")
        async def list_async() -> list[str]:
            return [h.name for h in (await db.session.exec(select(Hero))).all()]

    else:

        @app.post("/heroes", status_code=201)
        def add_sync(name: str) -> None:
            assert isinstance(db.session, Session)
            db.session.add(Hero(name=name))

        @app.get("/heroes")
        def list_sync() -> list[str]:
            return [h.name for h in db.session.exec(select(Hero)).all()]


async def test_routes_use_exec_on_the_request_session(hero_db: Any, client: Client) -> None:
    app = make_app(hero_db)
    hero_routes(app, hero_db)
    http = client(app)

    assert (await http.post("/heroes", params={"name": "Deadpond"})).status_code == 201
    response = await http.get("/heroes")

    assert response.json() == ["Deadpond"]
    assert hero_db.engine.pool.checkedout() == 0


async def test_session_scope_gives_the_sqlmodel_session(hero_db: Any) -> None:
    if isinstance(hero_db, AsyncDatabase):
        async with hero_db.session_scope() as session:
            session.add(Hero(name="Rusty-Man"))
        async with hero_db.session_scope() as session:
            names = [h.name for h in (await session.exec(select(Hero))).all()]
    else:
        with hero_db.session_scope() as session:
            session.add(Hero(name="Rusty-Man"))
        with hero_db.session_scope() as session:
            names = [h.name for h in session.exec(select(Hero)).all()]

    assert names == ["Rusty-Man"]


async def test_override_and_outer_transaction_keep_the_sqlmodel_session(
    hero_db: Any, client: Client, tmp_path: Path
) -> None:
    app = make_app(hero_db)
    hero_routes(app, hero_db)
    http = client(app)
    if isinstance(hero_db, AsyncDatabase):
        async with async_outer_transaction(hero_db):
            assert (await http.post("/heroes", params={"name": "inside"})).status_code == 201
            assert (await http.get("/heroes")).json() == ["inside"]
        async with hero_db.override(engine=hero_db.engine), hero_db.session_scope() as session:
            assert isinstance(session, AsyncSession)
    else:
        with outer_transaction(hero_db):
            assert (await http.post("/heroes", params={"name": "inside"})).status_code == 201
            assert (await http.get("/heroes")).json() == ["inside"]
        with hero_db.override(f"sqlite:///{tmp_path}/other.db"), hero_db.session_scope() as s:
            assert isinstance(s, Session)

    assert (await http.get("/heroes")).json() == []


def test_db_session_is_typed_as_the_given_class_under_mypy_strict() -> None:
    mypy_api = pytest.importorskip("mypy.api")
    sample = Path(__file__).parent / "typing" / "sqlmodel_app.py"

    stdout, stderr, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir=/dev/null", str(sample)]
    )

    assert status == 0, stdout + stderr
