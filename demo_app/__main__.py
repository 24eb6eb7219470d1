"""``python -m demo_app [--host HOST] [--port PORT] [--workers N]``.

The database is ``DATABASE_URL`` if set, else ``./demo.db`` (SQLite), created
with its tables on first start.
"""

from __future__ import annotations

import argparse

import uvicorn


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
    args = parser.parse_args(argv)
    uvicorn.run("demo_app.main:app", host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
