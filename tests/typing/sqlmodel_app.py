"""A typed SQLModel app: checked with ``mypy --strict`` by tests/test_sqlmodel.py.

Every ``assert_type`` line fails the check if ``db.session``, ``session_scope()``
or ``sessionmaker`` lose the session class given as ``class_``.
"""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession as SAAsyncSession
from sqlalchemy.orm import Session as SASession
from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, Session, SQLModel, select
from sqlmodel.ext.asyncio.session import AsyncSession
from typing_extensions import assert_type

from middleware_sessions import AsyncDatabase, Database, DBSessionMiddleware


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str


db = Database("sqlite:///./heroes.db", session_options={"class_": Session})
adb = AsyncDatabase(
    "sqlite+aiosqlite:///./heroes.db",
    session_options={"class_": AsyncSession, "expire_on_commit": False},
)
plain = Database("sqlite:///./plain.db")
plain_async = AsyncDatabase("sqlite+aiosqlite:///./plain.db")

app = FastAPI()
app.add_middleware(DBSessionMiddleware, db=db)
app.add_middleware(DBSessionMiddleware, db=adb)

assert_type(db.session, Session)
assert_type(adb.session, AsyncSession)
assert_type(plain.session, SASession)
assert_type(plain_async.session, SAAsyncSession)
assert_type(db.sessionmaker, sessionmaker[Session])


@app.get("/heroes")
def list_heroes() -> list[str]:
    return [hero.name for hero in db.session.exec(select(Hero)).all()]


@app.get("/heroes/async")
async def list_heroes_async() -> list[str]:
    heroes = (await adb.session.exec(select(Hero))).all()
    return [hero.name for hero in heroes]


def seed() -> None:
    with db.session_scope() as session:
        assert_type(session, Session)
        session.add(Hero(name="Deadpond"))


async def seed_async() -> None:
    async with adb.session_scope() as session:
        assert_type(session, AsyncSession)
        session.add(Hero(name="Rusty-Man"))
    async with adb.sessionmaker() as session:
        assert_type(session, AsyncSession)
