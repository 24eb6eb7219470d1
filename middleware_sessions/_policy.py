"""Per-route transaction policy, read by the middleware from the matched endpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

ATTRIBUTE = "__middleware_sessions_policy__"


@dataclass(frozen=True)
class Policy:
    commit_on: Callable[[int], bool] | None
    read_only: bool
    replica: bool = True


def transaction_policy(
    *,
    commit_on: Callable[[int], bool] | None = None,
    read_only: bool = False,
    replica: bool = True,
) -> Callable[[Endpoint], Endpoint]:
    """Override the middleware's ``commit_on`` for one route.

    ``commit_on=...`` decides from the status, as the middleware's option does;
    ``read_only=True`` never commits (the transaction is rolled back after the
    response, so the status is not held up by a COMMIT round-trip); with a database
    that has ``replicas=[...]`` it also reads from a replica, unless ``replica=False``
    keeps it on the primary. Works on
    ``def`` and ``async def`` endpoints, above or below the route decorator::

        @router.get("/report")
        @transaction_policy(read_only=True)
        async def report() -> Report: ...
    """
    if read_only and commit_on is not None:
        raise ValueError(
            "transaction_policy() got both read_only=True and commit_on. "
            "A read-only route never commits, so commit_on would be ignored. "
            "Pass one of them."
        )
    if not read_only and not callable(commit_on):
        raise TypeError(
            "transaction_policy() needs commit_on=<callable taking the status code> "
            "or read_only=True."
        )
    if not replica and not read_only:
        raise ValueError(
            "transaction_policy() got replica=False without read_only=True. "
            "Only read-only routes read from replicas; every other route uses the primary. "
            "Drop replica=False, or add read_only=True."
        )
    policy = Policy(commit_on=commit_on, read_only=read_only, replica=replica)

    def mark(endpoint: Endpoint) -> Endpoint:
        try:
            setattr(endpoint, ATTRIBUTE, policy)
        except AttributeError:
            raise TypeError(
                f"transaction_policy() cannot mark {endpoint!r}: it does not take attributes. "
                "Decorate a plain function (def or async def)."
            ) from None
        return endpoint

    return mark
