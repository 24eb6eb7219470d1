"""A lean in-process ASGI driver: the app under test is the only thing that costs.

Scopes are pre-built (copied per request, because Starlette writes into them),
``receive`` hands over a pre-built body and then behaves like uvicorn (waits for
the response to finish, then reports a disconnect), and ``send`` only looks at
the status. ``spec_version`` is 2.3, as uvicorn declares.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message

_DISCONNECT: Message = {"type": "http.disconnect"}


@dataclass(frozen=True)
class Request:
    """One endpoint, ready to replay: a scope template and the body message."""

    scope: dict[str, Any]
    body: Message
    expect: int


def make_request(method: str, path: str, json_body: Any = None, expect: int = 200) -> Request:
    body = b"" if json_body is None else json.dumps(json_body).encode()
    headers = [(b"host", b"bench"), (b"user-agent", b"bench")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    message = {"type": "http.request", "body": body, "more_body": False}
    return Request(scope, message, expect)


class _Exchange:
    """The receive/send pair of one request."""

    __slots__ = ("body", "done", "expect", "failed", "waiter")

    def __init__(self, body: Message, expect: int) -> None:
        self.body: Message | None = body
        self.expect = expect
        self.done = False
        self.failed = False
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        body = self.body
        if body is not None:
            self.body = None
            return body
        if not self.done:
            # Like uvicorn: nothing more until the response is complete.
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if message["status"] != self.expect:
                self.failed = True
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.done = True
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class BenchError(RuntimeError):
    """A request did not answer with the expected status."""


async def call_once(app: ASGIApp, request: Request) -> None:
    exchange = _Exchange(request.body, request.expect)
    await app(request.scope.copy(), exchange.receive, exchange.send)
    if exchange.failed or not exchange.done:
        raise BenchError(f"{request.scope['method']} {request.scope['path']} failed")


async def measure(
    app: ASGIApp, request: Request, *, concurrency: int, warm: float, window: float
) -> tuple[float, int]:
    """Keep ``concurrency`` request loops busy; return (requests/s, failures).

    Requests are counted over a steady-state window that starts after ``warm``
    seconds, so neither the ramp-up nor the drain at the end is measured.
    """
    scope = request.scope
    body = request.body
    expect = request.expect
    count = 0
    failures = 0
    running = True

    async def worker() -> None:
        nonlocal count, failures
        while running:
            exchange = _Exchange(body, expect)
            try:
                await app(scope.copy(), exchange.receive, exchange.send)
            except Exception:
                failures += 1
            else:
                if exchange.failed or not exchange.done:
                    failures += 1
            count += 1

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warm)
    start_count, start = count, perf_counter()
    await asyncio.sleep(window)
    end_count, end = count, perf_counter()
    running = False
    await asyncio.gather(*tasks)
    return (end_count - start_count) / (end - start), failures


async def run_count(app: ASGIApp, request: Request, *, concurrency: int, total: int) -> None:
    """Run exactly ``total`` requests with ``concurrency`` loops (for warm-up and memory)."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call_once(app, request)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
