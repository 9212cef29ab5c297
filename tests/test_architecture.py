"""The import rule of docs/ARCHITECTURE.md, enforced: a package imports only the packages below it.

The order is read from the table in docs/ARCHITECTURE.md (top row = the highest package), so the
document and the code cannot drift apart: a new upward import fails here, naming the file and line.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    """The packages of the architecture table, lowest first."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    rows = re.findall(r"^\| `(\w+)/` \|", text, flags=re.MULTILINE)
    return rows[::-1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_the_table_names_every_package_once():
    layers = _layers()
    packages = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert sorted(layers) == packages and len(set(layers)) == len(layers)


def test_every_import_points_down():
    layers = _layers()
    violations = []
    for package in layers:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in _imports(path):
                if module in layers and layers.index(module) > layers.index(package):
                    violations.append(f"{path.relative_to(REPO)}:{line} imports {module} (above {package})")
    assert not violations, "\n".join(violations)


def test_every_package_imports_from_any_folder(tmp_path):
    """pyproject.toml installs every package (editable): the project imports outside its root too."""
    import subprocess
    import sys

    layers = _layers()
    code = "import " + ", ".join(f"{package}" for package in layers) + "; import train.trainer, eval.knn"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "NUMBA_THREADING_LAYER": "omp"})
    assert result.returncode == 0, result.stderr[-2000:]
