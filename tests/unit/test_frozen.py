"""microagent.frozen: records declared ``@dataclass(frozen=True, eq=False, repr=False)`` on
:class:`Frozen` behave as ``@dataclass(frozen=True)`` (``order=True`` with
:class:`FrozenOrdered`) would make them. Each case builds the same class both ways, with the
same qualified name, and compares what the dataclasses module's own methods answer."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

import pytest

import microagent
from microagent.frozen import Frozen, FrozenOrdered


def _pair(build: Any) -> tuple[type, type]:
    """``build(decorate, base)`` made with stdlib methods and with the mixin."""
    stdlib = build(dataclass(frozen=True), object)
    mixin = build(dataclass(frozen=True, eq=False, repr=False), Frozen)
    return stdlib, mixin


def _point(decorate: Any, base: type) -> type:
    @decorate
    class Point(base):  # type: ignore[misc]
        x: Any
        y: Any = 0

    return Point


def _fields(decorate: Any, base: type) -> type:
    """Every flag that changes what is compared, hashed or shown."""

    @decorate
    class Flags(base):  # type: ignore[misc]
        shown: Any
        uncompared: Any = field(default=0, compare=False)
        unhashed: Any = field(default=0, hash=False)
        hidden: Any = field(default=0, repr=False)
        hashed_only: Any = field(default=0, compare=False, hash=True)
        made: tuple[int, ...] = field(default_factory=tuple)

    return Flags


def _one(decorate: Any, base: type) -> type:
    @decorate
    class One(base):  # type: ignore[misc]
        value: Any

    return One


def _empty(decorate: Any, base: type) -> type:
    @decorate
    class Empty(base):  # type: ignore[misc]
        pass

    return Empty


NAN = float("nan")
VALUES = (0, 1, 1.0, NAN, "a", (1, 2), None, frozenset({3}))


CASES: dict[Any, list[tuple[Any, ...]]] = {
    _point: [(v, w) for v in VALUES for w in (0, "a", NAN)],
    _fields: [(v,) for v in VALUES],
    _one: [(v,) for v in VALUES],
    _empty: [()],
}


@pytest.mark.parametrize("build", [_point, _fields, _one, _empty])
def test_equality_hash_and_repr_are_the_dataclass_ones(build: Any) -> None:
    stdlib, mixin = _pair(build)
    assert stdlib.__qualname__ == mixin.__qualname__
    cases = CASES[build]
    for a in cases:
        for b in cases:
            expected = stdlib(*a) == stdlib(*b)
            assert (mixin(*a) == mixin(*b)) is expected, (a, b)
            assert (mixin(*a) != mixin(*b)) is (not expected), (a, b)
        x, y = stdlib(*a), mixin(*a)
        assert hash(x) == hash(y)
        assert repr(x) == repr(y)
    assert any(stdlib(*a) == stdlib(*a) for a in cases)
    assert not all(stdlib(*a) == stdlib(*b) for a in cases for b in cases) or build is _empty


def test_the_flags_select_what_is_compared_hashed_and_shown() -> None:
    stdlib, mixin = _pair(_fields)
    for cls in (stdlib, mixin):
        a = cls(1, uncompared=1, unhashed=1, hidden=1, hashed_only=1)
        b = cls(1, uncompared=2, unhashed=1, hidden=1, hashed_only=1)
        c = cls(1, unhashed=2)
        assert a == b and a != c
        assert hash(a) == hash(b)
        assert hash(cls(1, hashed_only=5)) != hash(cls(1, hashed_only=6))  # counted in hash
        assert "hidden" not in repr(a) and "uncompared=1" in repr(a)


def test_other_classes_are_not_equal_and_not_ordered() -> None:
    _s, point = _pair(_point)
    _s, one = _pair(_one)
    assert point(1) != one(1)
    assert point(1) != (1, 0)
    assert point(1).__eq__((1, 0)) is NotImplemented
    assert {point(1): "a"}[point(1)] == "a"


def test_a_mixin_record_is_still_a_frozen_dataclass() -> None:
    _s, point = _pair(_point)
    p: Any = point(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        del p.y
    assert dataclasses.is_dataclass(type(p))
    assert [f.name for f in dataclasses.fields(p)] == ["x", "y"]
    assert dataclasses.replace(p, y=5) == point(1, 5)
    assert dataclasses.asdict(p) == {"x": 1, "y": 2}
    assert p.__match_args__ == ("x", "y")
    match p:
        case point(1, y):  # type: ignore[misc]
            assert y == 2
        case _:
            pytest.fail("positional match")


def test_a_subclass_with_more_fields_compares_them_all() -> None:
    stdlib, mixin = _pair(_point)
    for base in (stdlib, mixin):
        decorate = dataclass(frozen=True) if base is stdlib else dataclass(frozen=True, eq=False)

        @decorate
        class Point3(base):  # type: ignore[valid-type,misc]
            z: Any = 0

        assert Point3(1, 2, 3) != Point3(1, 2, 4)
        assert Point3(1, 2, 3) == Point3(1, 2, 3)
        assert repr(Point3(1, 2, 3)).endswith("Point3(x=1, y=2, z=3)")
        assert hash(Point3(1, 2, 3)) == hash((1, 2, 3))


def test_a_record_that_holds_itself_shows_dots() -> None:
    stdlib, mixin = _pair(_one)
    shown = []
    for cls in (stdlib, mixin):
        holder: list[Any] = []
        record = cls(holder)
        holder.append(record)
        shown.append(repr(record))
    assert shown[0] == shown[1]
    assert shown[1].endswith("One(value=[...])")


def _ordered(decorate: Any, base: type) -> type:
    @decorate
    class Key(base):  # type: ignore[misc]
        file: str
        line: int = 0
        note: str = field(default="", compare=False)

    return Key


def test_ordered_records_sort_as_order_true() -> None:
    stdlib = _ordered(dataclass(frozen=True, order=True), object)
    mixin = _ordered(dataclass(frozen=True, eq=False, repr=False), FrozenOrdered)
    rows = [("b", 1, "x"), ("a", 2, "y"), ("a", 1, "z"), ("b", 1, "w"), ("a", 1, "")]
    assert [repr(k) for k in sorted(stdlib(*r) for r in rows)] == [
        repr(k) for k in sorted(mixin(*r) for r in rows)
    ]
    for a in rows:
        for b in rows:
            x, y = stdlib(*a), stdlib(*b)
            p, q = mixin(*a), mixin(*b)
            assert (x < y, x <= y, x > y, x >= y, x == y) == (p < q, p <= q, p > q, p >= q, p == q)
    with pytest.raises(TypeError):
        _ = mixin("a") < ("a", 0)


def _records() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(microagent.__path__, "microagent."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            is_record = isinstance(value, type) and dataclasses.is_dataclass(value)
            if is_record and value.__module__ == info.name:
                found.append(value)
    return found


def test_no_frozen_record_lost_its_equality() -> None:
    """``eq=False`` on a frozen dataclass without the mixin would make it equal only to
    itself (and ``repr=False`` would show an address): every such class has the mixin."""
    records = _records()
    assert len(records) > 100
    lost = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in records
        if cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        and not (cls.__dataclass_params__.eq and cls.__dataclass_params__.repr)  # type: ignore[attr-defined]
        and not issubclass(cls, Frozen)
    ]
    assert lost == []
    assert any(issubclass(cls, Frozen) for cls in records)


def test_records_of_the_package_copy_and_pickle_as_before() -> None:
    """Real records (mixin classes at module level) survive copy, deepcopy and pickle equal,
    with the same hash and repr; a spec (its env a mappingproxy: no pickle) is copied."""
    import copy
    import pickle
    from pathlib import Path

    from microagent.compiler.spec import Forward, Network, Spec
    from microagent.errors import Location

    network = Network(forwards=(Forward(1, 2),), allow=("pypi.org",))
    for value in (Location("f", 1, 2), Forward(8080, 80), network):
        for twin in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
            assert twin == value and hash(twin) == hash(value) and repr(twin) == repr(value)
    spec = Spec(source=Path("/x/microagent.yaml"), name="a", network=network)
    assert copy.copy(spec) == spec and repr(copy.copy(spec)) == repr(spec)
    assert spec != dataclasses.replace(spec, name="b")
    assert Location("f", 1, 2) < Location("f", 2, 0)
