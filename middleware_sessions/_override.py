"""``db.override(...)``: point a database elsewhere for the length of a block."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from ._binding import Binding

if TYPE_CHECKING:
    from ._database import _BaseDatabase


class Override:
    """``db.override(...)``: the database points elsewhere inside the block.

    The new binding is built (and validated) before anything changes, then swapped
    in whole; leaving swaps the previous one back and disposes of an engine that was
    created for the override.
    """

    def __init__(
        self, db: _BaseDatabase[Any], build: Callable[[], Binding], *, creates_engine: bool
    ) -> None:
        self._db = db
        self._build = build
        self._creates_engine = creates_engine
        self._saved: Binding | None = None

    def _enter(self) -> None:
        if self._saved is not None:
            raise RuntimeError(
                "This override is already active. "
                "An override object can be entered once at a time. "
                "Call db.override(...) again for a nested block."
            )
        self._saved = self._db._swap(self._build())

    def _leave(self) -> Binding:
        """Put the previous binding back; return the override's own."""
        assert self._saved is not None
        binding = self._db._swap(self._saved)
        self._saved = None
        return binding

    def __enter__(self) -> None:
        if self._db._flavour.is_async and self._creates_engine:
            raise TypeError(
                "Use 'async with db.override(url)' for an AsyncDatabase. "
                "The engine created for the override must be disposed of with await. "
                "Or pass engine=... that you dispose of yourself, and keep 'with'."
            )
        self._enter()

    def __exit__(self, *exc_info: object) -> None:
        binding = self._leave()
        if binding.owns_engine and isinstance(binding.engine, Engine):
            binding.engine.dispose()

    async def __aenter__(self) -> None:
        self._enter()

    async def __aexit__(self, *exc_info: object) -> None:
        binding = self._leave()
        if binding.owns_engine:
            await self._db._flavour.dispose(binding.engine)
