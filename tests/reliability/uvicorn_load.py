"""Mixed traffic for the fault app under a real uvicorn, including clients that hang up."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from ..demo.conftest import DemoServer
from .load import REQUEST_BOUND, Outcomes

APP = ("-m", "uvicorn", "--factory", "--no-access-log", "tests.reliability.faultapp:create_app")

# What the mix is made of, and how often (weights).
MIX: dict[str, int] = {
    "ok": 50,  # 201, committed
    "reject": 10,  # 409 after the write: rolled back
    "crash": 5,  # exception after the write: 500, rolled back
    "commit": 5,  # COMMIT fails (deferred foreign key): 500, rolled back
    "dup": 5,  # unique violation at flush: 500, rolled back
    "stream": 5,  # 200, written before a streamed body
    "health": 5,  # no database at all
    "hangup-body": 5,  # client leaves while uploading the body: rolled back
    "hangup-query": 5,  # client leaves while the route waits on the database
    "hangup-stream": 5,  # client leaves in the middle of a streamed body
}


def fault_server(workdir: Path, database_url: str, workers: int = 1) -> DemoServer:
    """The fault app under ``uvicorn --factory`` (started by the caller)."""
    return DemoServer(workdir, database_url, workers=workers, command=APP)


@dataclass
class MixedLoad:
    requests: int
    clients: int
    seed: int = 0
    outcomes: Outcomes = field(default_factory=Outcomes)
    kinds: dict[str, str] = field(default_factory=dict)  # key -> kind
    hangups: Counter[str] = field(default_factory=Counter)
    # Called with the number of requests done, every `every` requests.
    every: int = 1000
    done: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def plan(self) -> list[tuple[str, str]]:
        rng = random.Random(self.seed)
        kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=self.requests)
        return [(f"s{self.seed}-{n}", kind) for n, kind in enumerate(kinds)]

    async def run(self, base_url: str) -> None:
        plan = iter(self.plan())
        url = urlsplit(base_url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

            async def worker() -> None:
                for key, kind in plan:
                    self.kinds[key] = kind
                    with anyio.fail_after(REQUEST_BOUND):
                        await self.one(client, host, port, key, kind)
                    self.done += 1
                    if self.done % self.every == 0:
                        stats = (await client.get("/stats")).json()
                        self.samples.append({"requests": self.done, **stats})

            async with anyio.create_task_group() as tg:
                for _ in range(self.clients):
                    tg.start_soon(worker)

    async def one(
        self, client: httpx.AsyncClient, host: str, port: int, key: str, kind: str
    ) -> None:
        started = time.monotonic()
        if kind in ("ok", "reject"):
            response = await client.post("/writes", params={"key": key, "mode": kind})
        elif kind in ("crash", "commit", "dup"):
            # uvicorn closes the connection after an exception, even once the 500
            # went out: a keep-alive client would race it with its next request.
            headers = {"Connection": "close"}
            params = {"key": key, "mode": kind}
            response = await client.post("/writes", params=params, headers=headers)
        elif kind == "stream":
            response = await client.get("/stream", params={"key": key, "chunks": 3, "sleep": 0.005})
        elif kind == "health":
            await client.get("/health")
            return
        else:
            self.outcomes.unknown.add(key)
            self.hangups[kind] += 1
            await hang_up(host, port, key, kind)
            return
        self.outcomes.record(key, response, started)


async def hang_up(host: str, port: int, key: str, kind: str) -> None:
    """Send a request on a raw socket and close it at the point ``kind`` names."""
    async with await anyio.connect_tcp(host, port) as stream:
        if kind == "hangup-body":
            head = f"POST /upload?key={key} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            await stream.send(head.encode() + b"x" * 100)
            await anyio.sleep(0.03)  # the route writes, then waits for the rest of the body
        elif kind == "hangup-query":
            head = f"POST /writes?key={key}&sleep=0.03 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            await stream.send(head.encode())
            await anyio.sleep(0.01)  # the route is inside pg_sleep
        else:  # hangup-stream
            head = f"GET /stream?key={key}&chunks=20&sleep=0.01 HTTP/1.1\r\nHost: x\r\n\r\n"
            await stream.send(head.encode())
            await stream.receive()  # the status and maybe a chunk: the response started


async def quiet_stats(client: httpx.AsyncClient, seconds: float = 10) -> dict[str, Any]:
    """``/stats`` once nothing is in flight any more (cleanup runs after responses)."""
    deadline = time.monotonic() + seconds
    while True:
        stats: dict[str, Any] = (await client.get("/stats")).json()
        busy = stats["sessions_open"] or stats["transactions_open"] or stats["checked_out"]
        if not busy or time.monotonic() > deadline:
            return stats
        await anyio.sleep(0.05)
