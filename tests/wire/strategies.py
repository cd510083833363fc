"""Hypothesis strategies derived from a registered message's annotations and bounds."""

from __future__ import annotations

import dataclasses
import enum
import sys
import types
import typing
from typing import Any

from hypothesis import strategies as st

from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import INT_MAX, INT_MIN, kind_of

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


def _is_message(cls: Any) -> bool:
    try:
        kind_of(cls)
    except Exception:
        return False
    return isinstance(cls, type)


def module_words(cls: type[Any]) -> tuple[str, ...]:
    """Strings named by the class's module (such as a set of allowed values), so that
    classes whose ``__post_init__`` accepts only some strings get valid examples too."""
    found: set[str] = set()
    for value in vars(sys.modules[cls.__module__]).values():
        if isinstance(value, str) and len(value) <= 32:
            found.add(value)
        elif isinstance(value, frozenset | set | tuple | list):
            found.update(v for v in value if isinstance(v, str) and len(v) <= 32)
        elif isinstance(value, dict):
            found.update(v for v in value if isinstance(v, str) and len(v) <= 32)
    return tuple(sorted(found))


def for_type(
    hint: Any, meta: dict[str, Any], depth: int, words: tuple[str, ...] = ()
) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        inner = next(a for a in args if a is not type(None))
        return st.none() | for_type(inner, meta, depth, words)
    item_meta = {k: v for k, v in meta.items() if k in ("min", "max")}
    if "item_max_len" in meta:
        item_meta["max_len"] = meta["item_max_len"]
    limit = min(meta.get("max_len", 3), 3) if depth < 4 else 0
    if origin is dict:
        return st.dictionaries(
            for_type(args[0], {}, depth, words),
            for_type(args[1], item_meta, depth + 1, words),
            max_size=limit,
        )
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return st.tuples(*(for_type(a, item_meta, depth + 1, words) for a in args))
    if origin in (list, tuple):
        items = st.lists(for_type(args[0], item_meta, depth + 1, words), max_size=limit)
        return items.map(tuple) if origin is tuple else items
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(list(hint))
    if hint is bool:
        return st.booleans()
    if hint is int:
        lo = max(INT_MIN, meta.get("min", INT_MIN))
        hi = min(INT_MAX, meta.get("max", INT_MAX))
        small = st.integers(max(lo, -1), min(hi, 3)) if max(lo, -1) <= min(hi, 3) else st.nothing()
        return small | st.integers(lo, hi)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if hint is str:
        n = meta.get("max_len")
        known = st.sampled_from(words) if words else st.nothing()
        text = known | TEXT
        if n is None:
            return text
        most: int = n

        def short_enough(s: str) -> bool:
            return len(s) <= most

        return text.filter(short_enough)
    if hint is bytes:
        n = meta.get("max_len")
        if n is None:
            return st.binary(max_size=40)
        # Mostly exactly max_len: many fields are fixed-size keys, hashes and signatures.
        exact = st.binary(min_size=min(n, 64), max_size=min(n, 64))
        short = st.binary(max_size=min(n, 8))
        return st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]).flatmap(
            lambda i: short if i == 0 else exact
        )
    if _is_message(hint):
        if depth > 4:
            return st.nothing()
        return st.deferred(lambda: for_message(hint, depth + 1))
    raise AssertionError(f"no strategy for {hint!r}")


_FIELDS: dict[tuple[type[Any], int], tuple[tuple[str, Any], ...]] = {}


def _field_strategies(cls: type[Any], depth: int) -> tuple[tuple[str, Any], ...]:
    cached = _FIELDS.get((cls, depth))
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    words = module_words(cls)
    result = tuple(
        (f.name, for_type(hints[f.name], dict(f.metadata), depth, words))
        for f in dataclasses.fields(cls)
    )
    _FIELDS[(cls, depth)] = result
    return result


@st.composite
def _build(draw: st.DrawFn, cls: type[Any], depth: int) -> Any:
    kwargs = {name: draw(strategy) for name, strategy in _field_strategies(cls, depth)}
    try:
        return cls(**kwargs)
    except ValueError:  # the class's own __post_init__ refuses these values
        from hypothesis import reject

        reject()


def for_message(cls: type[Any], depth: int = 0) -> st.SearchStrategy[Any]:
    return _build(cls, depth)


def locally_invalid(obj: Any) -> bool:
    """True if ``obj`` or anything nested in it fails its own ``validate()``."""

    def walk(value: Any) -> bool:
        if isinstance(value, list | tuple):
            return any(walk(v) for v in value)
        if isinstance(value, dict):
            return any(walk(v) for v in value.values())
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if any(walk(getattr(value, f.name)) for f in dataclasses.fields(value)):
                return True
            validate = getattr(value, "validate", None)
            if validate is not None:
                try:
                    validate()
                except ProtocolViolation:
                    return True
        return False

    return walk(obj)
