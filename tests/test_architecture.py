"""The shape of the tree, checked on every run so that it survives the next features.

- Data flows one way: a module imports only from its own layer or lower ones (``LAYERS``), and a
  few pairs are forbidden outright (``FORBIDDEN``: the server never depends on training code).
- No private name (``_x``) is imported from another module, and no module outside a package's
  own ``__init__``/``__main__`` is private: what two modules share is public where it is owned.
- No module grows past ``MAX_LINES``: split it by concept first.

Every import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "loraforge"
MAX_LINES = 500

# Lowest first. A top-level module or package of loraforge must be listed here to exist.
LAYERS: list[set[str]] = [
    {"__init__", "errors", "home", "files", "configfile", "runtime", "reportfilters", "datapackages"},
    {"data"},
    {"models"},
    {"guard"},
    {"export"},
    {"train"},
    {"evaluate"},
    {"registry"},
    {"govern"},
    {"jobs"},
    {"serve"},
    {"cli", "__main__"},
]
# (importer, imported) top-level parts that may never depend on each other, whatever the layers say.
FORBIDDEN = {("serve", "train"), ("evaluate", "train")}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted
    names: tuple[str, ...]  # names taken from it (``from x import a, b``); empty for ``import x``
    line: int

    def where(self) -> str:
        return f"{self.module.replace('.', '/')}.py:{self.line}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import of ``loraforge`` modules in ``path``, with relative imports resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        package = module.removesuffix(".__init__")
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, (), node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == PACKAGE:
                found.append(Import(module, target, tuple(a.name for a in node.names), node.lineno))
    return found


def top(dotted: str) -> str:
    """The top-level part of a loraforge module: ``loraforge.serve.app`` → ``serve``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise KeyError(part)


def layering_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        src, dst = top(imp.module), top(imp.target)
        try:
            lower = layer_of(src) < layer_of(dst)
        except KeyError as e:
            problems.append(f"{imp.where()}: {e.args[0]!r} is in no layer; add it to LAYERS")
            continue
        if lower:
            problems.append(f"{imp.where()}: {src} (a lower layer) imports {imp.target} ({dst}, a higher one)")
        if (src, dst) in FORBIDDEN:
            problems.append(f"{imp.where()}: {src} must not import {dst} ({imp.target})")
    return problems


def private_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        if imp.target == imp.module:
            continue
        hidden = [p for p in imp.target.split(".") if p.startswith("_") and not p.startswith("__")]
        if hidden:
            problems.append(f"{imp.where()}: imports the private module {imp.target}")
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{imp.where()}: imports the private name {name} from {imp.target}")
    return problems


def source_files(root: Path) -> list[Path]:
    return sorted((root / PACKAGE).rglob("*.py"))


def test_no_import_runs_against_the_flow() -> None:
    imports = [i for path in source_files(SRC) for i in imports_of(path, SRC)]
    assert len(imports) > 100  # the walk found the tree
    assert layering_problems(imports) == []
    parts = {top(module_name(p, SRC)) for p in source_files(SRC)}
    assert parts - set().union(*LAYERS) == set(), "add each new top-level module or package to LAYERS"


def test_no_private_name_crosses_modules() -> None:
    imports = [i for path in source_files(SRC) for i in imports_of(path, SRC)]
    assert private_problems(imports) == []
    private_modules = [
        str(p.relative_to(SRC))
        for p in source_files(SRC)
        if p.stem.startswith("_") and p.stem not in ("__init__", "__main__")
    ]
    assert private_modules == []


def test_every_module_is_short_enough_to_hold_in_mind() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in source_files(SRC)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_LINES
    }
    assert long == {}, f"split these by concept (limit {MAX_LINES} lines): {long}"


# --- the checks themselves can fail ---------------------------------------------------------------
@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    files = {
        "loraforge/__init__.py": "",
        "loraforge/data/__init__.py": "",
        "loraforge/data/formats.py": "from loraforge.serve.app import create_app\nfrom ..errors import _hidden\n",
        "loraforge/serve/__init__.py": "",
        "loraforge/serve/app.py": "def f():\n    from loraforge.train import loop\n",
        "loraforge/serve/engine.py": "from .app import _private_helper\nfrom . import app\n",
        "loraforge/nowhere/__init__.py": "import loraforge.errors\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checks_catch_what_they_forbid(fake_tree: Path) -> None:
    imports = [i for path in source_files(fake_tree) for i in imports_of(path, fake_tree)]
    layering = layering_problems(imports)
    assert any("data (a lower layer) imports loraforge.serve.app" in p for p in layering)
    assert any("serve must not import train" in p and "serve/app.py:2" in p for p in layering)  # inside a function
    assert any("'nowhere' is in no layer" in p for p in layering)
    private = private_problems(imports)
    assert any("_hidden from loraforge.errors" in p for p in private)  # relative import resolved
    assert any("_private_helper from loraforge.serve.app" in p for p in private)
    assert not any("import app" in p for p in private)
