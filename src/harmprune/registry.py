"""One way to plug in: a registry of named plug-ins, used for every kind harmprune can be extended with.

Judges, scoring methods, evaluation kinds, experiments, control kinds, report sections and executors each have a
:class:`Registry`, owned by the module that defines the kind (``harmprune.judges.JUDGES``, ...) and filled by a
decorator (``@register_judge("refusal")``). A name can come from three places:

* **built-ins**: the registry's ``modules`` (a package stands for all its modules) are *read*, not imported, for
  decorators called with a literal name (``@register_judge("refusal")``); a module is imported the first time one
  of its names is asked for. Listing names (CLI ``choices`` and ``--help``, config validation) therefore imports
  nothing, an optional heavy dependency is loaded only by the plug-in that needs it, and adding a built-in is
  adding one file.
* **other distributions**: entry points in the registry's group (``harmprune.judges``, ...), each
  ``name = "module:object"``; loading one imports its module, whose decorator registers the name. A built-in of
  the same name wins (the entry point is ignored, with a warning).
* **this process**: anything a test, a notebook or a script registered with the decorator.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

from harmprune.errors import HarmpruneError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """Plug-ins of one kind, by name.

    ``kind`` names the kind in messages (``unknown judge 'x'; available: ...``), ``group`` is the entry-point group
    of outside plug-ins, ``decorator`` the name of the function whose literal first argument registers a built-in,
    ``modules`` the packages or modules holding the built-ins, and ``error`` the exception raised for an unknown
    or doubly registered name.
    """

    def __init__(self, kind: str, group: str, decorator: str, modules: Sequence[str],
                 error: type[HarmpruneError] = HarmpruneError) -> None:
        self.kind, self.group, self.decorator, self.modules, self.error = kind, group, decorator, tuple(modules), error
        self._entries: dict[str, T] = {}
        self._sources: dict[str, str] = {}
        self._builtins: dict[str, str] | None = None
        self._plugins: dict[str, importlib.metadata.EntryPoint] | None = None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object itself under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj, source=obj)
            return obj

        return deco

    def add(self, name: str, entry: T, source: Any) -> None:
        """Register ``entry`` under ``name``; ``source`` (a class or function) says where it was defined.

        Registering a name again from the same source (a module imported twice, or reloaded) replaces the entry;
        from another source it is an error, so two plug-ins never silently shadow each other."""
        where = f"{source.__module__}.{source.__qualname__}"
        known = self._sources.get(name)
        if known is not None and known != where:
            raise self.error(f"{self.kind} {name!r} is registered twice: by {known} and by {where}")
        self._entries[name], self._sources[name] = entry, where

    def names(self) -> list[str]:
        """Every name that can be asked for, sorted; imports nothing."""
        return sorted({*self._entries, *self._builtin_table(), *self._plugin_table()})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str) -> T:
        """The plug-in called ``name``, importing its module on first use."""
        if name not in self._entries:
            self._load(name)
        return self._entries[name]

    def _load(self, name: str) -> None:
        module = self._builtin_table().get(name)
        plugin = self._plugin_table().get(name)
        if module is not None:
            importlib.import_module(module)
            origin = f"module {module}"
        elif plugin is not None:
            plugin.load()
            origin = f"entry point {plugin.name} = {plugin.value!r} ({self.group})"
        else:
            raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        if name not in self._entries:
            raise self.error(f"{origin} did not register {self.kind} {name!r} (its {self.decorator} decorator "
                             "must run when the module is imported)")

    def _builtin_table(self) -> dict[str, str]:
        """name → module of every built-in, read from the source of ``modules`` once."""
        if self._builtins is None:
            table: dict[str, str] = {}
            for module, path in _module_files(self.modules):
                for name in declared_names(path, self.decorator):
                    if table.setdefault(name, module) != module:
                        raise self.error(f"{self.kind} {name!r} is declared in both {table[name]} and {module}")
            self._builtins = table
        return self._builtins

    def _plugin_table(self) -> dict[str, importlib.metadata.EntryPoint]:
        """name → entry point of every outside plug-in in ``group`` (a built-in's name is not taken over)."""
        if self._plugins is None:
            builtins = self._builtin_table()
            plugins = {}
            for ep in importlib.metadata.entry_points(group=self.group):
                if ep.name in builtins:
                    log.warning("ignoring entry point %s = %r (%s): %s %r is built in", ep.name, ep.value,
                                self.group, self.kind, ep.name)
                else:
                    plugins[ep.name] = ep
            self._plugins = plugins
        return self._plugins


def declared_names(path: Path, decorator: str) -> list[str]:
    """The literal names a source file registers with ``@decorator("name", ...)`` on a class or function."""
    text = path.read_text(encoding="utf-8")
    if decorator not in text:  # most files: no parse needed
        return []
    names = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for call in node.decorator_list:
                if (isinstance(call, ast.Call) and _callee(call.func) == decorator and call.args
                        and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                    names.append(call.args[0].value)
    return names


def _callee(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _module_files(modules: Sequence[str]) -> list[tuple[str, Path]]:
    """(module name, source file) of each module, and of every module directly inside each package, unimported."""
    found = []
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise HarmpruneError(f"registry module {module!r} cannot be found")
        if spec.submodule_search_locations is None:
            found.append((module, Path(spec.origin)))
            continue
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).glob("*.py")):
                found.append((module if path.stem == "__init__" else f"{module}.{path.stem}", path))
    return found
