"""The same three endpoints, written once per session pattern.

Every variant is its own FastAPI app with the same three routes:

- ``GET /ping``            never touches the database;
- ``GET /items/{item_id}`` a primary-key read;
- ``POST /items``          a single-row insert (JSON body ``{"name": ...}``), status 201.

All variants of one backend share one async and one sync engine, so pool sizes,
pool warmth and engine options are identical by construction; they differ only
in how the session is created, handed to the route, committed and closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import Engine, String, delete, event, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware

SEED_ROWS = 100
READ_ID = 42


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class ItemIn(BaseModel):
    name: str


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    is_async: bool
    peer: str | None = None  # PyPI distribution, for variants that come from a peer


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("a", "(a) no database (ceiling)", True),
        Variant("b", "(b) Depends, async generator", True),
        Variant("c", "(c) Depends, sync generator + def route", False),
        Variant("d", "(d) fastapi-sqlalchemy (sync)", False, "fastapi-sqlalchemy"),
        Variant("e", "(e) fastapi-async-sqlalchemy", True, "fastapi-async-sqlalchemy"),
        Variant("f", "(f) ours, AsyncDatabase", True),
        Variant("g", "(g) ours, Database + def route", False),
        Variant("hd", "(h) ours, fastapi-sqlalchemy compat (sync)", False),
        Variant("he", "(h) ours, fastapi-async-sqlalchemy compat", True),
        Variant("ia", "(i) hand-written async floor", True),
        Variant("is", "(i) hand-written sync floor", False),
    )
}


def _ping_routes(app: FastAPI) -> None:
    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}


def _out(item: Item) -> dict[str, Any]:
    return {"id": item.id, "name": item.name}


# -- (a) the ceiling: same routes, no database --------------------------------


def app_a(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    app = FastAPI()
    _ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return {"id": item_id, "name": "seed"}

    @app.post("/items", status_code=201)
    async def create(body: ItemIn) -> dict[str, Any]:
        return {"id": 0, "name": body.name}

    return app


# -- (b) Depends on an async generator ------------------------------------------


def app_b(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = async_sessionmaker(async_engine, expire_on_commit=False)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            yield session

    app = FastAPI()
    _ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int, session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
        item = await session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    async def create(body: ItemIn, session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
        item = Item(name=body.name)
        session.add(item)
        await session.flush()
        out = _out(item)
        await session.commit()
        return out

    return app


# -- (c) Depends on a sync generator, def routes (the FastAPI tutorial) ---------


def app_c(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = sessionmaker(sync_engine)

    def get_db() -> Iterator[Session]:
        with factory() as session:
            yield session

    app = FastAPI()
    _ping_routes(app)

    @app.get("/items/{item_id}")
    def read(item_id: int, session: Session = Depends(get_db)) -> dict[str, Any]:
        item = session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    def create(body: ItemIn, session: Session = Depends(get_db)) -> dict[str, Any]:
        item = Item(name=body.name)
        session.add(item)
        session.flush()
        out = _out(item)
        session.commit()
        return out

    return app


# -- (d) fastapi-sqlalchemy: BaseHTTPMiddleware, sync Session ---------------------


def app_d(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    # The peer keeps its sessionmaker in a module global, set when the middleware
    # stack is built: one (d) app per process at a time (sections run in turn).
    from fastapi_sqlalchemy import DBSessionMiddleware as PeerMiddleware
    from fastapi_sqlalchemy import db

    app = FastAPI()
    app.add_middleware(PeerMiddleware, custom_engine=sync_engine, commit_on_exit=True)
    _ping_routes(app)

    @app.get("/items/{item_id}")
    def read(item_id: int) -> dict[str, Any]:
        item = db.session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    def create(body: ItemIn) -> dict[str, Any]:
        item = Item(name=body.name)
        db.session.add(item)
        db.session.flush()
        return _out(item)

    return app


# -- (e) fastapi-async-sqlalchemy: BaseHTTPMiddleware, AsyncSession ---------------


def app_e(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    from fastapi_async_sqlalchemy import create_middleware_and_session_proxy

    peer_middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(peer_middleware, custom_engine=async_engine, commit_on_exit=True)
    _ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        item = await db.session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    async def create(body: ItemIn) -> dict[str, Any]:
        item = Item(name=body.name)
        db.session.add(item)
        await db.session.flush()
        return _out(item)

    return app


# -- (f) ours, AsyncDatabase --------------------------------------------------------


def app_f(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    db = AsyncDatabase(engine=async_engine)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)
    _ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        item = await db.session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    async def create(body: ItemIn) -> dict[str, Any]:
        item = Item(name=body.name)
        db.session.add(item)
        await db.session.flush()
        return _out(item)

    return app


# -- (g) ours, Database, def routes ---------------------------------------------------


def app_g(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    db = Database(engine=sync_engine)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, db=db)
    _ping_routes(app)

    @app.get("/items/{item_id}")
    def read(item_id: int) -> dict[str, Any]:
        item = db.session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    def create(body: ItemIn) -> dict[str, Any]:
        item = Item(name=body.name)
        db.session.add(item)
        db.session.flush()
        return _out(item)

    return app


# -- (h) ours behind the peers' APIs: one changed import from (d) and (e) -------------


def app_hd(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    # Like (d), a module-wide db: one (hd) app per process at a time.
    from middleware_sessions.compat.fastapi_sqlalchemy import DBSessionMiddleware as Compat
    from middleware_sessions.compat.fastapi_sqlalchemy import db

    app = FastAPI()
    app.add_middleware(Compat, custom_engine=sync_engine, commit_on_exit=True)
    _ping_routes(app)

    @app.get("/items/{item_id}")
    def read(item_id: int) -> dict[str, Any]:
        item = db.session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    def create(body: ItemIn) -> dict[str, Any]:
        item = Item(name=body.name)
        db.session.add(item)
        db.session.flush()
        return _out(item)

    return app


def app_he(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    from middleware_sessions.compat.fastapi_async_sqlalchemy import (
        create_middleware_and_session_proxy,
    )

    compat_middleware, db = create_middleware_and_session_proxy()
    app = FastAPI()
    app.add_middleware(compat_middleware, custom_engine=async_engine, commit_on_exit=True)
    _ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        item = await db.session.get(Item, item_id)
        assert item is not None
        return _out(item)

    @app.post("/items", status_code=201)
    async def create(body: ItemIn) -> dict[str, Any]:
        item = Item(name=body.name)
        db.session.add(item)
        await db.session.flush()
        return _out(item)

    return app


# -- (i) hand-written floors: the session managed inside the route ---------------------


def app_ia(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = async_sessionmaker(async_engine, expire_on_commit=False)
    app = FastAPI()
    _ping_routes(app)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        async with factory() as session, session.begin():
            item = await session.get(Item, item_id)
            assert item is not None
            return _out(item)

    @app.post("/items", status_code=201)
    async def create(body: ItemIn) -> dict[str, Any]:
        async with factory() as session, session.begin():
            item = Item(name=body.name)
            session.add(item)
            await session.flush()
            return _out(item)

    return app


def app_is(async_engine: AsyncEngine, sync_engine: Engine) -> FastAPI:
    factory = sessionmaker(sync_engine)
    app = FastAPI()
    _ping_routes(app)

    @app.get("/items/{item_id}")
    def read(item_id: int) -> dict[str, Any]:
        with factory() as session, session.begin():
            item = session.get(Item, item_id)
            assert item is not None
            return _out(item)

    @app.post("/items", status_code=201)
    def create(body: ItemIn) -> dict[str, Any]:
        with factory() as session, session.begin():
            item = Item(name=body.name)
            session.add(item)
            session.flush()
            return _out(item)

    return app


BUILDERS: dict[str, Callable[[AsyncEngine, Engine], FastAPI]] = {
    "a": app_a,
    "b": app_b,
    "c": app_c,
    "d": app_d,
    "e": app_e,
    "f": app_f,
    "g": app_g,
    "hd": app_hd,
    "he": app_he,
    "ia": app_ia,
    "is": app_is,
}


def peer_problem(key: str) -> str | None:
    """Why a peer variant cannot run here, or ``None``."""
    module = {"d": "fastapi_sqlalchemy", "e": "fastapi_async_sqlalchemy"}.get(key)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as exc:  # any import-time breakage makes the peer n/a
        return f"{VARIANTS[key].peer} does not import: {type(exc).__name__}: {exc}"
    return None


# -- the database: one table, a few seed rows -------------------------------------------


def sqlite_tuning(engine: Engine) -> None:
    """WAL plus synchronous=NORMAL: commits without an fsync each (like PG with fsync=off)."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def create_schema(sync_engine: Engine) -> None:
    with sync_engine.begin() as conn:
        if sync_engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
        conn.execute(insert(Item), [{"name": f"seed-{i}"} for i in range(1, SEED_ROWS + 1)])


def trim_inserted(sync_engine: Engine) -> None:
    """Keep the table small: drop what the insert endpoint added."""
    with sync_engine.begin() as conn:
        conn.execute(delete(Item).where(Item.id > SEED_ROWS))
        if sync_engine.dialect.name == "postgresql":
            # Keep the sequence small too, so ids (and response sizes) stay alike.
            conn.execute(text(f"SELECT setval('bench_items_id_seq', {SEED_ROWS})"))
