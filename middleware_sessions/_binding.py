"""What a database object points at, as one immutable value.

``bind()`` validates the arguments and builds everything (engine, session factory,
ownership) before anything is assigned; the database then swaps the whole binding
in one assignment. So a constructor, ``db.override(...)`` or a test fixture that
fails half-way leaves the previous binding exactly as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import URL

from ._config import check_driver, check_engine, engine_kwargs, resolve_url, safe_url
from ._flavour import Flavour
from ._replicas import Replicas, build_replicas


@dataclass(frozen=True)
class Binding:
    """An engine, its session factory, and whether the database must dispose of it."""

    engine: Any
    sessionmaker: Any
    url: URL | None
    owns_engine: bool
    session_options: Mapping[str, Any] = field(default_factory=dict)
    replicas: Replicas | None = None  # read replicas, for read-only requests

    def describe(self, cls_name: str) -> str:
        """``Database('postgresql://u:***@host/db')``: never a password."""
        if self.url is not None:
            return f"{cls_name}({safe_url(self.url)!r})"
        # SQLAlchemy's Engine repr already masks the password.
        return f"{cls_name}(engine={self.engine!r})"


def bind(
    flavour: Flavour[Any],
    cls_name: str,
    url: str | URL | None,
    engine: Any,
    engine_options: Mapping[str, Any] | None,
    session_options: Mapping[str, Any] | None,
    replica_options: Mapping[str, Any] | None = None,
) -> Binding:
    """Validate the arguments and build a binding; raise ``ValueError`` before any change."""
    want_async = flavour.is_async
    parsed = resolve_url(url, engine_given=engine is not None, cls_name=cls_name)
    if parsed is not None:
        check_driver(parsed, want_async=want_async, cls_name=cls_name)
        options = engine_kwargs(parsed, engine_options, is_async=want_async)
        engine = flavour.create_engine(parsed, options)
    elif engine_options:
        raise ValueError(
            f"{cls_name}() got engine_options together with an engine. "
            "Options only apply to an engine the database creates itself. "
            "Configure your engine when you create it, or pass a URL instead."
        )
    else:
        check_engine(engine, want_async=want_async, cls_name=cls_name)
    session_options = dict(session_options or {})
    factory = flavour.sessionmaker(engine, session_options)
    replicas = None
    if replica_options:
        replicas = build_replicas(
            flavour, cls_name, engine, factory, engine_options, session_options, replica_options
        )
    return Binding(
        engine=engine,
        sessionmaker=factory,
        url=parsed,
        # An engine created here is ours to dispose (at lifespan shutdown); a given one is not.
        owns_engine=parsed is not None,
        session_options=session_options,
        replicas=replicas,
    )
