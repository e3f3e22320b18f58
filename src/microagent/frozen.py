"""Equality, hashing, ordering and repr for frozen dataclasses, written once.

``@dataclass(frozen=True)`` compiles six methods with ``exec`` for every class it decorates
(``__init__``, ``__setattr__``, ``__delattr__``, ``__eq__``, ``__hash__``, ``__repr__``; four
more with ``order=True``): about 0.3-0.7 ms a class on Python 3.11, a third of a short
command's CPU before its first line of work. A record declared as::

    @dataclass(frozen=True, eq=False, repr=False)
    class Point(Frozen):
        x: int
        y: int = 0

is still a frozen dataclass (``fields``, ``replace``, ``asdict`` and ``__match_args__`` as
before; assignment raises ``FrozenInstanceError``) and behaves as ``@dataclass(frozen=True)``
would make it: equal when of the same class with equal compared fields (as tuples), hashed over
the fields ``field(hash=...)`` / ``compare`` select, and the same ``repr``. Only
``__init__``, ``__setattr__`` and ``__delattr__`` are still compiled per class.
:class:`FrozenOrdered` adds ``order=True``'s comparisons. ``tests/unit/test_frozen.py`` holds
both against the dataclasses module's own methods. The records that the CLI's short commands
import (plan, create, cp: docs/performance.md) use it; elsewhere a plain frozen dataclass is
as good.
"""

from __future__ import annotations

import dataclasses
from _thread import get_ident  # what dataclasses' recursive_repr keys on; threading is not loaded
from collections.abc import Callable
from operator import attrgetter
from typing import Any

_Key = Callable[[Any], tuple[Any, ...]]


def _key_of(names: tuple[str, ...]) -> _Key:
    """A function returning the tuple of these attributes (``attrgetter`` returns a bare value
    for one name, and needs at least one)."""
    if not names:
        return lambda _obj: ()
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    many: _Key = attrgetter(*names)
    return many


class _Plan:
    """What a record class compares, hashes and shows: computed on first use, per class."""

    __slots__ = ("compare", "hash", "repr")

    def __init__(self, cls: type) -> None:
        fields = dataclasses.fields(cls)
        self.compare = _key_of(tuple(f.name for f in fields if f.compare))
        hashed = (f for f in fields if (f.compare if f.hash is None else f.hash))
        self.hash = _key_of(tuple(f.name for f in hashed))
        self.repr = tuple(f.name for f in fields if f.repr)


_PLANS: dict[type, _Plan] = {}
_IN_REPR: set[tuple[int, int]] = set()


def _plan(cls: type) -> _Plan:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _Plan(cls)
    return plan


class Frozen:
    """The methods ``@dataclass(frozen=True)`` would generate for ``__eq__``, ``__hash__`` and
    ``__repr__``; declare the class ``@dataclass(frozen=True, eq=False, repr=False)``."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            key = _plan(self.__class__).compare
            result: bool = key(self) == key(other)
            return result
        return NotImplemented

    def __hash__(self) -> int:
        return hash(_plan(self.__class__).hash(self))

    def __repr__(self) -> str:
        guard = (id(self), get_ident())
        if guard in _IN_REPR:
            return "..."  # a record that holds itself, as dataclasses' recursive_repr says
        _IN_REPR.add(guard)
        try:
            shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in _plan(type(self)).repr)
        finally:
            _IN_REPR.discard(guard)
        return f"{self.__class__.__qualname__}({shown})"


class FrozenOrdered(Frozen):
    """:class:`Frozen` plus the comparisons ``order=True`` generates (the compared fields as a
    tuple, only against the same class)."""

    __slots__ = ()

    def _ordered(self, other: object) -> tuple[tuple[Any, ...], tuple[Any, ...]] | None:
        if other.__class__ is not self.__class__:
            return None
        key = _plan(self.__class__).compare
        return key(self), key(other)

    def __lt__(self, other: object) -> bool:
        pair = self._ordered(other)
        return NotImplemented if pair is None else pair[0] < pair[1]

    def __le__(self, other: object) -> bool:
        pair = self._ordered(other)
        return NotImplemented if pair is None else pair[0] <= pair[1]

    def __gt__(self, other: object) -> bool:
        pair = self._ordered(other)
        return NotImplemented if pair is None else pair[0] > pair[1]

    def __ge__(self, other: object) -> bool:
        pair = self._ordered(other)
        return NotImplemented if pair is None else pair[0] >= pair[1]
