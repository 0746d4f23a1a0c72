"""The package layout: one import root, no second copy of any module, no import cycles."""

from __future__ import annotations

import importlib.util
import sys

from support import repo_root


def test_the_repository_root_is_not_on_the_import_path() -> None:
    root = str(repo_root())
    assert root not in sys.path and "" not in sys.path
    assert importlib.util.find_spec("agent") is None
    assert importlib.util.find_spec("cli") is None
