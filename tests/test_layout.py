"""The house rules of the code base, checked: one import name, small modules, short functions,
and a product that never imports its benchmark harness."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("app", "trainer", "db", "bench", "odpo")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
OLD_TOP_LEVEL = ("app", "trainer", "db", "static")


def _modules(dirs=CODE_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "versions" not in p.parts)


def _imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_function_over_the_size_limit():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_everything_imports_through_the_odpo_namespace():
    """`import app` or `from db import x` would resolve to a user's module of that name."""
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in _modules((*CODE_DIRS, "tests"))
           for name in _imports(ast.parse(p.read_text())) if name.split(".")[0] in OLD_TOP_LEVEL]
    assert not bad, bad


def test_the_product_never_imports_the_bench():
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in _modules(("app", "trainer", "db"))
           for name in _imports(ast.parse(p.read_text())) if name.startswith("odpo.bench")]
    assert not bad, bad


def test_gradio_only_in_the_ui_package():
    bad = [str(p.relative_to(ROOT)) for p in _modules(("app", "trainer", "db"))
           if "gradio" in {n.split(".")[0] for n in _imports(ast.parse(p.read_text()))}
           and p.parent.name != "ui"]
    assert not bad, bad
