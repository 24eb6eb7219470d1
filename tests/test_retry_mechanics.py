"""The parts of retrying that need no database: spotting a conflict, the body, the backoff."""

from __future__ import annotations

import random
import sys
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.types import Message

from middleware_sessions import AsyncDatabase, DBSessionMiddleware, _policy, transaction_policy
from middleware_sessions._retry import Body, Settings, conflict_of

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

# --- spotting a serialization failure or a deadlock ----------------------------------------


class DriverError(Exception):
    """Stands in for a driver's error: psycopg and asyncpg put the SQLSTATE on ``sqlstate``."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(orig: BaseException) -> DBAPIError:
    return OperationalError("UPDATE counters SET value = 1", {}, orig)


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_a_driver_error_with_a_retryable_sqlstate_is_a_conflict(sqlstate: str) -> None:
    assert conflict_of(wrapped(DriverError("whatever", sqlstate))) == sqlstate


def test_the_driver_error_behind_an_adapter_error_is_found_on_its_cause() -> None:
    """SQLAlchemy's asyncpg adapter keeps asyncpg's own error as the cause."""
    with pytest.raises(DriverError) as caught:
        raise DriverError("adapted") from DriverError("asyncpg's own", "40001")
    assert conflict_of(wrapped(caught.value)) == "40001"


def test_a_conflict_raised_while_handling_another_error_is_found() -> None:
    with pytest.raises(RuntimeError) as caught:
        try:
            raise wrapped(DriverError("serialization", "40001"))
        except DBAPIError:
            raise RuntimeError("the route's own error") from None
    # raise ... from None hides the context from tracebacks, but it is still there.
    assert conflict_of(caught.value) == "40001"


def test_a_conflict_inside_an_exception_group_is_found() -> None:
    group = BaseExceptionGroup("task group", [ValueError(), wrapped(DriverError("x", "40P01"))])
    assert conflict_of(group) == "40P01"


@pytest.mark.parametrize("sqlstate", [None, "23505", "40P02", "57014"])
def test_other_sqlstates_are_not_conflicts(sqlstate: str | None) -> None:
    assert conflict_of(wrapped(DriverError("x", sqlstate))) is None


def test_the_message_text_alone_does_not_make_a_conflict() -> None:
    message = "could not serialize access due to concurrent update; deadlock detected; 40001"
    assert conflict_of(wrapped(DriverError(message))) is None


def test_a_chain_that_loops_back_on_itself_ends() -> None:
    first, second = DriverError("a"), DriverError("b")
    first.__context__, second.__context__ = second, first
    assert conflict_of(first) is None


# --- the body, kept for the next attempt --------------------------------------------------


class Server:
    """A server's ``receive``: the given messages, then ``http.disconnect`` for ever."""

    def __init__(self, *chunks: bytes) -> None:
        self.messages: list[Message] = [
            {"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
            for n, chunk in enumerate(chunks)
        ]
        self.reads = 0

    async def receive(self) -> Message:
        self.reads += 1
        if self.messages:
            return self.messages.pop(0)
        return {"type": "http.disconnect"}


async def read_all(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def test_each_attempt_reads_the_body_from_its_first_byte() -> None:
    body = Body(Server(b"ab", b"cd", b"ef").receive, limit=100, wanted=lambda: True)

    assert [await read_all(body.receive()) for _ in range(3)] == [b"abcdef"] * 3
    assert body.problem is None


async def test_a_later_attempt_reads_what_an_earlier_one_left_unread() -> None:
    server = Server(b"ab", b"cd", b"ef")
    body = Body(server.receive, limit=100, wanted=lambda: True)
    first = body.receive()
    await first()  # the first attempt reads one chunk only

    assert await read_all(body.receive()) == b"abcdef"
    assert await read_all(body.receive()) == b"abcdef"
    assert server.reads == 3


async def test_after_the_body_the_attempt_hears_the_client_disconnect() -> None:
    body = Body(Server(b"ab").receive, limit=100, wanted=lambda: True)
    await read_all(body.receive())
    receive = body.receive()
    await receive()

    assert await receive() == {"type": "http.disconnect"}
    assert body.problem == "the client disconnected"


async def test_a_body_over_the_limit_is_passed_on_but_not_kept() -> None:
    body = Body(Server(b"abc", b"def").receive, limit=5, wanted=lambda: True)

    assert await read_all(body.receive()) == b"abcdef"
    assert body.problem == "its body is larger than retry_body_limit (5 bytes)"


# --- backoff and options ---------------------------------------------------------------------


def test_the_backoff_is_full_jitter_below_a_doubling_ceiling_up_to_the_cap() -> None:
    settings = Settings(retries=10, backoff_base=0.01, backoff_cap=0.05)
    random.seed(1)
    for retry, ceiling in [(1, 0.01), (2, 0.02), (3, 0.04), (4, 0.05), (9, 0.05)]:
        delays = [settings.delay(retry) for _ in range(200)]
        assert 0 <= min(delays) < ceiling / 4
        assert ceiling * 3 / 4 < max(delays) <= ceiling


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"retries": -1}, ValueError, "negative"),
        ({"retries": 1.5}, TypeError, "whole number"),
        ({"retries": True}, TypeError, "whole number"),
        ({"retry_body_limit": -1}, ValueError, "cannot be negative"),
        ({"retry_body_limit": "1M"}, TypeError, "number of bytes"),
        ({"retry_backoff_base": 2, "retry_backoff_cap": 1}, ValueError, "from the base up to"),
        ({"retry_backoff_cap": "1s"}, TypeError, "number of seconds"),
    ],
)
def test_bad_retry_options_are_refused_with_a_clear_error(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    db = AsyncDatabase("sqlite+aiosqlite://")
    with pytest.raises(error, match=match):
        DBSessionMiddleware(FastAPI(), db=db, **options)


@pytest.mark.parametrize(("retries", "error"), [(-1, ValueError), ("3", TypeError)])
def test_a_route_policy_refuses_bad_retries(retries: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="transaction_policy\\(\\)'s retries"):
        transaction_policy(retries=retries)


# --- what a request that is never retried pays ---------------------------------------------


@pytest.mark.parametrize(("retries", "untouched"), [(0, True), (1, False)])
async def test_without_retries_the_app_gets_the_servers_receive_untouched(
    monkeypatch: pytest.MonkeyPatch, retries: int, untouched: bool
) -> None:
    """No body kept, no wrapper: the request takes the path it took before retries existed."""
    monkeypatch.setattr(_policy, "any_route_retries", False)
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(receive)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    db = AsyncDatabase("sqlite+aiosqlite://")
    middleware = DBSessionMiddleware(app, db=db, retries=retries)
    await middleware({"type": "http", "method": "POST", "path": "/"}, receive, send)

    assert (seen == [receive]) is untouched
