"""Registries of named extension points, and import references for plug-ins.

Pure Python (``importlib`` only).  A :class:`Registry` maps names to objects.
Built-in entries are registered as *references* (``"package.module:attr"``)
and imported only when first used, so listing the choices of a registry (for
config validation, messages and docs) imports nothing heavy.  A user's
plug-in is the same thing without a name: any value of a registry-backed
config key that contains a ``:`` is an import reference,

* ``package.module:attr`` -- ``attr`` of an importable module, or
* ``path/to/file.py:attr`` -- ``attr`` of a Python file anywhere (a relative
  path is taken from the current working directory).

``attr`` may be dotted (``Class.factory``).  Failures raise
:class:`PluginError` with a message that names the reference and the problem.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PluginError", "Registry", "is_reference", "load_reference"]


class PluginError(ValueError):
    """A name or an import reference that does not give a usable object."""


def is_reference(value: str) -> bool:
    """Whether ``value`` is an import reference (``module:attr`` or ``file.py:attr``)."""
    return isinstance(value, str) and ":" in value


def _module_from_file(path: Path, ref: str) -> Any:
    resolved = path.resolve()
    if not resolved.is_file():
        raise PluginError(f"plug-in {ref!r}: no such file {str(path)!r} (relative paths are taken from the "
                          f"current directory {str(Path.cwd())!r})")
    name = "qmlhfl_plugin_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise PluginError(f"plug-in {ref!r}: {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file
        del sys.modules[name]
        raise PluginError(f"plug-in {ref!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
    return module


def load_reference(ref: str) -> Any:
    """Import and return the object an import reference names.  Raises :class:`PluginError`."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise PluginError(f"plug-in {ref!r}: expected 'package.module:attr' or 'path/to/file.py:attr'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(Path(target), ref)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise PluginError(f"plug-in {ref!r}: cannot import module {target!r}: {e}") from e
        except Exception as e:  # noqa: BLE001 - errors raised while importing the user's module
            raise PluginError(f"plug-in {ref!r}: importing {target!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            have = sorted(n for n in dir(module) if not n.startswith("_"))
            raise PluginError(f"plug-in {ref!r}: {target!r} has no attribute {attr!r}; it defines: "
                              f"{', '.join(have) or 'nothing public'}") from None
    return obj


@dataclass(frozen=True)
class Entry:
    """One registered choice: the object (or a reference to it) and a one-line doc."""

    name: str
    target: Any  # the object, or an import reference resolved on first use
    doc: str


class Registry:
    """Named choices of one extension point (models, data sets, codecs, ...).

    ``kind`` names the extension point in messages (``"model"``), ``key`` the
    config key that selects from it (``"model.name"``).
    """

    def __init__(self, kind: str, key: str) -> None:
        self.kind, self.key = kind, key
        self._entries: dict[str, Entry] = {}
        self._cache: dict[str, Any] = {}

    def register(self, name: str, target: Any, doc: str = "") -> None:
        """Add ``name``; ``target`` is the object or an import reference to it."""
        if not name or is_reference(name):
            raise ValueError(f"{self.kind} name {name!r}: a registered name must be non-empty and contain no ':'")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = Entry(name, target, doc)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def choices_text(self) -> str:
        """The valid values, for error messages and docs."""
        return (", ".join(repr(n) for n in self._entries)
                + ", or a plug-in 'package.module:attr' / 'path/to/file.py:attr'")

    def check(self, value: str) -> None:
        """Raise :class:`PluginError` unless ``value`` is a registered name or looks like a reference."""
        if not (value in self._entries or is_reference(value)):
            raise PluginError(f"{self.key} = {value!r}: unknown {self.kind}; valid: {self.choices_text()}")

    def resolve(self, value: str) -> Any:
        """The object for a registered name or an import reference."""
        if value in self._cache:
            return self._cache[value]
        if value in self._entries:
            target = self._entries[value].target
            obj = load_reference(target) if isinstance(target, str) else target
        elif is_reference(value):
            obj = load_reference(value)
        else:
            self.check(value)
            raise AssertionError(value)  # pragma: no cover - check() raised
        self._cache[value] = obj
        return obj
