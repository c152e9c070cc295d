"""The import rules of docs/architecture.md, read from the source with ast (nothing is imported):

- gdrt_core, the ML library, imports nothing from pipelines/ or components/ (orchestration depends on the
  library, never the reverse);
- the pipeline graph, parameters, local run and sweep import neither kfp nor torch at module level (they run
  without kfp; pipeline-definition modules must stay light)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


LIBRARY = sorted((REPO / "gdrt_core").rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_imports_no_orchestration(path):
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in ("pipelines", "components"))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: gdrt_core must not depend on pipelines/ or components/"


def test_the_rule_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipelines.graph import STEPS\n    import components.image\n")
    assert {"pipelines.graph", "components.image"} <= imported_modules(f)


@pytest.mark.parametrize("name", ["graph", "params", "local_run", "sweep", "trainjob", "cli"])
def test_local_orchestration_imports_neither_kfp_nor_torch_at_module_level(name):
    assert not top_level_imports(REPO / "pipelines" / f"{name}.py") & {"kfp", "torch", "transformers"}
