"""A lean in-process ASGI driver: the app under test is the only thing that costs.

Scopes are pre-built (copied per request, because Starlette writes into them),
``receive`` hands over a pre-built body and then behaves like uvicorn (waits for
the response to finish, then reports a disconnect), and ``send`` only looks at
the status. ``spec_version`` is 2.3, as uvicorn declares.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter, process_time
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

    __slots__ = ("body", "done", "expect", "failed", "status", "waiter")

    def __init__(self, body: Message, expect: int) -> None:
        self.body: Message | None = body
        self.expect = expect
        self.done = False
        self.failed = False
        self.status = 0
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
            self.status = message["status"]
            if self.status != self.expect:
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


@dataclass(frozen=True)
class Window:
    """What one measurement saw: requests completed, wall seconds, process CPU seconds."""

    requests: int
    wall: float
    cpu: float
    failures: int
    error: str | None = None  # the first failure, described

    @property
    def rate(self) -> float:
        return self.requests / self.wall

    @property
    def cpu_rate(self) -> float:
        return self.requests / self.cpu if self.cpu > 0 else 0.0


async def measure_sequence(
    steps: Sequence[tuple[ASGIApp, Request, float]], *, concurrency: int
) -> list[Window]:
    """Measure several (app, request, seconds) steps back to back with the same loops.

    ``concurrency`` request loops run throughout. A step's window opens once the
    last request of the step before it has completed (so every loop is on this
    step's app) and closes with the first completion ``seconds`` later; from then
    on each loop starts one request of the next step while the stragglers of
    this one finish. Drain and ramp-up overlap and neither is counted. The loops read
    the clock themselves: an async route that never waits would never let a
    timer task run. Process CPU time is read at the same instants. The first
    step's window opens with the first completion: make it a warm-up.
    """
    n = len(steps)
    phase = 0
    inflight = [0] * n
    counts = [0] * n
    failures = [0] * n
    opened: list[tuple[float, float] | None] = [None] * n
    closed: list[tuple[float, float] | None] = [None] * n
    errors: list[str | None] = [None] * n
    opening = [asyncio.Event() for _ in range(n)]

    async def worker() -> None:
        nonlocal phase
        while phase < n:
            step = phase
            app, request, seconds = steps[step]
            exchange = _Exchange(request.body, request.expect)
            inflight[step] += 1
            try:
                await app(request.scope.copy(), exchange.receive, exchange.send)
                ok = exchange.done and not exchange.failed
            except Exception as exc:
                ok = False
                if errors[step] is None:
                    errors[step] = f"{type(exc).__name__}: {exc}"[:300]
            inflight[step] -= 1
            if not ok:
                failures[step] += 1
                if errors[step] is None:
                    errors[step] = f"status {exchange.status}, complete={exchange.done}"
            now = perf_counter()
            opened_at = opened[step]
            if opened_at is None and step == 0:
                opened[0] = (now, process_time())
                opening[0].set()
            elif opened_at is not None and closed[step] is None:
                counts[step] += ok
                if now - opened_at[0] >= seconds:
                    closed[step] = (now, process_time())
                    phase = step + 1
            if (
                closed[step] is not None
                and inflight[step] == 0
                and step + 1 < n
                and opened[step + 1] is None
            ):
                opened[step + 1] = (now, process_time())
                opening[step + 1].set()
            if opened[step] is None:
                # Stragglers of the previous step are still running: wait for
                # them after one request of this step. A route that never waits
                # would otherwise run back to back and starve them of the CPU,
                # threads included (the GIL's switch interval is 5 ms).
                await opening[step].wait()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    windows = []
    for step in range(n):
        start, end = opened[step], closed[step]
        if start is None or end is None:
            windows.append(Window(0, steps[step][2], 0.0, failures[step], errors[step]))
        else:
            wall, cpu = end[0] - start[0], end[1] - start[1]
            windows.append(Window(counts[step], wall, cpu, failures[step], errors[step]))
    return windows


async def measure(
    app: ASGIApp, request: Request, *, concurrency: int, warm: float, window: float
) -> Window:
    """One app alone: ``warm`` seconds unmeasured, then a ``window``."""
    steps = [(app, request, warm), (app, request, window)]
    return (await measure_sequence(steps, concurrency=concurrency))[1]


async def run_count(app: ASGIApp, request: Request, *, concurrency: int, total: int) -> None:
    """Run exactly ``total`` requests with ``concurrency`` loops (for warm-up and memory)."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call_once(app, request)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
