"""Part 1: every variant's ASGI app called in-process, variants interleaved in rounds."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastapi import FastAPI
from sqlalchemy import Engine

from . import apps, driver
from .stats import Summary, ratios

ENDPOINTS: dict[str, driver.Request] = {
    "ping": driver.make_request("GET", "/ping"),
    "read": driver.make_request("GET", f"/items/{apps.READ_ID}"),
    "insert": driver.make_request("POST", "/items", {"name": "bench"}, expect=201),
}
ENDPOINT_TITLES = {
    "ping": "GET /ping (never touches the database)",
    "read": f"GET /items/{apps.READ_ID} (primary-key read)",
    "insert": "POST /items (single-row insert)",
}
UNTOUCHED_VARIANTS = ("a", "d", "e", "f", "g")
DB_VARIANTS = ("a", "b", "c", "d", "e", "f", "g", "ia", "is")


@dataclass(frozen=True)
class Settings:
    rounds: int
    warm: float  # seconds of ramp-up before each window
    window: float  # seconds measured per variant per round


@dataclass
class Cell:
    """One endpoint at one concurrency on one backend, every variant measured per round."""

    backend: str
    endpoint: str
    concurrency: int
    variants: list[str]
    rates: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # variant -> why n/a

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.endpoint}/c{self.concurrency}"

    def summary(self, variant: str) -> Summary | None:
        values = self.rates.get(variant)
        return Summary.of(values) if values else None

    def ratio(self, num: str, den: str) -> Summary | None:
        if not self.rates.get(num) or not self.rates.get(den):
            return None
        if self.failures.get(num) or self.failures.get(den):
            return None
        return ratios(self.rates[num], self.rates[den])


def build_apps(
    variants: Sequence[str], async_engine: object, sync_engine: Engine
) -> tuple[dict[str, FastAPI], dict[str, str]]:
    built: dict[str, FastAPI] = {}
    missing: dict[str, str] = {}
    for key in variants:
        problem = apps.peer_problem(key)
        if problem is not None:
            missing[key] = problem
            continue
        try:
            built[key] = apps.BUILDERS[key](async_engine, sync_engine)  # type: ignore[arg-type]
        except Exception as exc:  # a peer broken by current versions is reported, not fatal
            missing[key] = f"{type(exc).__name__}: {exc}"
    return built, missing


async def run_cell(
    cell: Cell,
    built: dict[str, FastAPI],
    settings: Settings,
    *,
    after_round: Callable[[], None] | None = None,
    seed: int = 4,
) -> Cell:
    """Measure every built variant once per round, in a fresh random order each round."""
    request = ENDPOINTS[cell.endpoint]
    order = [v for v in cell.variants if v in built]
    for key in order:
        try:
            # Warm-up: the pool, SQLAlchemy's statement caches, FastAPI's.
            await driver.run_count(
                built[key], request, concurrency=cell.concurrency, total=20 + 4 * cell.concurrency
            )
        except Exception as exc:
            cell.missing[key] = f"failed during warm-up: {type(exc).__name__}: {exc}"
    order = [v for v in order if v not in cell.missing]
    if after_round is not None:
        after_round()
    rng = random.Random(f"{seed}/{cell.key}")
    for _ in range(settings.rounds):
        rng.shuffle(order)
        for key in order:
            rate, failures = await driver.measure(
                built[key],
                request,
                concurrency=cell.concurrency,
                warm=settings.warm,
                window=settings.window,
            )
            cell.rates.setdefault(key, []).append(rate)
            if failures:
                cell.failures[key] = cell.failures.get(key, 0) + failures
        if after_round is not None:
            after_round()
    return cell


def describe(cell: Cell) -> str:
    """One progress line: median requests/s per variant."""
    parts = []
    for key in cell.variants:
        s = cell.summary(key)
        if s is None:
            parts.append(f"{key}=n/a")
        else:
            flag = f"({cell.failures[key]} failed)" if cell.failures.get(key) else ""
            parts.append(f"{key}={s.median:,.0f}{flag}")
    return f"  {cell.key:<24} " + "  ".join(parts)
