"""The options of the commands: ``--home``, and one flag per field of a config dataclass.

A config dataclass (``TrainConfig``, ``EvalConfig``, ``ServeConfig``) documents each field with a
docstring under it. :func:`config_flags` turns every field into a ``--field-name`` option with that
docstring as its help and the field's default shown, so that a new option is written once: in the
dataclass. The few fields that get no flag are listed, with the reason, in :data:`TRAIN_FLAGS`,
:data:`EVAL_FLAGS` and :data:`SERVE_FLAGS`.

The fields are read from the class's source with ``ast``, not by importing it: the config modules
import PyTorch (about 2 s), which ``loraforge --help`` and most commands never need, and Typer
builds every command's options at each start.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

Home = Annotated[
    Path | None, typer.Option("--home", help="State directory (default: $LORAFORGE_HOME or ~/.loraforge).")
]

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        help="The registry: sqlite:///PATH or postgresql://USER@HOST/DB "
        "(default: $LORAFORGE_DATABASE_URL, else HOME/registry.db)."
    ),
]

NoUpgrade = Annotated[
    bool,
    typer.Option("--no-upgrade", help="Refuse a registry behind this version instead of upgrading its schema."),
]

ConfigFlags = dict[str, Any]
"""The flags given on the command line, by field name; flags left out are absent."""

NO_LITERAL_DEFAULT = object()
"""The default of a field whose default is not a literal in the source (a call, a factory)."""

FLAG_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}


@dataclass(frozen=True)
class ConfigField:
    """One field of a config dataclass, as its source writes it."""

    name: str
    annotation: str
    """As written, e.g. ``int | None``."""
    default: Any
    """The default, when it is a literal or a constant whose value is one; ``inspect.Parameter.empty``
    for a required field; :data:`NO_LITERAL_DEFAULT` for anything else (a call, a factory)."""
    doc: str
    """The docstring under the field as plain one-line text; "" when it has none."""


@dataclass(frozen=True)
class FlagSource:
    """Which config class a command's flags come from, and what differs from one flag per field."""

    module: str
    """The module or package that defines or re-exports the class, e.g. ``loraforge.train``."""
    class_name: str
    not_flags: Mapping[str, str] = field(default_factory=dict)
    """Fields without a flag, each with the reason (they can still be set in the YAML file)."""
    help: Mapping[str, str] = field(default_factory=dict)
    """Help for fields that have no docstring (a docstring, once written, takes over)."""
    names: Mapping[str, str] = field(default_factory=dict)
    """Flag spellings other than ``--field-name``."""


def module_path(dotted: str) -> Path:
    """The source file of a module or package, found without running it (nor its package)."""
    first, *rest = dotted.split(".")
    spec = importlib.util.find_spec(first)
    for part in rest:
        locations = spec.submodule_search_locations if spec else None
        spec = PathFinder.find_spec(part, list(locations)) if locations else None
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no source file for the module {dotted}")
    return Path(spec.origin)


@functools.cache
def module_tree(module: str) -> ast.Module:
    path = module_path(module)
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def find_definition(module: str, name: str) -> tuple[str, ast.stmt]:
    """Where a top-level name is defined (a class, or an assignment), following ``from x import name``.

    Returns:
        The defining module and the ``class`` or assignment statement.
    """
    tree = module_tree(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return module, node
    package = module if module_path(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == name and not a.asname for a in node.names):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            return find_definition(source, name)
    raise LookupError(f"{module} ({module_path(module)}) neither defines nor imports {name}")


def literal_value(module: str, node: ast.expr) -> Any:
    """The value of a literal, or of a constant named in ``module`` whose value is one; else
    :data:`NO_LITERAL_DEFAULT`."""
    if isinstance(node, ast.Name):
        try:
            where, definition = find_definition(module, node.id)
        except LookupError:
            return NO_LITERAL_DEFAULT
        value = definition.value if isinstance(definition, ast.Assign | ast.AnnAssign) else None
        return literal_value(where, value) if value is not None else NO_LITERAL_DEFAULT
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NO_LITERAL_DEFAULT


def plain_text(doc: str) -> str:
    """A docstring as one line of help: ``x`` and :role:`x` become x, whitespace is collapsed."""
    doc = re.sub(r":\w+:`([^`]*)`", r"\1", doc).replace("``", "")
    return " ".join(doc.split())


def read_config_fields(module: str, class_name: str) -> list[ConfigField]:
    """The fields of a dataclass in source order, with their literal defaults and docstrings."""
    where, cls = find_definition(module, class_name)
    if not isinstance(cls, ast.ClassDef):
        raise LookupError(f"{class_name} in {where} is not a class")
    body = cls.body
    fields: list[ConfigField] = []
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        annotation = ast.unparse(node.annotation)
        if annotation.startswith("ClassVar"):
            continue
        default = inspect.Parameter.empty if node.value is None else literal_value(where, node.value)
        after = body[i + 1] if i + 1 < len(body) else None
        is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        doc = after.value.value if is_doc and isinstance(after.value.value, str) else ""  # type: ignore[union-attr]
        fields.append(ConfigField(node.target.id, annotation, default, plain_text(doc)))
    return fields


def flag_type(f: ConfigField) -> type | None:
    """The type a flag of this field parses to (``int`` for ``int | None``), or None if it has none."""
    parts = [p.strip() for p in f.annotation.split("|") if p.strip() != "None"]
    return FLAG_TYPES.get(parts[0]) if len(parts) == 1 else None


def option_default(default: Any) -> Any:
    """The default a flag shows in ``--help``: the field's, or None for required, empty or non-literal ones."""
    if default == "" or default is inspect.Parameter.empty or default is NO_LITERAL_DEFAULT:
        return None
    return default


def flag_parameters(source: FlagSource) -> list[inspect.Parameter]:
    """One keyword parameter per flag field, annotated for Typer, with the field's default.

    Raises:
        TypeError: a field that cannot be a flag (no docstring nor help, a type other than str, int,
            float, bool or Path, or a boolean that defaults to True) is not in ``not_flags``.
    """
    params = []
    for f in read_config_fields(source.module, source.class_name):
        if f.name in source.not_flags:
            continue
        kind = flag_type(f)
        text = f.doc or source.help.get(f.name, "")
        where = f"{source.class_name}.{f.name}"
        if kind is None or (kind is bool and f.default is not False) or not text:
            why = "no docstring" if not text else f"its type {f.annotation} = {f.default!r}"
            raise TypeError(f"{where} cannot be a flag ({why}): document it, or list it in not_flags")
        name = source.names.get(f.name, "--" + f.name.replace("_", "-"))
        annotation = Annotated[kind | None, typer.Option(name, help=escape(text))]  # type: ignore[valid-type]
        default = option_default(f.default)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was given on the command line (not left to its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def config_flags(source: FlagSource) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one flag per field of a config class.

    The command takes a keyword parameter ``flags: ConfigFlags``; in the command's signature it is
    replaced, at its place, by the generated options, and the command receives only the flags given
    on the command line (a default shown in ``--help`` must not hide a YAML file's value).
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        generated = flag_parameters(source)
        names = {p.name for p in generated}
        params: list[inspect.Parameter] = []
        for p in inspect.signature(command, eval_str=True).parameters.values():
            params += generated if p.name == "flags" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]
        # Typer hands the context to the parameter annotated typer.Context: the command's own, or one added.
        context = next((p.name for p in params if p.annotation is typer.Context), None)
        if context is None:
            params.append(inspect.Parameter("typer_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(command)
        def run(**values: Any) -> None:
            ctx: typer.Context = values[context] if context else values.pop("typer_context")
            given = {n: values.pop(n) for n in names}
            flags = {k: v for k, v in given.items() if given_on_command_line(ctx, k)}
            command(**values, flags=flags)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


# --- which fields are flags ------------------------------------------------------------------------
# Every field of these classes is a flag except the ones listed in not_flags; its help is the field's docstring.

TRAIN_FLAGS = FlagSource(
    "loraforge.train",
    "TrainConfig",
    not_flags={"target_modules": "a list of module names: set it in the YAML file"},
)

EVAL_FLAGS = FlagSource(
    "loraforge.evaluate",
    "EvalConfig",
    not_flags={
        "suites": "a list: `eval` spells it --suites task,safety",
        "sizes": "a mapping of set: items; --max-items caps them all",
        "write_manifest": "for library callers; `write_manifest: false` in the YAML file",
    },
    names={"policy": "--gate"},
)

SERVE_FLAGS = FlagSource(
    "loraforge.serve.config",
    "ServeConfig",
    not_flags={
        "default_declarations": "a mapping per tenant: set it in the YAML file",
        "upgrade_registry": "a boolean that defaults to true: `serve --no-upgrade` turns it off",
    },
)
