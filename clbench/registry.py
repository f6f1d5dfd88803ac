"""A tiny name -> class registry, in the spirit of timm's ``register_model``, which, like timm's,
knows its names without importing the modules that register them.

Methods, strategies and dataset formats register themselves by name when their module is imported
(``@METHODS.register("padim")``), so a config string maps to a constructor with no if-chains in the
engine, and a new method is one new module (or one new package, for a method made of several files).

The index (``index(package)``): the registry reads the *source* of every module under its package
(recursively: a method made of several files is a subpackage; names starting with ``_`` other than
``__init__`` are private and skipped) with ``ast``, and records each class decorated
``@<REGISTRY>.register("<name>")`` (the name a string literal) with the module it is in. Nothing is
imported: ``clbench --help`` and ``clbench methods`` know every method without torch, and
``get(name)`` imports that one module (a run imports its method and strategy only; importing all
eight methods costs seconds: torch, timm, FrEIA). ``discover()`` still imports them all, for callers
that need every class.

Why the source and not a hand-kept list (a constant in ``methods/__init__``) or package entry points:
the decorator stays the one declaration of a name, so a new module cannot be left out of a list, and
nothing needs reinstalling; tests/test_startup.py checks that the index equals what importing every
module registers. Helper modules (``base``, ``training``, a method package's networks) hold no
decorator, so they are never imported as methods.

A module may also declare ``clbench`` commands of its own as a module-level literal
``CLI_COMMANDS = {"command": "one-line help"}`` (a method package: in its ``__init__``). The index
gives them to the names registered in the same top-level module or subpackage; the CLI lists them in
``--help`` and imports the method only when its command is used (its ``add_cli_commands`` builds the
command's parser).
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Mapping, TypeVar

T = TypeVar("T")
COMMANDS = "CLI_COMMANDS"  # the module-level literal that declares a unit's own clbench commands


@dataclass(frozen=True)
class Entry:
    """One registered name as the source declares it (read without importing)."""

    name: str
    module: str  # the module whose import registers the name
    summary: str = ""  # first line of the class docstring
    commands: Mapping[str, str] = field(default_factory=dict)  # clbench command -> help, of its unit


def _package_dir(package: str) -> Path:
    """The package's folder; a top-level package (``methods``) is found without being imported."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"registry package '{package}' not found (or not a package)")
    return Path(next(iter(spec.submodule_search_locations)))


def _summary(docstring: str | None) -> str:
    """A docstring's first sentence, without its references: ``clbench methods``' one line per name."""
    text = " ".join((docstring or "").strip().split("\n\n")[0].split())
    return text.split(" (")[0].split(". ")[0].rstrip(".,;")


def _registered(tree: ast.Module) -> list[tuple[str, str]]:
    """(name, summary) of each top-level class decorated ``@X.register("name")``; the summary is the
    class docstring's, else the module docstring's."""
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register"
                    and deco.args and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
                summary = _summary(ast.get_docstring(node) or ast.get_docstring(tree))
                found.append((deco.args[0].value, summary))
    return found


def _declared_commands(tree: ast.Module, path: Path) -> dict[str, str]:
    """The module-level ``CLI_COMMANDS`` literal, if any (a dict of command -> help)."""
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == COMMANDS for t in targets) and node.value is not None:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    value = None
                if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in value.items()):
                    raise ValueError(f"{path}: {COMMANDS} must be a literal dict of command name -> help")
                return value
    return {}


@functools.lru_cache(maxsize=None)
def index(package: str) -> dict[str, Entry]:
    """name -> ``Entry`` for every class registered under ``package``, from the source (the rule:
    the module docstring). Cached per process; a few milliseconds."""
    root = _package_dir(package)
    names: dict[str, Entry] = {}
    units: dict[str, tuple[list[str], dict[str, str]]] = {}  # top-level module/subpackage -> names, commands
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts) or parts == ("__init__",):
            continue
        text = path.read_text(encoding="utf-8")
        if ".register(" not in text and COMMANDS not in text:
            continue  # most helper modules: no parse
        tree = ast.parse(text, filename=str(path))
        module = ".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))
        unit_names, unit_commands = units.setdefault(parts[0], ([], {}))
        unit_commands.update(_declared_commands(tree, path))
        for name, summary in _registered(tree):
            if name in names:
                raise ValueError(f"'{name}' is registered twice under {package}: {names[name].module} and {module}")
            names[name] = Entry(name, module, summary)
            unit_names.append(name)
    for unit_names, unit_commands in units.values():
        for name in unit_names:
            names[name] = Entry(names[name].name, names[name].module, names[name].summary, dict(unit_commands))
    return names


class Registry(Generic[T]):
    """Maps names to classes; knows the names from the source (``index``) and imports a name's
    module when the class is asked for (the rule: the module docstring)."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str):
        """Class decorator: ``@METHODS.register("padim")`` (a string literal, so the index sees it)."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def discover(self) -> None:
        """Import every module that registers a name (for callers that need every class)."""
        for module in sorted({entry.module for entry in index(self.package).values()}):
            importlib.import_module(module)

    def names(self) -> list[str]:
        """Every name, without importing: the index, and any class registered at run time."""
        return sorted(set(index(self.package)) | set(self._entries))

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; imports its module only (and what that module imports)."""
        if name not in self._entries:
            entry = index(self.package).get(name)
            if entry is None:
                raise ValueError(f"unknown {self.kind} '{name}' (available: {', '.join(self.names())})")
            importlib.import_module(entry.module)
            if name not in self._entries:
                raise ValueError(f"{self.kind} '{name}': importing {entry.module} did not register it")
        return self._entries[name]
