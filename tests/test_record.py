"""pvpatch.record: `record` makes what `@dataclass(frozen=True)` makes (every record in
the package is held against a stdlib twin), `fast_init`'s replaced `__init__` of the hot
records builds exactly what the dataclass's own would, and a record either cannot build
is refused when it is defined."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import typing
from typing import ClassVar

import pytest

from pvpatch import record as record_module
from pvpatch.plan.coverage import Cover, SiteCoverage, TableEdit
from pvpatch.plan.stage import Decision
from pvpatch.record import fast_init, record
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


# -- record: every record in the package against a stdlib twin ---------------------------

_ADDED = {"__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__",
          "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__dict__",
          "__weakref__", "__doc__"}


def _package_records() -> list[type]:
    import importlib
    import pkgutil

    import pvpatch

    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(pvpatch.__path__, "pvpatch."):
        if info.name == "pvpatch.__main__":
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if (isinstance(value, type) and dataclasses.is_dataclass(value)
                    and vars(value).get("__setattr__") is not None
                    and vars(value)["__setattr__"].__code__.co_filename == record_module.__file__):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


def _twin(cls: type) -> type:
    """The same class body made by `@dataclass(frozen=True)` itself."""
    ns: dict[str, object] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                             "__annotations__": dict(cls.__annotations__),
                             "__doc__": _doc_of(cls)}
    for key, value in vars(cls).items():
        if key in _ADDED or key in cls.__annotations__:
            continue
        ns[key] = value
    for key, value in vars(cls).items():  # methods the class body wrote itself are kept
        code = getattr(value, "__code__", None)
        if key in _ADDED and code is not None and code.co_filename != record_module.__file__:
            ns[key] = value
    for f in dataclasses.fields(cls):
        ns[f.name] = dataclasses.field(default=f.default, default_factory=f.default_factory,
                                       init=f.init, repr=f.repr, hash=f.hash,
                                       compare=f.compare, metadata=f.metadata)
    return dataclasses.dataclass(frozen=True)(type(cls.__name__, cls.__bases__, ns))


_DOCS: dict[type, str | None] = {}


def _doc_of(cls: type) -> str | None:
    # The docstring as written; record fills a missing one the way the stdlib does.
    return _DOCS.get(cls, cls.__doc__)


def _sample(cls: type, base: int) -> list[object]:
    # Distinct hashable, picklable values: a field stored or compared under the wrong name
    # would show.
    return [f"{f.name}-{base + i}" for i, f in enumerate(dataclasses.fields(cls)) if f.init]


PACKAGE_RECORDS = _package_records()


def test_the_package_defines_its_records_with_record() -> None:
    # The walk finds them (a broken walk would make the twin tests vacuous).
    assert len(PACKAGE_RECORDS) >= 100
    assert Decision in PACKAGE_RECORDS and Finding in PACKAGE_RECORDS


@pytest.mark.parametrize("cls", PACKAGE_RECORDS, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_record_is_its_stdlib_twin(cls: type) -> None:
    twin = _twin(cls)
    assert [(f.name, f.type, f.default, f.default_factory, f.init, f.repr, f.hash, f.compare)
            for f in dataclasses.fields(cls)] == \
        [(f.name, f.type, f.default, f.default_factory, f.init, f.repr, f.hash, f.compare)
         for f in dataclasses.fields(twin)]
    assert repr(cls.__dataclass_params__) == repr(twin.__dataclass_params__)  # type: ignore[attr-defined]
    assert cls.__match_args__ == twin.__match_args__  # type: ignore[attr-defined]
    assert cls.__doc__ == twin.__doc__
    assert str(inspect.signature(cls)) == str(inspect.signature(twin))
    assert inspect.signature(cls) == inspect.signature(twin)
    # (a name only imported for type checking fails to resolve: the same way for both)
    assert _outcome(typing.get_type_hints, cls.__init__) == \
        _outcome(typing.get_type_hints, twin.__init__)
    if hasattr(cls, "__post_init__"):
        return  # its fields need real values: test_record_post_init covers the mechanism
    values, others = _sample(cls, 0), _sample(cls, 100)
    mine, theirs = cls(*values), twin(*values)
    assert vars(mine) == vars(theirs) and list(vars(mine)) == list(vars(theirs))
    assert repr(mine) == repr(theirs)
    assert _outcome(hash, mine) == _outcome(hash, theirs)
    assert mine == cls(*values) and mine != theirs and theirs != mine
    assert (mine == cls(*others)) == (theirs == twin(*others))
    for f, other in zip([f for f in dataclasses.fields(cls) if f.init], others, strict=True):
        changed = dataclasses.replace(mine, **{f.name: other})
        assert (changed == mine) == (dataclasses.replace(theirs, **{f.name: other}) == theirs)
        assert (changed == mine) == (not f.compare)
    assert pickle.loads(pickle.dumps(mine)) == mine
    assert copy.copy(mine) == mine and copy.deepcopy(mine) == mine
    for name in ("x", *(f.name for f in dataclasses.fields(cls))):
        for obj in (mine, theirs):
            with pytest.raises(dataclasses.FrozenInstanceError) as err:
                setattr(obj, name, 1)
            assert str(err.value) == f"cannot assign to field {name!r}"
            with pytest.raises(dataclasses.FrozenInstanceError) as err:
                delattr(obj, name)
            assert str(err.value) == f"cannot delete field {name!r}"
    for args, kwargs in _bad_calls(cls, values):
        assert _error(cls, args, kwargs) == _error(twin, args, kwargs), (args, kwargs)


def _bad_calls(cls: type, values: list[object]) -> list[tuple[list[object], dict[str, object]]]:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    calls: list[tuple[list[object], dict[str, object]]] = [
        ([*values, 0], {}), ([*values, 0, 1], {}), ([], {}), (values, {"nonsense": 1}),
        ([*values, 0], {"nonsense": 1})]
    if names:
        calls.append((values, {names[0]: 1}))
        calls.append(([], {names[-1]: 1}))
    return calls


def _outcome(fn: typing.Callable[[typing.Any], object], arg: object) -> object:
    """What fn(arg) returns, or the type and words of what it raises."""
    try:
        return fn(arg)
    except Exception as exc:
        return type(exc), str(exc)


def _error(cls: type, args: list[object], kwargs: dict[str, object]) -> str:
    try:
        cls(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return "no error"


@record
class _Everything:
    """A record with every field feature the stdlib offers a plain class."""

    a: int
    b: list[int] = dataclasses.field(default_factory=list)
    c: str = dataclasses.field(default="c", repr=False)
    d: int = dataclasses.field(default=0, compare=False)
    e: int = dataclasses.field(default=0, hash=False)
    f: list[int] = dataclasses.field(init=False, default_factory=lambda: [7])
    g: int = dataclasses.field(init=False, default=5)
    h: object = None


@record
class _Docless:
    a: int
    b: str = "b"


_DOCS[_Docless] = None  # written without one: its twin must make its own


@record
class _Posted:
    """__post_init__ runs last, and may set fields the frozen way."""

    a: int
    twice: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "twice", 2 * self.a)


@record
class _Own:
    """The class body's own methods are kept, as the stdlib keeps them."""

    a: int

    def __repr__(self) -> str:
        return "own"

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 7


@pytest.mark.parametrize("cls", [_Everything, _Docless, _Posted, _Own],
                         ids=lambda c: c.__name__)
def test_record_features_match_the_stdlib(cls: type) -> None:
    twin = _twin(cls)
    assert cls.__doc__ == twin.__doc__
    assert str(inspect.signature(cls)) == str(inspect.signature(twin))
    mine, theirs = cls(3), twin(3)
    assert vars(mine) == vars(theirs) and list(vars(mine)) == list(vars(theirs))
    assert repr(mine) == repr(theirs) and _outcome(hash, mine) == _outcome(hash, theirs)
    assert (mine == cls(4)) == (theirs == twin(4))
    for args, kwargs in _bad_calls(cls, [3]):
        assert _error(cls, args, kwargs) == _error(twin, args, kwargs), (args, kwargs)


def test_record_details() -> None:
    one, two = _Everything(1), _Everything(1)
    assert one.b is not two.b and one.f is not two.f  # a fresh default per instance
    assert one.f == [7] and "g" not in vars(one) and one.g == 5  # read from the class
    assert "c=" not in repr(one)
    assert _Everything(1, d=9) == one and _Everything(1, e=9) != one

    @record
    class Hashed:
        a: int
        e: int = dataclasses.field(default=0, hash=False)

    assert hash(Hashed(1, 2)) == hash(Hashed(1, 3)) == hash((1,)) != hash(Hashed(2, 2))
    with pytest.raises(TypeError, match="unhashable type: 'list'"):
        hash(one)  # b is hashed, as by the stdlib
    assert hash(_Own(1)) == 7 and repr(_Own(1)) == "own" and _Own(1) == _Own(2)
    assert _Posted(4).twice == 8
    itself = _Everything(1, h=None)
    object.__setattr__(itself, "h", itself)
    assert repr(itself).endswith("h=...)")  # a record that holds itself
    assert dataclasses.asdict(_Everything(1))["f"] == [7]
    match _Everything(1, [2]):
        case _Everything(a, b):
            assert (a, b) == (1, [2])

    # A tool's stdlib dataclass may extend a record, as it may a frozen dataclass.
    @dataclasses.dataclass(frozen=True)
    class Extended(_Docless):
        c: int = 3

    assert Extended(1) == Extended(1, "b", 3) and Extended(1).c == 3


def test_record_refuses_what_it_cannot_build() -> None:
    with pytest.raises(TypeError, match="__slots__"):
        @record
        class Slotted:
            __slots__ = ("a",)
            a: int

    with pytest.raises(TypeError, match="inherits"):
        @record
        class Derived(_Docless):
            c: int = 0

    with pytest.raises(TypeError, match="__setattr__"):
        @record
        class Settable:
            a: int

            def __setattr__(self, name: str, value: object) -> None:
                pass

    with pytest.raises(TypeError, match="keyword-only"):
        @record
        class KwOnly:
            a: int = dataclasses.field(kw_only=True)

    with pytest.raises(TypeError, match="pseudo-fields"):
        @record
        class Pseudo:
            a: int
            b: ClassVar[int] = 0

    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
        @record
        class Order:
            a: int = 0
            b: int  # type: ignore[misc]

    with pytest.raises(ValueError, match="mutable default"):
        @record
        class Mutable:
            a: list[int] = []  # noqa: RUF012


def test_record_corners_match_the_stdlib() -> None:
    """Corners a review found: each compared with the stdlib's frozen dataclass."""
    def both(body: str, extra: str = "") -> tuple[dict[str, object], dict[str, object]]:
        made = []
        for decorator in ("record", "dataclasses.dataclass(frozen=True)"):
            ns: dict[str, object] = {"record": record, "dataclasses": dataclasses,
                                     "abc": __import__("abc"), "__name__": "nowhere"}
            # (a module not in sys.modules; compiled without this file's `from __future__
            # import annotations`, with which the stdlib itself fails there)
            code = compile(f"{extra}\n@{decorator}\n{body}", "<corner>", "exec",
                           dont_inherit=True)
            exec(code, ns)
            made.append(ns)
        return made[0], made[1]

    # A field called `self`; a class made where its module is not in sys.modules.
    mine, theirs = both("class R:\n    self: int\n    b: int = 0\n")
    r, t = mine["R"], theirs["R"]
    assert repr(r(self=1)) == repr(t(self=1)) == "R(self=1, b=0)"  # type: ignore[operator]
    assert str(inspect.signature(r)) == str(inspect.signature(t))  # type: ignore[arg-type]
    # An abstract base declaring what the dataclass defines.
    extra = "class Base(abc.ABC):\n    @abc.abstractmethod\n    def __repr__(self): ...\n"
    mine, theirs = both("class R(Base):\n    a: int\n", extra)
    assert repr(mine["R"](1)) == repr(theirs["R"](1)) == "R(a=1)"  # type: ignore[operator]
    # __eq__ written, __hash__ not: both generate the hash.
    mine, theirs = both("class R:\n    a: int\n    def __eq__(self, o): return True\n")
    assert hash(mine["R"](1)) == hash(theirs["R"](1))  # type: ignore[operator]
    # A __post_init__ inherited from a plain base runs.
    extra = "class Base:\n    def __post_init__(self):\n        object.__setattr__(self, 'b', 2)\n"
    mine, theirs = both("class R(Base):\n    a: int\n    b: int = 0\n", extra)
    assert repr(mine["R"](1)) == repr(theirs["R"](1)) == "R(a=1, b=2)"  # type: ignore[operator]

    # A subclass's instance never equals its base's, as with the stdlib's `is` test.
    @dataclasses.dataclass(frozen=True)
    class Sub(_Docless):
        pass

    twin = _twin(_Docless)

    @dataclasses.dataclass(frozen=True)
    class TwinSub(twin):  # type: ignore[valid-type, misc]
        pass

    assert (Sub(1) == _Docless(1), _Docless(1) == Sub(1)) == \
        (TwinSub(1) == twin(1), twin(1) == TwinSub(1)) == (False, False)

    # Nested records show their qualified name, as the stdlib's repr does.
    @record
    class Inner:
        a: int

    assert repr(Inner(1)) == f"{Inner.__qualname__}(a=1)" and "<locals>" in repr(Inner(1))

    # The methods look like the stdlib's: signature, no hints, picklable by name.
    for name in ("__eq__", "__repr__", "__hash__", "__setattr__", "__delattr__"):
        method = getattr(Decision, name)
        assert method.__module__ == Decision.__module__
        assert str(inspect.signature(method)) == str(inspect.signature(getattr(twin, name)))
        assert typing.get_type_hints(method) == {}
        assert pickle.loads(pickle.dumps(method)) is method
