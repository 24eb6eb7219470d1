"""Part 1: every variant's ASGI app called in-process, variants interleaved in rounds."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter

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
UNTOUCHED_VARIANTS = ("a", "d", "e", "f", "g", "hd", "he")
DB_VARIANTS = ("a", "b", "c", "d", "e", "f", "g", "hd", "he", "ia", "is")


@dataclass(frozen=True)
class Settings:
    rounds: int  # at most this many rounds...
    warm: float  # seconds of unmeasured warm-up at the start of each round
    window: float  # seconds measured per variant per round
    budget: float = float("inf")  # ...and no new round after this many seconds,
    min_rounds: int = 3  # ...unless fewer than this many have run


@dataclass
class Cell:
    """One endpoint at one concurrency on one backend, every variant measured per round."""

    backend: str
    endpoint: str
    concurrency: int
    variants: list[str]
    rates: dict[str, list[float]] = field(default_factory=dict)  # requests per wall second
    cpu_rates: dict[str, list[float]] = field(default_factory=dict)  # per CPU second
    failures: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # variant -> why n/a
    errors: dict[str, str] = field(default_factory=dict)  # variant -> its first failure

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.endpoint}/c{self.concurrency}"

    def _series(self, cpu: bool) -> dict[str, list[float]]:
        return self.cpu_rates if cpu else self.rates

    def summary(self, variant: str, *, cpu: bool = False) -> Summary | None:
        values = self._series(cpu).get(variant)
        return Summary.of(values) if values else None

    def ratio(self, num: str, den: str, *, cpu: bool = False) -> Summary | None:
        series = self._series(cpu)
        if not series.get(num) or not series.get(den):
            return None
        if self.failures.get(num) or self.failures.get(den):
            return None
        return ratios(series[num], series[den])


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
                built[key], request, concurrency=cell.concurrency, total=10 + 2 * cell.concurrency
            )
        except Exception as exc:
            cell.missing[key] = f"failed during warm-up: {type(exc).__name__}: {exc}"
    order = [v for v in order if v not in cell.missing]
    if after_round is not None:
        after_round()
    rng = random.Random(f"{seed}/{cell.key}")
    started = perf_counter()
    for done in range(settings.rounds):
        if done >= settings.min_rounds and perf_counter() - started > settings.budget:
            break
        # Forward then backward (ABBA): a drift that is linear across the round
        # hits every variant equally, and each variant's figure for the round is
        # its two half-windows together.
        rng.shuffle(order)
        sequence = [*order, *reversed(order)]
        steps = [(built[order[0]], request, settings.warm)]
        steps += [(built[key], request, settings.window / 2) for key in sequence]
        measured = await driver.measure_sequence(steps, concurrency=cell.concurrency)
        seen: dict[str, list[driver.Window]] = {key: [] for key in order}
        for key, window in zip(sequence, measured[1:], strict=True):
            seen[key].append(window)
        for key, windows in seen.items():
            requests = sum(w.requests for w in windows)
            cell.rates.setdefault(key, []).append(requests / sum(w.wall for w in windows))
            cpu = sum(w.cpu for w in windows)
            cell.cpu_rates.setdefault(key, []).append(requests / cpu if cpu > 0 else 0.0)
            failures = sum(w.failures for w in windows)
            if failures:
                cell.failures[key] = cell.failures.get(key, 0) + failures
                error = next((w.error for w in windows if w.error), "unknown")
                cell.errors.setdefault(key, error)
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
