"""The throwaway PostgreSQL server from ``tests/_postgres.py``, loaded by path.

``tests/`` is not a package, so the module is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PATH = Path(__file__).resolve().parent.parent / "tests" / "_postgres.py"
_NAME = "middleware_sessions_bench_postgres"


def load() -> tuple[ModuleType | None, str | None]:
    """Return (module, None), or (None, why PostgreSQL benchmarks are skipped)."""
    if not _PATH.exists():
        return None, f"{_PATH.relative_to(_PATH.parent.parent)} is missing"
    module = sys.modules.get(_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(_NAME, _PATH)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    reason = module.skip_reason()
    if reason is not None:
        return None, reason
    return module, None
