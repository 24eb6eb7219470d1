"""One public import path, kept honest."""

from __future__ import annotations

import inspect
from pathlib import Path

import middleware_sessions
from middleware_sessions import AsyncDatabase, Database, MissingSessionError


def test_all_lists_exactly_the_public_names_in_order() -> None:
    public = sorted(name for name in vars(middleware_sessions) if not name.startswith("_"))
    public = [name for name in public if not inspect.ismodule(getattr(middleware_sessions, name))]

    assert middleware_sessions.__all__ == sorted(middleware_sessions.__all__)
    assert sorted(middleware_sessions.__all__) == public


def test_public_names_have_docstrings() -> None:
    for name in middleware_sessions.__all__:
        assert inspect.getdoc(getattr(middleware_sessions, name)), name
    for cls in (Database, AsyncDatabase):
        for member in ("session", "session_scope"):
            assert inspect.getdoc(getattr(cls, member)), f"{cls.__name__}.{member}"


def test_missing_session_error_is_a_runtime_error() -> None:
    assert issubclass(MissingSessionError, RuntimeError)


def test_package_is_typed() -> None:
    assert (Path(middleware_sessions.__file__).parent / "py.typed").exists()


def test_version_is_a_string() -> None:
    assert isinstance(middleware_sessions.__version__, str)
