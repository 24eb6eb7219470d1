"""A small closed-loop HTTP/1.1 load generator, run as its own process.

It reads one JSON command per line on stdin and answers one JSON line on stdout,
so one process serves every measurement (no start-up inside a window). Each of
``concurrency`` keep-alive connections sends its next request as soon as the
previous response is complete. As in the in-process driver, only responses that
complete inside a steady-state window are counted.

Command: ``{"port": 8001, "method": "GET", "path": "/ping", "body": null,
"concurrency": 64, "warm": 0.1, "window": 0.5}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from time import perf_counter
from typing import Any


class _Run:
    def __init__(self, request: bytes, expect: int, opens: float, closes: float) -> None:
        self.request = request
        self.expect = expect
        self.opens = opens
        self.closes = closes
        self.marks: list[float] = []
        self.count = 0
        self.errors = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.open_connections = 0

    def completed(self, status: int) -> bool:
        """Record one response; return whether the connection should go on."""
        if status != self.expect:
            self.errors += 1
        now = perf_counter()
        if now >= self.closes:
            if len(self.marks) == 1:
                self.marks.append(now)
                self.count += 1
            return False
        if now >= self.opens:
            if self.marks:
                self.count += 1
            else:
                self.marks.append(now)
        return True


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"content-length:") + 15
            stop = head.find(b"\r\n", at)
            length = int(head[at : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(buffer) < total:
                return
            status = int(head[9:12])
            del buffer[:total]
            assert self.transport is not None
            if self.run.completed(status):
                self.transport.write(self.run.request)
            else:
                self.transport.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        run = self.run
        run.open_connections -= 1
        if run.open_connections == 0 and not run.finished.done():
            run.finished.set_result(None)


async def measure(command: dict[str, Any]) -> dict[str, Any]:
    body = b"" if command.get("body") is None else json.dumps(command["body"]).encode()
    lines = [
        f"{command['method']} {command['path']} HTTP/1.1",
        "Host: 127.0.0.1",
        "User-Agent: bench",
    ]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    opens = perf_counter() + command["warm"]
    run = _Run(request, command.get("expect", 200), opens, opens + command["window"])
    run.open_connections = command["concurrency"]
    for _ in range(command["concurrency"]):
        await loop.create_connection(lambda: _Connection(run), "127.0.0.1", command["port"])
    await asyncio.wait_for(run.finished, timeout=command["window"] + command["warm"] + 30)
    if len(run.marks) < 2:
        return {"error": "no response completed inside the window"}
    wall = run.marks[1] - run.marks[0]
    return {"requests": run.count, "wall": wall, "errors": run.errors}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            answer = await measure(json.loads(line))
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
