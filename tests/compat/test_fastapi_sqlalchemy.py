"""``middleware_sessions.compat.fastapi_sqlalchemy``: the peer's API, with our promise."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException
from sqlalchemy import create_engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import middleware_sessions
from middleware_sessions.compat import fastapi_sqlalchemy
from middleware_sessions.compat.fastapi_sqlalchemy import DBSessionMiddleware, db
from middleware_sessions.compat.fastapi_sqlalchemy import middleware as middleware_module
from middleware_sessions.compat.fastapi_sqlalchemy.exceptions import (
    MissingSessionError,
    SessionNotInitialisedError,
)

from .._backends import URL_BACKENDS, enforce_foreign_keys, fresh_urls
from ..helpers import Item, add_orphan, checked_out, committed_names


@pytest.fixture(params=URL_BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database's sync URL; the compat ``db`` is reset afterwards."""
    sync_url, _ = fresh_urls(request, tmp_path)
    yield sync_url
    if middleware_module._database is not None:
        middleware_module._database.engine.dispose()
        middleware_module._database = None


def _app(url: str, **options: Any) -> FastAPI:
    """An app with the middleware, built at once (Starlette builds it at the first call)."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db_url=url, **options)
    app.middleware_stack = app.build_middleware_stack()
    return app


def _client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def _add(name: str) -> None:
    db.session.add(Item(name=name))
    db.session.flush()


def _database() -> middleware_sessions.Database:
    database = middleware_module._database
    assert database is not None
    return database


def test_the_peers_names_are_importable_from_the_same_places() -> None:
    assert fastapi_sqlalchemy.__all__ == ["DBSessionMiddleware", "db"]
    assert middleware_module.DBSessionMiddleware is DBSessionMiddleware
    assert issubclass(MissingSessionError, middleware_sessions.MissingSessionError)
    assert issubclass(SessionNotInitialisedError, middleware_sessions.MissingSessionError)


def test_the_middleware_needs_a_url_or_an_engine() -> None:
    with pytest.raises(ValueError, match="db_url or a custom_engine"):
        DBSessionMiddleware(FastAPI())


def test_db_before_any_middleware_raises_session_not_initialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(middleware_module, "_database", None)
    with pytest.raises(SessionNotInitialisedError, match="add_middleware"):
        _ = db.session
    with pytest.raises(SessionNotInitialisedError), db():
        pass


def test_db_session_outside_a_request_or_block_raises_the_peers_error(url: str) -> None:
    _app(url)
    with pytest.raises(MissingSessionError, match="with db"):
        _ = db.session


def test_a_custom_engine_is_used_and_left_alone(url: str) -> None:
    engine = create_engine(url)
    DBSessionMiddleware(FastAPI(), custom_engine=engine)
    with db():
        assert db.session.get_bind() is engine
    assert not _database().owns_engine
    engine.dispose()


def test_engine_and_session_args_reach_the_engine_and_the_sessions(url: str) -> None:
    _app(url, engine_args={"pool_size": 3}, session_args={"expire_on_commit": False})
    with db():
        assert db.session.expire_on_commit is False
    assert _database().engine.pool.size() == 3  # type: ignore[attr-defined]


def test_a_block_without_commit_on_exit_keeps_nothing(url: str) -> None:
    _app(url)
    with db():
        _add("dropped")
    with db():
        assert db.session.query(Item).count() == 0


def test_a_block_with_commit_on_exit_commits(url: str) -> None:
    _app(url)
    with db(commit_on_exit=True):
        _add("kept")
    with db():
        assert [i.name for i in db.session.query(Item)] == ["kept"]


def test_an_exception_in_a_commit_on_exit_block_rolls_back_and_propagates(url: str) -> None:
    _app(url)
    with pytest.raises(LookupError), db(commit_on_exit=True):
        _add("dropped")
        raise LookupError
    with db():
        assert db.session.query(Item).count() == 0
    assert checked_out(_database()) == 0


def test_session_args_of_a_block_apply_to_that_block_only(url: str) -> None:
    _app(url)
    with db(session_args={"expire_on_commit": False}):
        assert db.session.expire_on_commit is False
    with db():
        assert db.session.expire_on_commit is True


def test_nested_blocks_each_get_their_own_session(url: str) -> None:
    _app(url)
    with db() as outer_db:
        outer = outer_db.session
        with db():
            assert db.session is not outer
            assert isinstance(db.session, Session)
        assert db.session is outer


async def test_commit_on_exit_commits_a_successful_response(url: str) -> None:
    app = _app(url, commit_on_exit=True)

    @app.post("/items", status_code=201)
    def create(name: str) -> None:
        _add(name)

    async with _client(app) as client:
        assert (await client.post("/items", params={"name": "a"})).status_code == 201
    assert await committed_names(_database()) == {"a"}


async def test_commit_on_exit_rolls_back_an_error_response(url: str) -> None:
    """Differs from the peer, which commits whatever the status."""
    app = _app(url, commit_on_exit=True)

    @app.post("/items")
    def create(name: str) -> None:
        _add(name)
        raise HTTPException(409)

    async with _client(app) as client:
        assert (await client.post("/items", params={"name": "a"})).status_code == 409
    assert await committed_names(_database()) == set()


async def test_without_commit_on_exit_only_explicit_commits_are_kept(url: str) -> None:
    app = _app(url)

    @app.post("/items/{name}")
    def create(name: str, commit: bool = False) -> None:
        _add(name)
        if commit:
            db.session.commit()

    async with _client(app) as client:
        await client.post("/items/implicit")
        await client.post("/items/explicit", params={"commit": True})
    assert await committed_names(_database()) == {"explicit"}


async def test_a_background_task_write_is_committed_with_commit_on_exit(url: str) -> None:
    """Differs from the peer, whose session is already closed when background tasks run."""
    app = _app(url, commit_on_exit=True)

    @app.post("/items", status_code=202)
    def create(background: BackgroundTasks) -> None:
        background.add_task(_add, "later")

    async with _client(app) as client:
        assert (await client.post("/items")).status_code == 202
    assert await committed_names(_database()) == {"later"}
    assert checked_out(_database()) == 0


async def test_a_thread_that_outlives_its_request_gets_missing_session_error(url: str) -> None:
    """Differs from the peer, whose closed session quietly opens a new transaction."""
    app = _app(url)
    outcome: list[BaseException | None] = []
    finished = threading.Event()
    leave = threading.Event()

    def late() -> None:
        leave.wait()
        try:
            _ = db.session
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finished.set()

    @app.get("/spawn")
    def spawn() -> None:
        import contextvars

        threading.Thread(target=contextvars.copy_context().run, args=(late,)).start()

    async with _client(app) as client:
        assert (await client.get("/spawn")).status_code == 200
    leave.set()
    finished.wait()
    assert isinstance(outcome[0], MissingSessionError)


async def test_add_middleware_sets_db_up_when_the_app_first_runs(url: str) -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db_url=url, commit_on_exit=True)

    @app.post("/items", status_code=201)
    def create() -> None:
        _add("via-add-middleware")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/items")).status_code == 201
    assert await committed_names(_database()) == {"via-add-middleware"}


async def test_a_failed_commit_answers_500_and_returns_the_connection(url: str) -> None:
    """Differs from the peer, whose failed commit leaves the connection checked out."""
    app = _app(url, commit_on_exit=True)
    enforce_foreign_keys(_database().engine)

    @app.post("/orphans", status_code=201)
    def create() -> None:
        add_orphan(db.session, "orphan")  # the foreign key is checked at COMMIT

    async with _client(app) as client:
        assert (await client.post("/orphans")).status_code == 500
    assert await committed_names(_database()) == set()
    assert checked_out(_database()) == 0


async def test_a_request_that_finds_no_free_connection_gets_503(url: str) -> None:
    """Differs from the peer, which answers 500 after the pool's timeout."""
    app = _app(url, engine_args={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.05})

    @app.get("/items")
    def read() -> int:
        return db.session.query(Item).count()

    with _database().engine.connect():  # the pool's only connection
        async with _client(app) as client:
            response = await client.get("/items")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


async def test_a_database_error_reaches_the_server_without_sql_or_values(url: str) -> None:
    """Differs from the peer, which passes the driver's full text (SQL, parameters) on."""
    app = _app(url, commit_on_exit=True)
    secret = "s3cret-value-in-a-row"

    @app.post("/items")
    def create() -> None:
        _add(secret)
        _add(secret)  # the unique constraint fails at this flush

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(IntegrityError) as info:
            await client.post("/items")
    assert secret not in str(info.value)


async def test_a_sync_session_in_an_async_route_warns(url: str) -> None:
    """Differs from the peer, which blocks the event loop silently."""
    app = _app(url)

    @app.get("/items")
    async def read() -> int:
        return db.session.query(Item).count()

    async with _client(app) as client:
        with pytest.warns(middleware_sessions.BlockingSessionWarning):
            assert (await client.get("/items")).status_code == 200


def test_the_middleware_is_pure_asgi() -> None:
    from starlette.middleware.base import BaseHTTPMiddleware

    assert not issubclass(DBSessionMiddleware, BaseHTTPMiddleware)
