"""Writers that hammer the fault app, and the truth check that follows them."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from .faultapp import SessionTracker, committed_keys

# No request may take longer than this, whatever happens to the database.
REQUEST_BOUND = 10.0


@dataclass
class Outcomes:
    """What each write request was told, by key."""

    statuses: dict[str, int] = field(default_factory=dict)
    # The connection broke or the client gave up: the write may or may not exist.
    unknown: set[str] = field(default_factory=set)
    # (started at, seconds taken, status, key), in the order the answers came.
    timeline: list[tuple[float, float, int, str]] = field(default_factory=list)
    errors: dict[str, httpx.Response] = field(default_factory=dict)  # the 4xx and 5xx, by key

    def record(self, key: str, response: httpx.Response, started: float) -> None:
        self.statuses[key] = response.status_code
        took = time.monotonic() - started
        self.timeline.append((started, took, response.status_code, key))
        if response.status_code >= 400:
            self.errors[key] = response

    @property
    def acknowledged(self) -> set[str]:
        return {key for key, status in self.statuses.items() if 200 <= status < 300}

    @property
    def failed(self) -> set[str]:
        return {key for key, status in self.statuses.items() if status >= 500}

    def counts(self) -> dict[str, int]:
        return {str(status): n for status, n in sorted(Counter(self.statuses.values()).items())}

    @property
    def max_latency(self) -> float:
        return max((seconds for _, seconds, _, _ in self.timeline), default=0.0)


async def post_write(
    client: httpx.AsyncClient, outcomes: Outcomes, key: str, **params: Any
) -> httpx.Response:
    started = time.monotonic()
    with anyio.fail_after(REQUEST_BOUND):
        response = await client.post("/writes", params={"key": key, **params})
    outcomes.record(key, response, started)
    return response


@dataclass
class Truth:
    """The database against what the clients were told."""

    acknowledged_missing: set[str]  # 2xx, yet not in the database: never allowed
    refused_present: set[str]  # 4xx, yet in the database: never allowed
    failed_present: set[str]  # 5xx, yet in the database: an ambiguous outcome
    unexplained: set[str]  # in the database, but never asked for


def truth(sync_url: str, outcomes: Outcomes, prefix: str = "") -> Truth:
    present = {key for key in committed_keys(sync_url) if key.startswith(prefix)}
    refused = {key for key, status in outcomes.statuses.items() if 400 <= status < 500}
    return Truth(
        acknowledged_missing=outcomes.acknowledged - present,
        refused_present=present & refused,
        failed_present=present & outcomes.failed,
        unexplained=present - outcomes.statuses.keys() - outcomes.unknown,
    )


def leaks(checked_out: Callable[[], int], tracker: SessionTracker) -> dict[str, int]:
    return {
        "connections_checked_out": checked_out(),
        "sessions_open": tracker.open,
        "transactions_open": tracker.transactions,
    }


async def wait_for_no_leaks(
    checked_out: Callable[[], int], tracker: SessionTracker, seconds: float = 10
) -> dict[str, int]:
    """Leaks once cleanup had a moment to finish (closing runs after the response)."""
    for _ in range(int(seconds / 0.02)):
        if not any(leaks(checked_out, tracker).values()):
            break
        await anyio.sleep(0.02)
    return leaks(checked_out, tracker)


NO_LEAKS = {"connections_checked_out": 0, "sessions_open": 0, "transactions_open": 0}
