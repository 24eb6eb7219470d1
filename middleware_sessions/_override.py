"""``db.override(...)``: point a database elsewhere for the length of a block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from sqlalchemy import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from ._database import _BaseDatabase


class Override:
    """``db.override(...)``: the database points elsewhere inside the block."""

    def __init__(
        self,
        db: _BaseDatabase[Any],
        url: str | URL | None,
        engine: Engine | AsyncEngine | None,
        engine_options: Mapping[str, Any] | None,
        session_options: Mapping[str, Any] | None,
    ) -> None:
        self._db = db
        self._args = (url, engine, engine_options, session_options)
        self._saved: dict[str, Any] | None = None

    def _enter(self) -> None:
        if self._saved is not None:
            raise RuntimeError("This override is already active; call db.override() again.")
        saved = self._db._snapshot()
        self._db._configure(*self._args)
        self._saved = saved

    def _leave(self) -> Engine | AsyncEngine | None:
        """Restore the database; return the override's engine if it must be disposed."""
        assert self._saved is not None
        engine = self._db.engine if self._db.owns_engine else None
        self._db._restore(self._saved)
        self._saved = None
        return engine

    def __enter__(self) -> None:
        if self._db._is_async and self._args[0] is not None:
            raise TypeError(
                "Use 'async with db.override(url)' for an AsyncDatabase. "
                "The engine created for the override must be disposed with await. "
                "Or pass engine=... that you dispose of yourself, and keep 'with'."
            )
        self._enter()

    def __exit__(self, *exc_info: object) -> None:
        engine = self._leave()
        if isinstance(engine, Engine):
            engine.dispose()

    async def __aenter__(self) -> None:
        self._enter()

    async def __aexit__(self, *exc_info: object) -> None:
        engine = self._leave()
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        elif isinstance(engine, Engine):
            await anyio.to_thread.run_sync(engine.dispose)
