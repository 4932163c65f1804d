"""Records: frozen dataclasses that cost less to define, and less to make by the thousand.

`record` makes a class exactly what `@dataclass(frozen=True)` makes (the same fields,
`__init__` signature and annotations, equality, hashing, repr, frozenness, `fields`,
`replace`, pickling, `__match_args__`) without compiling any source.  On Python 3.11 the
stdlib compiles six generated methods per class, about 1 ms each class: some 60 ms of every
`pvpatch` command, which defines 64 records before it reads a byte.  Here the methods
are closures over the field names, built once per class in microseconds; only their
speed per call differs (an `__init__` binds its arguments in Python), which is why the
few records a run makes by the thousand also take `fast_init`.  tests/test_record.py
holds every record in the package against a stdlib twin.

`fast_init` gives such a hot record an `__init__` that fills the instance's `__dict__`
directly (a `__slots__` class: each slot's descriptor) instead of one
`object.__setattr__` per field: about 2.5 µs for a 16-field record against 0.8 µs on
3.11, and a vmlinux's patch makes some 27,000 sites, decisions, covers and edits.

Only plain records qualify for `fast_init`: every field positional and in `__init__`,
defaults plain values, no `__post_init__` or `__init__` of its own, no ClassVar or InitVar
pseudo-fields.  Anything either decorator cannot build the stdlib's way is refused when
the class is defined, so a record that grows one fails at import, never later.
"""

from __future__ import annotations

import _thread
import abc
import dataclasses
import inspect  # (dataclasses imports it: no start-up cost)
import sys
import types
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")

_MISSING: Any = dataclasses.MISSING


# The default a signature shows for a field with a default factory: the stdlib's own
# marker, so that the signature compares equal to the stdlib's.
_FACTORY: Any = dataclasses._HAS_DEFAULT_FACTORY  # type: ignore[attr-defined]


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def record(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True)`, with methods built as closures instead of compiled."""
    name = cls.__qualname__
    if "__slots__" in cls.__dict__:
        raise TypeError(f"record: {name} declares __slots__ (use the stdlib's dataclass)")
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            raise TypeError(f"record: {name} inherits from the dataclass {base.__qualname__}")
    for method in ("__setattr__", "__delattr__"):
        if method in cls.__dict__:  # the stdlib's frozen dataclass refuses them too
            raise TypeError(f"Cannot overwrite attribute {method} in class {cls.__name__}")
    documented = bool(cls.__doc__)
    if not documented:
        cls.__doc__ = "(set below, once __init__ is in place)"
    class_hash = cls.__dict__.get("__hash__", _MISSING)
    explicit_hash = not (class_hash is _MISSING
                         or (class_hash is None and "__eq__" in cls.__dict__))
    # Fields, defaults, __match_args__ and the checks on them are the stdlib's own; with
    # no method asked for, it compiles nothing.
    dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    params.init = params.repr = params.eq = params.frozen = True
    fields = _plain_fields(cls, "record")
    if any(f.kw_only for f in fields):
        raise TypeError(f"record: {name} has keyword-only fields")
    _set(cls, "__init__", _init(cls, fields))
    _set(cls, "__repr__", _repr([f.name for f in fields if f.repr]))
    compared = _getter([f.name for f in fields if f.compare])
    _set(cls, "__eq__", _eq(compared))
    if not explicit_hash:
        _set(cls, "__hash__", _hash(_getter([f.name for f in fields
                                             if (f.compare if f.hash is None else f.hash)])),
             force=True)
    names = frozenset(f.name for f in fields)
    setattr_, delattr_ = _frozen(cls, names)
    _set(cls, "__setattr__", setattr_, force=True)
    _set(cls, "__delattr__", delattr_, force=True)
    if not documented:
        try:
            text = str(inspect.signature(cls)).replace(" -> None", "")
        except (TypeError, ValueError):
            text = ""
        cls.__doc__ = cls.__name__ + text
    # Methods an abstract base declared (__repr__, __eq__...) are now defined: as the
    # stdlib's dataclass does once it has added its own.
    abc.update_abstractmethods(cls)
    return cls


def _plain_fields(cls: type, who: str) -> tuple[dataclasses.Field[Any], ...]:
    """The dataclass's fields; ClassVar and InitVar pseudo-fields (which __dataclass_fields__
    also holds) are refused."""
    fields: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(cls)
    pseudo = set(cls.__dataclass_fields__) - {f.name for f in fields}  # type: ignore[attr-defined]
    if pseudo:
        raise TypeError(f"{who}: {cls.__qualname__} has ClassVar or InitVar pseudo-fields "
                        f"({', '.join(sorted(pseudo))})")
    return fields


def _module_globals(cls: type) -> dict[str, Any]:
    """The globals the stdlib gives generated methods: the class's module's, or none when
    it is not (yet) in sys.modules (a class made by exec, a plugin loaded by hand)."""
    found = sys.modules.get(cls.__module__)
    return found.__dict__ if found is not None else {}


def _set(cls: type, name: str, fn: Callable[..., Any], *, force: bool = False) -> None:
    """Add a method unless the class body defines it (the stdlib keeps the class's)."""
    if force or name not in cls.__dict__:
        # Named, placed and annotated like the stdlib's generated methods: introspection
        # shows (self, other), and pickle finds a method by module and qualified name.
        fn.__name__ = name
        fn.__qualname__ = f"{cls.__qualname__}.{name}"
        fn.__module__ = cls.__module__
        if name != "__init__":
            fn.__annotations__ = {}
        setattr(cls, name, fn)


def _getter(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """The tuple of the named attributes (attrgetter returns a bare value for one name)."""
    if not names:
        return lambda _self: ()
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda self: (one(self),)
    return attrgetter(*names)


def _eq(values: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any, Any], Any]:
    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented
    return __eq__


def _hash(values: Callable[[Any], tuple[Any, ...]]) -> Callable[[Any], int]:
    def __hash__(self: Any) -> int:
        return hash(values(self))
    return __hash__


def _repr(names: list[str]) -> Callable[[Any], str]:
    running: set[tuple[int, int]] = set()
    getters = [(f"{n}=", attrgetter(n)) for n in names]

    def __repr__(self: Any) -> str:
        key = id(self), _thread.get_ident()
        if key in running:  # a record that holds itself, as reprlib.recursive_repr says
            return "..."
        running.add(key)
        try:
            inner = ", ".join(label + repr(get(self)) for label, get in getters)
        finally:
            running.discard(key)
        return f"{self.__class__.__qualname__}({inner})"
    return __repr__


def _frozen(cls: Any, names: frozenset[str]) -> tuple[Callable[..., None], Callable[..., None]]:
    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)
    return __setattr__, __delattr__


def _init(cls: type, fields: tuple[dataclasses.Field[Any], ...]) -> Callable[..., None]:
    """An `__init__` that binds its arguments as the stdlib's generated one would, with
    the same signature, annotations and error messages, and the module's globals."""
    params = [f for f in fields if f.init]
    seen_default = False
    for f in params:
        if f.default is not _MISSING or f.default_factory is not _MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
    qualname = f"{cls.__qualname__}.__init__"
    positional = tuple(f.name for f in params)
    required = tuple(f.name for f in params
                     if f.default is _MISSING and f.default_factory is _MISSING)
    # What each field gets when its argument is left out: (name, is_factory, value);
    # an init=False field with a plain default is read from the class, as the stdlib does.
    fill: list[tuple[str, bool, Any]] = []
    for f in fields:
        if f.default_factory is not _MISSING:
            fill.append((f.name, True, f.default_factory))
        elif f.init and f.default is not _MISSING:
            fill.append((f.name, False, f.default))
    order = tuple(f.name for f in fields if f.init or f.default_factory is not _MISSING)
    post_init = getattr(cls, "__post_init__", None) is not None
    setter = object.__setattr__

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        values = dict(zip(positional, args, strict=False))
        for key, value in kwargs.items():  # CPython reports keyword errors first
            if key not in positional:
                raise TypeError(f"{qualname}() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{qualname}() got multiple values for argument {key!r}")
            values[key] = value
        if len(args) > len(positional):
            raise TypeError(_too_many(qualname, len(positional), len(required), len(args)))
        missing = [n for n in required if n not in values]
        if missing:
            raise TypeError(_missing(qualname, missing))
        for key, factory, value in fill:
            if key not in values:
                values[key] = value() if factory else value
        return values

    # (the instance positional-only: a field may be called `self`)
    def __init__(instance: Any, /, *args: Any, **kwargs: Any) -> None:
        values = bind(args, kwargs)
        for key in order:
            setter(instance, key, values[key])
        if post_init:
            instance.__post_init__()

    # Rebound to the record's module, so typing.get_type_hints(cls.__init__) resolves the
    # annotations' names there, as it does for the stdlib's generated __init__.
    init = types.FunctionType(__init__.__code__, _module_globals(cls), "__init__", None,
                              __init__.__closure__)
    init.__annotations__ = {**{f.name: f.type for f in params}, "return": None}
    init.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        # A field called `self` makes the stdlib name the instance __dataclass_self__.
        [inspect.Parameter("__dataclass_self__" if "self" in positional else "self",
                           inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation=f.type,
                             default=(_FACTORY if f.default_factory is not _MISSING
                                      else f.default if f.default is not _MISSING
                                      else inspect.Parameter.empty))
           for f in params],
        return_annotation=None)
    return init


def _too_many(qualname: str, most: int, least: int, given: int) -> str:
    """CPython's words for too many positional arguments (self counted)."""
    takes = (f"from {least + 1} to {most + 1} positional arguments" if least < most
             else f"{most + 1} positional argument{'s' if most else ''}")
    return f"{qualname}() takes {takes} but {given + 1} were given"


def _missing(qualname: str, names: list[str]) -> str:
    """CPython's words for missing required arguments."""
    quoted = [repr(n) for n in names]
    if len(quoted) == 1:
        listed = quoted[0]
    elif len(quoted) == 2:
        listed = f"{quoted[0]} and {quoted[1]}"
    else:
        listed = ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
    plural = "s" if len(names) > 1 else ""
    return f"{qualname}() missing {len(names)} required positional argument{plural}: {listed}"


def fast_init(cls: type[T]) -> type[T]:
    """Give the frozen dataclass `cls` an `__init__` that stores its fields directly."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"fast_init: {cls.__qualname__} is not a frozen dataclass")
    init_fn = cls.__dict__.get("__init__")
    if (not params.init or init_fn is None
            or init_fn.__code__.co_filename not in ("<string>", __file__)):
        # (dataclasses keeps an __init__ written in the class body; so would this; the
        # stdlib's generated __init__ comes from "<string>", record's from this file)
        raise TypeError(f"fast_init: {cls.__qualname__}'s __init__ is not the dataclass's")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"fast_init: {cls.__qualname__} has __post_init__")
    slots = "__slots__" in cls.__dict__
    names: list[str] = []
    signature: list[str] = []
    scope: dict[str, Any] = {}
    for f in _plain_fields(cls, "fast_init"):
        if not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"fast_init: {cls.__qualname__}.{f.name} is not a plain "
                            "positional field")
        if f.name.startswith("_"):  # the generated names (_fields, _set_*) are private
            raise TypeError(f"fast_init: {cls.__qualname__}.{f.name}: a private name")
        names.append(f.name)
        if f.default is dataclasses.MISSING:
            signature.append(f.name)
        else:
            scope[f"_default_{f.name}"] = f.default
            signature.append(f"{f.name}=_default_{f.name}")
    if slots:
        # A slot's member descriptor sets it without the class's refusing __setattr__.
        for name in names:
            scope[f"_set_{name}"] = cls.__dict__[name].__set__
        body = [f"_set_{n}(self, {n})" for n in names] or ["pass"]
    else:
        body = ["_fields = self.__dict__", *(f"_fields[{n!r}] = {n}" for n in names)]
    # As dataclasses does: the helpers are closure cells and the globals the module's own,
    # so typing.get_type_hints(cls.__init__) resolves the annotations' names there.
    source = (f"def __create_fn__({', '.join(scope)}):\n"
              f"  def __init__(self, {', '.join(signature)}):\n"
              + "".join(f"    {line}\n" for line in body) + "  return __init__\n")
    made: dict[str, Any] = {}
    exec(source, _module_globals(cls), made)  # generated from field names
    init = made["__create_fn__"](**scope)
    init.__qualname__ = init_fn.__qualname__
    init.__annotations__ = dict(init_fn.__annotations__)
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
