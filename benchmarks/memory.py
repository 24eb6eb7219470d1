"""Part 4: memory over 20,000 requests, one fresh process per variant.

``python -m benchmarks.memory VARIANT REQUESTS`` prints one JSON line. The
requests alternate the read and the insert endpoint on SQLite (the inserted
rows are trimmed as it goes). At each checkpoint, after a full collection, it
records the blocks Python still holds (``sys.getallocatedblocks()``) and the
process RSS; growth is the slope over the run. tracemalloc is on only for two
short stretches, at the start and at the end (tracing everything would make the
run three times slower): per-request allocation is the traced peak of one
request above what was held before it, at concurrency 1, and the traced bytes
still held after 500 more requests show whether a request leaves anything
behind.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

from . import apps, backends, driver
from .inprocess import ENDPOINTS

_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("b", "f")
CHECKPOINTS = 10
CONCURRENCY = 32


def _rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


async def _measure(variant: str, total: int, backend: backends.Backend) -> dict[str, Any]:
    async_engine, sync_engine = backend.engines(pool_size=1, max_overflow=0)
    app = apps.BUILDERS[variant](async_engine, sync_engine)
    requests = [ENDPOINTS["read"], ENDPOINTS["insert"]]
    for request in requests:  # warm-up: caches, pool, lazy imports
        await driver.run_count(app, request, concurrency=CONCURRENCY, total=min(300, total // 8))
    apps.trim_inserted(sync_engine)

    singles, batch = min(100, total // 10), min(250, total // 8)

    async def traced_stretch() -> tuple[list[int], int]:
        """Per-request peaks over 100 requests; then what 500 more requests leave behind.

        The second figure is taken between two points of one tracing session, after
        500 requests have already run under it: objects allocated before tracing
        started and replaced since (cache entries, pooled objects) would otherwise
        look like growth, because tracemalloc never saw them being allocated.
        """
        gc.collect()
        tracemalloc.start(1)
        peaks = []
        for i in range(singles):
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            await driver.call_once(app, requests[i % 2])
            peaks.append(tracemalloc.get_traced_memory()[1] - held)
        for request in requests:
            await driver.run_count(app, request, concurrency=CONCURRENCY, total=batch)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for request in requests:
            await driver.run_count(app, request, concurrency=CONCURRENCY, total=batch)
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return peaks, left

    per_request, left_at_start = await traced_stretch()
    checkpoints: list[dict[str, int]] = []
    step = total // CHECKPOINTS
    done = 0
    while True:
        gc.collect()
        rss, _ = _rss_kib()
        checkpoints.append({"requests": done, "blocks": sys.getallocatedblocks(), "rss_kib": rss})
        if done >= total:
            break
        for request in requests:
            await driver.run_count(app, request, concurrency=CONCURRENCY, total=step // 2)
        apps.trim_inserted(sync_engine)
        done += step
    per_request_end, left_at_end = await traced_stretch()
    per_request += per_request_end
    await async_engine.dispose()
    sync_engine.dispose()
    per_request.sort()
    return {
        "variant": variant,
        "requests": total,
        "per_request_peak_bytes": per_request[len(per_request) // 2],
        "left_after_batch": 2 * batch,
        "left_after_500_at_start": left_at_start,
        "left_after_500_at_end": left_at_end,
        "checkpoints": checkpoints,
        "peak_rss_kib": _rss_kib()[1],
    }


def growth_per_request(checkpoints: list[dict[str, int]], key: str) -> float:
    """Least-squares slope of ``key`` over requests, skipping the first checkpoint."""
    points = [(c["requests"], c[key]) for c in checkpoints[1:]]
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def run(total: int) -> dict[str, dict[str, Any]]:
    """Measure each variant in its own process, both at once (one per core)."""
    processes = {
        variant: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.memory", variant, str(total)],
            cwd=_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for variant in VARIANTS
    }
    results: dict[str, dict[str, Any]] = {}
    for variant, process in processes.items():
        out, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            results[variant] = {"error": f"exit code {process.returncode}"}
            continue
        results[variant] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    variant, total = sys.argv[1], int(sys.argv[2])
    with backends.sqlite() as backend:
        result = asyncio.run(_measure(variant, total, backend))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
