"""Part 2: the same apps behind uvicorn on 127.0.0.1, driven by ``loadgen`` over HTTP.

One uvicorn process per variant, all started up front (an idle server costs
nothing), and one load-generator process; both run on their own core of the
two. Variants are interleaved in ABBA rounds, as in part 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import Backend
from .inprocess import Cell

VARIANTS = ("a", "b", "f", "g")
ENDPOINTS: dict[str, dict[str, Any]] = {
    "ping": {"method": "GET", "path": "/ping", "expect": 200},
    "read": {"method": "GET", "path": "/items/42", "expect": 200},
}
# Every connection can hold a pool connection: no request waits on the pool, so
# this measures the stack, and a sync route never waits for a pool slot while
# holding a thread-pool token (see the concurrency-ceiling part for that case).
POOL = {"pool_size": 64, "max_overflow": 0}
_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    rounds: int
    warm: float
    window: float
    concurrencies: tuple[int, ...] = (1, 64)


@dataclass
class Server:
    variant: str
    port: int
    process: subprocess.Popen[bytes]


@dataclass
class HttpResult:
    cells: list[Cell] = field(default_factory=list)
    server: str = ""
    errors: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(server: Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"uvicorn for ({server.variant}) exited early")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=1) as sock:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"uvicorn for ({server.variant}) did not answer within {timeout}s")


@contextlib.contextmanager
def _servers(backend: Backend, http: str) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    config = {
        "backend": {
            f.name: getattr(backend, f.name)
            for f in dataclasses.fields(backend)
            if f.name != "server"
        },
        "pool": POOL,
        "http": http,
    }
    try:
        for variant in VARIANTS:
            port = _free_port()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks._serve",
                    json.dumps({**config, "variant": variant, "port": port}),
                ],
                cwd=_ROOT,
            )
            servers[variant] = Server(variant, port, process)
        for server in servers.values():
            _wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            server.process.terminate()
        for server in servers.values():
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


@contextlib.contextmanager
def _loadgen() -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen"],
        cwd=_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ask(loadgen: subprocess.Popen[str], command: dict[str, Any]) -> dict[str, Any]:
    assert loadgen.stdin is not None
    assert loadgen.stdout is not None
    loadgen.stdin.write(json.dumps(command) + "\n")
    loadgen.stdin.flush()
    answer: dict[str, Any] = json.loads(loadgen.stdout.readline())
    return answer


def http_protocol() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def run(backend: Backend, settings: Settings, progress: Any = print) -> HttpResult:
    http = http_protocol()
    result = HttpResult(server=f"uvicorn, {http}, asyncio loop, 1 worker")
    with _servers(backend, http) as servers, _loadgen() as loadgen:
        for endpoint, spec in ENDPOINTS.items():
            for concurrency in settings.concurrencies:
                cell = Cell(backend.name, endpoint, concurrency, list(VARIANTS))
                base = {**spec, "concurrency": concurrency, "warm": settings.warm}
                for server in servers.values():  # warm-up
                    _ask(loadgen, {**base, "port": server.port, "window": 0.05})
                order = list(VARIANTS)
                rng = random.Random(f"http/{endpoint}/{concurrency}")
                for _ in range(settings.rounds):
                    rng.shuffle(order)
                    seen: dict[str, list[dict[str, Any]]] = {v: [] for v in order}
                    for variant in [*order, *reversed(order)]:
                        answer = _ask(
                            loadgen,
                            {**base, "port": servers[variant].port, "window": settings.window / 2},
                        )
                        if "error" in answer:
                            result.errors.append(f"({variant}) {endpoint} c{concurrency}: {answer}")
                            continue
                        seen[variant].append(answer)
                    for variant, answers in seen.items():
                        if not answers:
                            # Both half-windows failed (the errors are listed): keep the
                            # round, so every variant's rounds stay paired with the others'.
                            cell.rates.setdefault(variant, []).append(math.nan)
                            continue
                        requests = sum(a["requests"] for a in answers)
                        wall = sum(a["wall"] for a in answers)
                        cell.rates.setdefault(variant, []).append(requests / wall)
                        errors = sum(a["errors"] for a in answers)
                        if errors:
                            cell.failures[variant] = cell.failures.get(variant, 0) + errors
                result.cells.append(cell)
                progress(cell)
    return result
