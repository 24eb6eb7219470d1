"""A sync app written the way most FastAPI + SQLAlchemy apps are: ``def`` routes, response models.

Served by ``uvicorn --factory tests.reliability.syncapp:create_app`` with
``DATABASE_URL`` set. ``RELIABILITY_ENGINE_OPTIONS`` (JSON) sizes the pool and
``RELIABILITY_THREAD_TOKENS`` sets AnyIO's default thread limiter at startup;
unset, both are the library's and SQLAlchemy's defaults.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy import String, Text, create_engine, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from middleware_sessions import Database, DBSessionMiddleware

SEEDED = 50  # notes with ids 1..50 exist before the load starts


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text, default="")


class NoteIn(BaseModel):
    title: str
    body: str = ""


class NotePatch(BaseModel):
    title: str | None = None
    body: str | None = None


class NoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    title: str
    body: str


class Health(BaseModel):
    ok: bool


def create_schema(sync_url: str) -> None:
    """The table, with ``SEEDED`` notes in it."""
    engine = create_engine(sync_url)
    try:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(
                insert(Note),
                [{"title": f"note {n}", "body": "x" * 200} for n in range(SEEDED)],
            )
    finally:
        engine.dispose()


def create_app() -> FastAPI:
    options = json.loads(os.environ.get("RELIABILITY_ENGINE_OPTIONS", "{}"))
    db = Database(os.environ["DATABASE_URL"], engine_options=options or None)
    tokens = os.environ.get("RELIABILITY_THREAD_TOKENS")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if tokens:
            anyio.to_thread.current_default_thread_limiter().total_tokens = int(tokens)
        yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(DBSessionMiddleware, db=db)

    @app.get("/health", response_model=Health)
    def health() -> Any:
        return {"ok": True}

    @app.get("/notes", response_model=list[NoteOut])
    def list_notes(skip: int = 0, limit: int = 20) -> Any:
        query = select(Note).order_by(Note.id).offset(skip).limit(min(limit, 100))
        return db.session.scalars(query).all()

    @app.post("/notes", response_model=NoteOut, status_code=201)
    def create_note(note: NoteIn) -> Any:
        row = Note(title=note.title, body=note.body)
        db.session.add(row)
        db.session.flush()
        return row

    @app.get("/notes/{note_id}", response_model=NoteOut)
    def read_note(note_id: int) -> Any:
        row = db.session.get(Note, note_id)
        if row is None:
            raise HTTPException(404, "No such note.")
        return row

    @app.patch("/notes/{note_id}", response_model=NoteOut)
    def update_note(note_id: int, patch: NotePatch) -> Any:
        row = db.session.get(Note, note_id, with_for_update=True)
        if row is None:
            raise HTTPException(404, "No such note.")
        for name, value in patch.model_dump(exclude_unset=True).items():
            setattr(row, name, value)
        db.session.flush()
        return row

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        return {
            "checked_out": db.engine.pool.checkedout(),  # type: ignore[attr-defined]
            "thread_tokens": limiter.total_tokens,
            "threads_borrowed": limiter.borrowed_tokens,
        }

    return app
