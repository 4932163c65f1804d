"""`fast_init`: the replaced `__init__` of the hot records builds exactly what the
dataclass's own would, and a record it cannot build is refused when it is defined."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import typing
from typing import ClassVar

import pytest

from pvpatch.plan.coverage import Cover, SiteCoverage, TableEdit
from pvpatch.plan.stage import Decision
from pvpatch.record import fast_init
from pvpatch.rewrite.stage import SitePatch
from pvpatch.rules import Finding
from pvpatch.scan.sites import Site

RECORDS = (Site, Decision, SitePatch, TableEdit, Cover, SiteCoverage, Finding)


def _reference(cls: type) -> type:
    """The same fields, made by the stdlib alone (its generated __init__)."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default))
              if f.default is not dataclasses.MISSING else (f.name, f.type)
              for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"Ref{cls.__name__}", fields, frozen=True)


def _values(cls: type) -> list[object]:
    # Distinct stand-ins: a field stored under the wrong name would show.
    return [object() for _ in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_same_fields_as_the_stdlib_init(cls: type) -> None:
    # The stdlib's frozen __init__ stores through object.__setattr__; the fast one never.
    assert "__setattr__" not in vars(cls)["__init__"].__code__.co_names
    assert "__setattr__" in vars(_reference(cls))["__init__"].__code__.co_names
    ref = _reference(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = _values(cls)
    mine, theirs = cls(*values), ref(*values)
    assert [getattr(mine, n) for n in names] == [getattr(theirs, n) for n in names]
    # Keywords, and every default left out.
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    kw = dict(zip(required, values, strict=False))
    mine, theirs = cls(**kw), ref(**kw)
    assert [getattr(mine, n) for n in names] == [getattr(theirs, n) for n in names]
    assert inspect.signature(cls) == inspect.signature(ref)
    # The annotations resolve in the record's own module, as the stdlib __init__'s do
    # (documentation and type-checking tools read them).
    assert typing.get_type_hints(vars(cls)["__init__"]) == \
        typing.get_type_hints(vars(ref)["__init__"], vars(inspect.getmodule(cls)))


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_arity_errors_like_the_stdlib(cls: type) -> None:
    n = len(dataclasses.fields(cls))
    with pytest.raises(TypeError):
        cls(*range(n + 1))
    with pytest.raises(TypeError):
        cls()
    with pytest.raises(TypeError):
        cls(*range(n - 1), **{dataclasses.fields(cls)[0].name: 0})


def test_frozen_equal_hashable_and_pickled() -> None:
    edit = TableEdit(".altinstructions", 7, 3, "neutralise", 42, b"\x01\x02", None, 14)
    same = TableEdit(".altinstructions", 7, 3, "neutralise", 42, b"\x01\x02", None, 14)
    assert edit == same and hash(edit) == hash(same) and repr(edit) == repr(same)
    assert pickle.loads(pickle.dumps(edit)) == edit
    assert dataclasses.replace(edit, index=4).index == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        edit.index = 5  # type: ignore[misc]
    site = Site(1, ".text", 2, 3, None, 4, 6, 0, (), None, b"\xff\x15", 5, 6)
    assert pickle.loads(pickle.dumps(site)) == site
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.len = 5  # type: ignore[misc]


def test_refuses_what_it_cannot_build() -> None:
    @dataclasses.dataclass
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True)
    class Factory:
        a: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class KwOnly:
        a: int = dataclasses.field(kw_only=True)

    @dataclasses.dataclass(frozen=True)
    class NoInit:
        a: int = dataclasses.field(init=False, default=0)

    @dataclasses.dataclass(frozen=True, init=False)
    class InitOff:
        a: int

    @dataclasses.dataclass(frozen=True)
    class OwnInit:
        a: int

        def __init__(self, a: str) -> None:  # dataclasses keeps it: so must fast_init
            object.__setattr__(self, "a", int(a))

    for cls in (Mutable, Factory, Post, KwOnly, NoInit, InitOff, OwnInit):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)


@dataclasses.dataclass(frozen=True)
class WithClassVar:
    a: int
    b: ClassVar[int] = 0


@dataclasses.dataclass(frozen=True)
class WithInitVar:
    a: int
    b: dataclasses.InitVar[int] = 0


def test_refuses_pseudo_fields() -> None:
    for cls in (WithClassVar, WithInitVar):
        with pytest.raises(TypeError, match="pseudo-fields"):
            fast_init(cls)
