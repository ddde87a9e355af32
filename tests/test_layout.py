"""The house rules of docs/architecture.md, checked: one import name, small modules, short
functions, and every import rule it states. Each rule is also shown to fail on a throwaway import
planted in a copy of the tree, so a rule that can no longer fail is noticed."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("app", "trainer", "db", "bench", "odpo")
PRODUCT = ("app", "trainer", "db")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
OLD_TOP_LEVEL = ("app", "trainer", "db", "static")
HEAVY = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "vllm")
WEB_ENTRY = ("odpo.app.web", "odpo.app.ui.app", "odpo.app.cli.serve")
# folder -> dotted package, as pyproject.toml's package-dir maps them
PACKAGE_OF = {"app": "odpo.app", "trainer": "odpo.trainer", "db": "odpo.db", "bench": "odpo.bench",
              "odpo": "odpo", "static": "odpo.static"}


def _modules(root: Path = ROOT, dirs=CODE_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (root / d).rglob("*.py") if "versions" not in p.parts)


def _imports(tree: ast.AST, *, top_level_only: bool = False) -> list[str]:
    """Absolute module names imported (`from a import b` gives a and a.b: b may be a module)."""
    nodes = _top_level_nodes(tree) if top_level_only else ast.walk(tree)
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _top_level_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Statements that run at import: the module body and its if/try blocks, not function bodies
    nor `if TYPE_CHECKING:` blocks (read by type checkers only)."""
    stack = list(getattr(tree, "body", []))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack += node.orelse
            continue
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]


def _dotted(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE_OF[parts[0]], *parts[1:]])


def _import_map(root: Path) -> dict[str, tuple[Path, ast.AST]]:
    return {_dotted(p, root): (p, ast.parse(p.read_text())) for p in _modules(root)}


# -- the rules: each returns its violations for a tree ----------------------------------------------
def _forbidden(root: Path, folder: str, banned: tuple[str, ...], *, where: Callable[[Path], bool] = lambda p: True
               ) -> list[str]:
    return [f"{p.relative_to(root)}: {name}" for p in _modules(root, (folder,)) if where(p)
            for name in _imports(ast.parse(p.read_text())) if name.startswith(banned)]


def db_imports_neither_app_nor_trainer(root: Path) -> list[str]:
    return _forbidden(root, "db", ("odpo.app", "odpo.trainer", "odpo.bench"))


def trainer_never_imports_app(root: Path) -> list[str]:
    return _forbidden(root, "trainer", ("odpo.app", "odpo.bench"))


def app_never_imports_bench(root: Path) -> list[str]:
    return _forbidden(root, "app", ("odpo.bench",))


def services_import_neither_ui_nor_supervisor(root: Path) -> list[str]:
    """Services are plain data and transactions: a web page and a CLI call the same ones."""
    return _forbidden(root, "app", ("odpo.app.ui", "odpo.app.up", "odpo.app.spawn", "odpo.app.cli", "gradio"),
                      where=lambda p: "services" in p.parts)


def gradio_only_in_the_ui_package(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in _modules(root, PRODUCT)
            if "gradio" in {n.split(".")[0] for n in _imports(ast.parse(p.read_text()))} and p.parent.name != "ui"]


def web_app_closure_has_no_torch(root: Path) -> list[str]:
    """What importing the web app runs (module-level imports, followed through odpo's own
    modules) never reaches a model library: the web app holds no model."""
    modules = _import_map(root)
    seen: set[str] = set()
    bad: list[str] = []
    stack = [(name, name) for name in WEB_ENTRY]
    while stack:
        name, via = stack.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        for imported in _imports(modules[name][1], top_level_only=True):
            if imported.split(".")[0] in HEAVY:
                bad.append(f"{name} imports {imported} (reached from {via})")
            elif imported.startswith("odpo."):
                parts = imported.split(".")
                stack += [(".".join(parts[:i]), via) for i in range(2, len(parts) + 1)]
    return bad


RULES = [db_imports_neither_app_nor_trainer, trainer_never_imports_app, app_never_imports_bench,
         services_import_neither_ui_nor_supervisor, gradio_only_in_the_ui_package, web_app_closure_has_no_torch]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_import_rule_holds(rule):
    assert rule(ROOT) == []


# a throwaway import per rule: (file to plant it in, the line)
PLANTED = {
    "db_imports_neither_app_nor_trainer": ("db/engine.py", "from odpo.trainer.options import DEFAULT_MODEL"),
    "trainer_never_imports_app": ("trainer/priority.py", "import odpo.app.config"),
    "app_never_imports_bench": ("app/user_errors.py", "from odpo.bench import common"),
    "services_import_neither_ui_nor_supervisor": ("app/services/prompts.py", "from odpo.app.up import Supervisor"),
    "gradio_only_in_the_ui_package": ("app/services/status.py", "import gradio"),
    "web_app_closure_has_no_torch": ("app/services/status.py", "from odpo.trainer.policy import batching"),
}


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    copy = tmp_path_factory.mktemp("tree")
    for folder in CODE_DIRS:
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return copy


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_each_rule_fails_on_a_planted_import(rule, tree_copy):
    relpath, line = PLANTED[rule.__name__]
    target = tree_copy / relpath
    original = target.read_text()
    target.write_text(original + "\n" + line + "\n")
    try:
        assert rule(tree_copy), f"{rule.__name__} did not notice `{line}` in {relpath}"
    finally:
        target.write_text(original)
    assert rule(tree_copy) == []


def test_importing_the_web_app_loads_no_model_library():
    """The static rule above, checked for real: a fresh interpreter imports the web app."""
    code = ("import sys; import " + ", ".join(WEB_ENTRY) +
            f"; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


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


def test_no_two_modules_share_a_file_name():
    """Two `models.py` or `export.py` in different folders are a reader's trap. The layers of one
    feature are the one pattern allowed: its page and its service (ui/admin.py, services/admin.py),
    its service and its store functions (services/prompts.py, store/prompts.py)."""
    by_name: dict[str, list[str]] = {}
    for p in _modules(ROOT, (*CODE_DIRS,)):
        if p.name != "__init__.py":
            by_name.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    allowed = {("app/services/admin.py", "app/ui/admin.py"), ("app/services/prompts.py", "db/store/prompts.py")}
    repeated = {n: sorted(ps) for n, ps in by_name.items() if len(ps) > 1 and tuple(sorted(ps)) not in allowed}
    assert not repeated, repeated


def test_everything_imports_through_the_odpo_namespace():
    """`import app` or `from db import x` would resolve to a user's module of that name."""
    bad = [f"{p.relative_to(ROOT)}: {name}" for p in _modules(ROOT, (*CODE_DIRS, "tests"))
           for name in _imports(ast.parse(p.read_text())) if name.split(".")[0] in OLD_TOP_LEVEL]
    assert not bad, bad


def _literal_copies(paths: list[Path], values: tuple) -> list[str]:
    """Where a str or int literal equal to one of `values` is written (bools are ints: skipped)."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) in (str, int) and node.value in values:
                found.append(f"{path.relative_to(path.parents[1])}:{node.lineno} {node.value!r}")
    return found


def test_the_values_people_copy_are_written_only_in_options(tmp_path):
    """docs/architecture.md: the default model's name, the prompt limit and vLLM's port are literals
    in trainer/options.py alone; elsewhere they are imported. A planted copy is found."""
    from odpo.trainer import options

    values = (options.DEFAULT_MODEL, options.MAX_PROMPT_CHARS, options.VLLM_PORT)
    home = ROOT / "trainer" / "options.py"
    copies = _literal_copies([p for p in _modules() if p != home], values)
    assert not copies, f"import these from trainer/options.py instead: {copies}"
    assert _literal_copies([home], values)  # the scan does see them where they live
    planted = tmp_path / "app" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(f"LIMIT = {options.MAX_PROMPT_CHARS}\nMODEL = {options.DEFAULT_MODEL!r}\nFLAG = True\n")
    assert _literal_copies([planted], values) == [f"app/planted.py:1 {options.MAX_PROMPT_CHARS!r}",
                                                  f"app/planted.py:2 {options.DEFAULT_MODEL!r}"]
