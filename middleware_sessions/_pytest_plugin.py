"""The pytest plugin: fixtures that run each test inside outer transactions.

Registered through the ``pytest11`` entry point, so it loads with pytest when the
package is installed. It only adds fixtures: nothing changes until a test asks for
one. Define ``middleware_sessions_databases`` in ``conftest.py``, then request
``db_transaction`` (sync databases) or ``async_db_transaction`` (any; runs on AnyIO's
pytest plugin). Inside a wider ``outer_transaction`` (a session- or module-scoped
fixture of yours), each test's block is a savepoint that is rolled back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import pytest

from ._database import AsyncDatabase, Database
from .testing import async_outer_transaction, outer_transaction

AnyDatabase = Database[Any] | AsyncDatabase[Any]


@pytest.fixture
def middleware_sessions_databases() -> Sequence[AnyDatabase]:
    """The databases to isolate; define this fixture in your ``conftest.py``."""
    raise pytest.UsageError(
        "The middleware_sessions test fixtures need to know your databases. "
        "middleware_sessions can't guess which Database objects your app uses. "
        "Define a fixture named 'middleware_sessions_databases' in conftest.py that "
        "returns them, e.g. 'return [myapp.db]'."
    )


def _as_list(databases: Any) -> list[AnyDatabase]:
    return list(databases) if isinstance(databases, Sequence) else [databases]


@pytest.fixture
def db_transaction(middleware_sessions_databases: Any) -> Iterator[None]:
    """Run the test inside outer transactions (sync ``Database`` objects) rolled back after it."""
    with ExitStack() as stack:
        for db in _as_list(middleware_sessions_databases):
            if isinstance(db, AsyncDatabase):
                raise pytest.UsageError(
                    f"db_transaction got {db!r}. An AsyncDatabase needs an event loop to "
                    "open its connection. Use the async_db_transaction fixture instead."
                )
            stack.enter_context(outer_transaction(db))
        yield


@pytest.fixture
async def async_db_transaction(
    middleware_sessions_databases: Any, anyio_backend: Any
) -> AsyncIterator[None]:
    """Like ``db_transaction``, for ``AsyncDatabase`` (and ``Database``) objects, on AnyIO."""
    async with AsyncExitStack() as stack:
        for db in _as_list(middleware_sessions_databases):
            if isinstance(db, AsyncDatabase):
                await stack.enter_async_context(async_outer_transaction(db))
            else:
                stack.enter_context(outer_transaction(db))
        yield
