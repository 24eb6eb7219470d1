"""``middleware_sessions.compat.fastapi_async_sqlalchemy``: the peer's API, with our promise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import middleware_sessions
from middleware_sessions.compat import fastapi_async_sqlalchemy
from middleware_sessions.compat.fastapi_async_sqlalchemy import (
    SQLAlchemyMiddleware,
    create_middleware_and_session_proxy,
)
from middleware_sessions.compat.fastapi_async_sqlalchemy.exceptions import (
    MissingSessionError,
    SessionNotInitialisedError,
)
from middleware_sessions.compat.fastapi_async_sqlalchemy.middleware import DefaultAsyncSession

from .._backends import URL_BACKENDS, enforce_foreign_keys, fresh_urls
from ..helpers import Item, add_orphan


class Setup:
    """One middleware/``db`` pair on a fresh database, and an app wrapped in it."""

    def __init__(self, url: str, **options: Any) -> None:
        self.middleware_class, self.db = create_middleware_and_session_proxy()
        self.app = FastAPI()
        self.app.add_middleware(self.middleware_class, db_url=url, **options)
        # Built at once, as Starlette would at the first call.
        self.app.middleware_stack = self.app.build_middleware_stack()
        app: Any = self.app.middleware_stack
        while not isinstance(app, self.middleware_class):
            app = app.app
        self.middleware = app

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    async def add(self, name: str) -> None:
        self.db.session.add(Item(name=name))
        await self.db.session.flush()

    async def names(self) -> set[str]:
        async with self.db():
            # Through the sync session: SQLModel's AsyncSession warns on execute()/scalars().
            return await self.db.session.run_sync(
                lambda session: set(session.scalars(select(Item.name)))
            )

    def checked_out(self) -> int:
        return self.middleware.db.engine.pool.checkedout()  # type: ignore[no-any-return]


@pytest.fixture(params=URL_BACKENDS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_urls(request, tmp_path)[1]


@pytest.fixture
async def setup(url: str) -> AsyncIterator[Setup]:
    made = Setup(url)
    yield made
    await made.middleware.dispose()


def test_the_peers_names_are_importable_from_the_same_places() -> None:
    assert set(fastapi_async_sqlalchemy.__all__) >= {
        "SQLAlchemyMiddleware",
        "create_middleware_and_session_proxy",
        "db",
    }
    assert isinstance(fastapi_async_sqlalchemy.db, fastapi_async_sqlalchemy.DBSessionMeta)
    assert issubclass(MissingSessionError, middleware_sessions.MissingSessionError)
    assert issubclass(SessionNotInitialisedError, middleware_sessions.MissingSessionError)
    assert issubclass(DefaultAsyncSession, AsyncSession)


def test_the_middleware_needs_a_url_or_an_engine() -> None:
    with pytest.raises(ValueError, match="db_url or a custom_engine"):
        SQLAlchemyMiddleware(FastAPI())


async def test_db_before_its_middleware_raises_session_not_initialised() -> None:
    _, db = create_middleware_and_session_proxy()
    with pytest.raises(SessionNotInitialisedError):
        _ = db.session
    with pytest.raises(SessionNotInitialisedError):
        async with db():
            pass


async def test_db_session_outside_a_request_or_block_raises_the_peers_error(
    setup: Setup,
) -> None:
    with pytest.raises(MissingSessionError, match="async with db"):
        _ = setup.db.session


async def test_a_custom_engine_is_used_and_left_alone(url: str) -> None:
    engine = create_async_engine(url)
    middleware_class, db = create_middleware_and_session_proxy()
    middleware = middleware_class(FastAPI(), custom_engine=engine)
    async with db():
        assert db.session.bind is engine
    await middleware.dispose()
    assert (await db.gather(asyncio.sleep(0, "still usable"))) == ["still usable"]
    await engine.dispose()


async def test_sessions_are_the_default_class_without_expiry_on_commit(setup: Setup) -> None:
    async with setup.db():
        assert isinstance(setup.db.session, DefaultAsyncSession)
        assert setup.db.session.sync_session.expire_on_commit is False


async def test_a_block_commits_only_with_commit_on_exit(setup: Setup) -> None:
    async with setup.db():
        await setup.add("dropped")
    async with setup.db(commit_on_exit=True):
        await setup.add("kept")
    assert await setup.names() == {"kept"}


async def test_an_exception_in_a_block_rolls_back_and_propagates(setup: Setup) -> None:
    with pytest.raises(LookupError):
        async with setup.db(commit_on_exit=True):
            await setup.add("dropped")
            raise LookupError
    assert await setup.names() == set()
    assert setup.checked_out() == 0


async def test_session_args_of_a_block_apply_to_that_block_only(setup: Setup) -> None:
    async with setup.db(session_args={"autoflush": False}):
        assert setup.db.session.sync_session.autoflush is False
    async with setup.db():
        assert setup.db.session.sync_session.autoflush is True


async def test_nested_blocks_each_get_their_own_session(setup: Setup) -> None:
    async with setup.db():
        outer = setup.db.session
        async with setup.db():
            assert setup.db.session is not outer
        assert setup.db.session is outer


async def test_two_proxies_keep_two_databases_apart(tmp_path: Path) -> None:
    first = Setup(f"sqlite+aiosqlite:///{tmp_path / 'first.db'}")
    second = Setup(f"sqlite+aiosqlite:///{tmp_path / 'second.db'}")
    async with first.db(), second.db():
        assert first.db.session.bind is not second.db.session.bind
        assert "first.db" in str(first.db.session.bind.url)
    await first.middleware.dispose()
    await second.middleware.dispose()


async def test_multi_sessions_gives_each_task_its_own_session(setup: Setup) -> None:
    async def whose() -> object:
        await setup.db.session.scalar(text("SELECT 1"))
        return setup.db.session

    async with setup.db(multi_sessions=True):
        sessions = await asyncio.gather(whose(), whose(), whose())
    assert len({id(s) for s in sessions}) == 3
    assert setup.checked_out() == 0


async def test_multi_sessions_commit_only_with_commit_on_exit(setup: Setup) -> None:
    async with setup.db(multi_sessions=True):
        await asyncio.gather(setup.add("dropped"))
    async with setup.db(multi_sessions=True, commit_on_exit=True):
        await asyncio.gather(setup.add("kept"))
    assert await setup.names() == {"kept"}


async def test_connection_waits_for_a_slot_under_max_concurrent(setup: Setup) -> None:
    holding = peak = 0

    async def work(n: int) -> int:
        nonlocal holding, peak
        async with setup.db.connection() as session:
            holding += 1
            peak = max(peak, holding)
            await session.scalar(text("SELECT 1"))
            for _ in range(5):
                await asyncio.sleep(0)
            holding -= 1
        return n

    async with setup.db(multi_sessions=True, max_concurrent=2):
        results = await asyncio.gather(*(asyncio.create_task(work(n)) for n in range(6)))
    assert results == list(range(6))
    assert peak == 2


async def test_gather_settles_each_coroutines_session_as_it_ends(setup: Setup) -> None:
    async with setup.db(multi_sessions=True, max_concurrent=2, commit_on_exit=True):
        await setup.db.gather(*(setup.add(f"n{n}") for n in range(4)))
        assert await setup.names() == {"n0", "n1", "n2", "n3"}


def test_max_concurrent_below_one_is_refused() -> None:
    _, db = create_middleware_and_session_proxy()
    with pytest.raises(ValueError, match=">= 1"):
        db(multi_sessions=True, max_concurrent=0)


async def test_commit_on_exit_commits_a_successful_response(url: str) -> None:
    made = Setup(url, commit_on_exit=True)

    @made.app.post("/items", status_code=201)
    async def create(name: str) -> None:
        await made.add(name)

    async with made.client() as client:
        assert (await client.post("/items", params={"name": "a"})).status_code == 201
    assert await made.names() == {"a"}
    await made.middleware.dispose()


async def test_commit_on_exit_rolls_back_an_error_response(url: str) -> None:
    """Differs from the peer, which commits whatever the status."""
    made = Setup(url, commit_on_exit=True)

    @made.app.post("/items")
    async def create(name: str) -> None:
        await made.add(name)
        raise HTTPException(422)

    async with made.client() as client:
        assert (await client.post("/items", params={"name": "a"})).status_code == 422
    assert await made.names() == set()
    await made.middleware.dispose()


async def test_without_commit_on_exit_only_explicit_commits_are_kept(setup: Setup) -> None:
    @setup.app.post("/items/{name}")
    async def create(name: str, commit: bool = False) -> None:
        await setup.add(name)
        if commit:
            await setup.db.session.commit()

    async with setup.client() as client:
        await client.post("/items/implicit")
        await client.post("/items/explicit", params={"commit": True})
    assert await setup.names() == {"explicit"}


async def test_background_and_streaming_writes_are_committed_with_commit_on_exit(
    url: str,
) -> None:
    """Differs from the peer, which closes the session before either runs."""
    made = Setup(url, commit_on_exit=True)

    @made.app.post("/background", status_code=202)
    async def background(tasks: BackgroundTasks) -> None:
        tasks.add_task(made.add, "from-background")

    @made.app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"started "
            await made.add("from-stream")
            yield b"done"

        return StreamingResponse(body())

    async with made.client() as client:
        assert (await client.post("/background")).status_code == 202
        assert (await client.get("/stream")).text == "started done"
    assert await made.names() == {"from-background", "from-stream"}
    assert made.checked_out() == 0
    await made.middleware.dispose()


async def test_a_task_that_outlives_its_request_gets_missing_session_error(
    setup: Setup,
) -> None:
    """Differs from the peer, whose closed session quietly opens a new transaction."""
    leave = asyncio.Event()
    spawned: list[asyncio.Task[object]] = []

    async def late() -> object:
        await leave.wait()
        return setup.db.session

    @setup.app.get("/spawn")
    async def spawn() -> None:
        spawned.append(asyncio.create_task(late()))

    async with setup.client() as client:
        assert (await client.get("/spawn")).status_code == 200
    leave.set()
    with pytest.raises(MissingSessionError):
        await spawned[0]


async def test_gather_outside_multi_sessions_still_gives_each_coroutine_a_session(
    setup: Setup,
) -> None:
    """Differs from the peer, whose gather() there is plain asyncio.gather over one session."""

    async def whose() -> object:
        await setup.db.session.scalar(text("SELECT 1"))
        return setup.db.session

    async with setup.db():
        outer = setup.db.session
        sessions = await setup.db.gather(whose(), whose())
    assert len({id(s) for s in sessions} | {id(outer)}) == 3


async def test_gather_over_one_request_session_is_a_concurrent_session_error(url: str) -> None:
    """Differs from the peer: ConcurrentSessionError (its message names db.gather), a 500."""
    made = Setup(url)

    @made.app.post("/gather")
    async def gather() -> None:
        async def write(n: int) -> None:
            made.db.session.add(Item(name=f"g{n}"))
            await made.db.session.flush()

        await asyncio.gather(*(write(n) for n in range(3)))

    async with made.client() as client:
        assert (await client.post("/gather")).status_code == 500
    await asyncio.sleep(0.2)  # let gather's siblings run out (it doesn't cancel them)
    await made.middleware.dispose()
    assert await made.names() == set()


async def test_a_failed_commit_answers_500_and_returns_the_connection(url: str) -> None:
    """Differs from the peer, whose failed commit leaves the connection checked out."""
    made = Setup(url, commit_on_exit=True)
    enforce_foreign_keys(made.middleware.db.engine.sync_engine)

    @made.app.post("/orphans", status_code=201)
    async def create() -> None:
        await made.db.session.run_sync(add_orphan, "orphan")

    async with made.client() as client:
        assert (await client.post("/orphans")).status_code == 500
    assert await made.names() == set()
    assert made.checked_out() == 0
    await made.middleware.dispose()


def test_the_middleware_is_pure_asgi() -> None:
    from starlette.middleware.base import BaseHTTPMiddleware

    assert not issubclass(SQLAlchemyMiddleware, BaseHTTPMiddleware)
