"""Bookkeeping for every change fluxq makes to the running WebUI, so each can be undone exactly (``restore_all``).

Three kinds of change: a module attribute re-bound to a wrapper (``wrap_binding``; one wrapper object per original,
shared by every module that bound the same function), a class or module attribute replaced (``patch_attr``), and a
dict item added or replaced (``patch_item``). Each remembers the original once, so installing twice changes nothing.
Wrappers carry the original under ``MARK``; nothing here imports the WebUI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MARK = "__fluxq_original__"
_ABSENT = object()

# (kind, id(target), name) -> (target, original)
_installed: dict[tuple[str, int, Any], tuple[Any, Any]] = {}
_wrappers: dict[int, Callable[..., Any]] = {}   # id(original) -> its one wrapper, shared by all bindings


def is_ours(value: Any) -> bool:
    return getattr(value, MARK, None) is not None


def wrap_binding(module: Any, name: str, factory: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Re-bind ``module.name`` to ``factory(original)``. False when the name is absent (or already ours)."""
    current = getattr(module, name, None)
    if current is None or is_ours(current):
        return False
    wrapper = _wrappers.get(id(current))
    if wrapper is None:
        wrapper = factory(current)
        setattr(wrapper, MARK, current)
        _wrappers[id(current)] = wrapper
    _installed[("attr", id(module), name)] = (module, current)
    setattr(module, name, wrapper)
    return True


def patch_attr(target: Any, name: str, value: Any) -> None:
    key = ("attr", id(target), name)
    if key not in _installed:
        # On a class, remember only what the class itself defines (an inherited method is restored by deleting).
        original = target.__dict__.get(name, _ABSENT) if isinstance(target, type) else getattr(target, name, _ABSENT)
        _installed[key] = (target, original)
    setattr(target, name, value)


def patch_item(mapping: dict[Any, Any], key: Any, value: Any) -> None:
    marker = ("dict", id(mapping), key)
    if marker not in _installed:
        _installed[marker] = (mapping, mapping.get(key, _ABSENT))
    mapping[key] = value


def patch_count() -> int:
    return len(_installed)


def installed() -> dict[tuple[str, int, Any], tuple[Any, Any]]:
    """A copy of what is changed now (tests compare snapshots)."""
    return dict(_installed)


def restore_all() -> None:
    """Put every original back, newest first."""
    for (kind, _, name), (target, original) in reversed(list(_installed.items())):
        if kind == "attr" and original is _ABSENT:
            delattr(target, name)
        elif kind == "attr":
            setattr(target, name, original)
        elif original is _ABSENT:
            target.pop(name, None)
        else:
            target[name] = original
    _installed.clear()
    _wrappers.clear()
