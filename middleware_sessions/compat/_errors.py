"""What the compat layers share: turning our ``MissingSessionError`` into the peer's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..exceptions import MissingSessionError


@contextmanager
def peer_errors(missing: Callable[[str], MissingSessionError]) -> Iterator[None]:
    """Re-raise our ``MissingSessionError`` as the peer's subclass, keeping our message."""
    try:
        yield
    except MissingSessionError as exc:
        if type(exc) is not MissingSessionError:
            raise  # already the peer's
        raise missing(str(exc)) from None
