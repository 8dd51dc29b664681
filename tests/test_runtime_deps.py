"""Every import of the shipped packages comes from [project.dependencies] (or what they require).

A user's `pip install .` and the Docker image get only the runtime dependencies; a module that
arrives here through the test extra would crash a service at start. Imports inside functions and
`try:` count too; an optional one says `# optional dependency` on its line and lives in an extra.
scripts/check_install.sh proves the same by running the installed CLI in a runtime-only venv.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def distribution_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0]).lower()


def runtime_distributions(project: dict) -> set[str]:
    """The declared dependencies and, transitively, what they require (extras left out)."""
    found = {distribution_name(dep) for dep in project["dependencies"]}
    todo = list(found)
    while todo:
        try:
            requires = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            name = distribution_name(requirement)
            if "extra ==" not in requirement and name not in found:
                found.add(name)
                todo.append(name)
    return found


def imports(path: Path) -> list[tuple[str, int]]:
    """(top-level module, line) of every absolute import not marked optional."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if "optional dependency" not in lines[node.lineno - 1]:
            found += [(name.split(".")[0], node.lineno) for name in names]
    return found


def test_shipped_code_imports_only_runtime_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = [pattern.rstrip("*.") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    declared = runtime_distributions(pyproject["project"])
    owners = metadata.packages_distributions()
    missing = []
    for package in shipped:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, line in imports(path):
                if module in shipped or module in sys.stdlib_module_names:
                    continue
                if not {distribution_name(d) for d in owners.get(module, [])} & declared:
                    missing.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not missing, "add these to [project.dependencies] (or mark them optional):\n" + "\n".join(missing)
