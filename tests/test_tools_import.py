"""Every name the benchmarks and devtools import from the project exists.

Benchmarks run by hand (`make bench-*`), not in `make test`; after the engine port one of them
still imported ``datakit.runner`` inside a function and failed only when someone ran it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("datakit", "portrait", "trainer", "devtools")
SCRIPTS = sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "devtools").rglob("*.py")])


def project_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import of a project module, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in PROJECT:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] in PROJECT]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_project_name_a_tool_imports_exists(path):
    missing = []
    for line, module, name in project_imports(path):
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            missing.append(f"line {line}: {module} ({error})")
            continue
        if name is not None and name != "*" and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"line {line}: {name} from {module}")
    assert not missing, missing
