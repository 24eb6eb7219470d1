"""Serve one variant with uvicorn: ``python -m benchmarks._serve '<json config>'``.

The config names the variant, the port and the backend (URLs, engine options,
pool). One worker, the asyncio loop, access log off.
"""

from __future__ import annotations

import json
import sys

import uvicorn

from . import apps
from .backends import Backend


def main() -> None:
    config = json.loads(sys.argv[1])
    backend = Backend(**config["backend"])
    async_engine, sync_engine = backend.engines(**config["pool"])
    app = apps.BUILDERS[config["variant"]](async_engine, sync_engine)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=config["port"],
        loop="asyncio",
        http=config.get("http", "auto"),
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
