"""``python -m demo_app [--host HOST] [--port PORT] [--workers N] [--isolation LEVEL]``.

The database is ``DATABASE_URL`` if set, else ``./demo.db`` (SQLite), created
with its tables on first start. ``--isolation serializable`` (or
``DATABASE_ISOLATION=serializable``) runs every transaction SERIALIZABLE; a
transfer that loses a serialization race is run again by the middleware, and
the log says so.
"""

from __future__ import annotations

import argparse
import copy
import os

import uvicorn
import uvicorn.config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app",
        description="Run the middleware_sessions demo ledger with uvicorn. "
        "The database is DATABASE_URL if set, else ./demo.db (SQLite).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument(
        "--isolation",
        choices=["read-committed", "repeatable-read", "serializable"],
        help="transaction isolation level (default: DATABASE_ISOLATION, else the database's)",
    )
    args = parser.parse_args(argv)
    if args.isolation:
        os.environ["DATABASE_ISOLATION"] = args.isolation  # read by demo_app.database
    # The library's INFO lines (a request run again after a conflict) next to uvicorn's.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["middleware_sessions"] = {"handlers": ["default"], "level": "INFO"}
    uvicorn.run(
        "demo_app.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=log_config,
    )


if __name__ == "__main__":
    main()
