"""A tiny name -> class registry, in the spirit of timm's ``register_model``.

Methods and strategies register themselves by name when their module is imported, so a config
string maps to a constructor with no if-chains in the engine, and a new method is one new module
(or one new package, for a method made of several files).

Discovery rule (``Registry.discover``): every top-level module or subpackage of the registry's
package (``methods``, ``strategies``) is imported once, except names starting with ``_`` and the
helper modules that the package's ``__init__`` lists in ``HELPER_MODULES`` (``methods``: ``base``,
``training``; ``strategies``: ``base``, ``buffers``). A package without that list skips ``base``
only. A subpackage is one method made of several files (``methods/efficientad/``, as anomalib's
model folders): its ``__init__`` imports the module(s) that register, and discovery never walks
into it, so its helper modules (networks, losses, teacher distillation, ...) are imported only by
the method that uses them, never as if they were methods.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

T = TypeVar("T")
HELPERS = "HELPER_MODULES"  # the attribute of a registry's package that lists its helper modules


class Registry(Generic[T]):
    """Maps names to classes; ``discover`` imports the package's method (strategy) modules and
    subpackages so each can register (the rule: the module docstring)."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, name: str):
        """Class decorator: ``@METHODS.register("padim")``."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def discover(self) -> None:
        """Import, once, every top-level module and subpackage of the package except names starting
        with '_' and the package's ``HELPER_MODULES`` (default: ``base``)."""
        if self._discovered:
            return
        pkg = importlib.import_module(self.package)
        helpers = set(getattr(pkg, HELPERS, ("base",)))
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_") and info.name not in helpers:
                importlib.import_module(f"{self.package}.{info.name}")
        self._discovered = True

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        self.discover()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}' (available: {', '.join(self.names())})"
            ) from None
