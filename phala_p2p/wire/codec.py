"""One versioned msgpack codec for frozen dataclass messages.

A message is a frozen dataclass registered under a numeric kind::

    @message(110)
    @dataclass(frozen=True)
    class Tx:
        sender: bytes = field(metadata={"max_len": 32})
        nonce: int = field(metadata={"min": 0})

Its wire form is the msgpack array ``[WIRE_VERSION, kind, [field values in declaration
order]]``; a nested message is the bare array of its field values (its type is known from the
annotation). The layout, the supported types and the canonical form are specified in
``protocols/README.md``.

``decode`` is the one boundary for untrusted bytes: it checks the size first, then the
version, the kind, the field count and every field's type and bounds, builds the object from
checked values only (never ``cls(**untrusted)``), runs the class's ``validate()`` if it has
one, and accepts only the canonical encoding (the bytes ``encode`` would produce). Whatever
is wrong with the input, it raises ``ProtocolViolation`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

import msgpack

from phala_p2p.errors import ProtocolViolation, UsageError

T = TypeVar("T")

WIRE_VERSION = 1
DEFAULT_MAX_SIZE = 1 << 20
MAX_KIND = 0xFFFF
MAX_DEPTH = 32
"""Deepest nesting of messages and containers that ``decode`` follows."""

INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1

_KINDS: dict[int, type[Any]] = {}
_CLASSES: dict[type[Any], int] = {}
_SPECS: dict[type[Any], _Spec] = {}


class _Bad(Exception):
    """A field value that does not match its declared type (internal to this module)."""


class _Pairs:
    """A msgpack map as decoded: its (key, value) pairs in wire order, duplicates kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs


Decoder = Callable[[Any, int], Any]
Encoder = Callable[[Any, int], Any]


@dataclasses.dataclass(frozen=True)
class _Spec:
    cls: type[Any]
    kind: int
    names: tuple[str, ...]
    decoders: tuple[Decoder, ...]
    encoders: tuple[Encoder, ...]
    validate: Callable[[Any], None] | None


# -- registration ---------------------------------------------------------------------------


def message(kind: int) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a frozen dataclass as a wire message under ``kind``."""
    if type(kind) is not int or not 1 <= kind <= MAX_KIND:
        raise UsageError(f"message kind must be an int in 1..{MAX_KIND}, not {kind!r}")

    def register(cls: type[T]) -> type[T]:
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise UsageError(f"@message({kind}) goes above @dataclass(frozen=True)")
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise UsageError(f"message {cls.__qualname__} must be a frozen dataclass")
        if any(not f.init for f in dataclasses.fields(cls)):
            raise UsageError(f"message {cls.__qualname__} has a field with init=False")
        existing = _KINDS.get(kind)
        if existing is not None and not _same_class(existing, cls):
            raise UsageError(
                f"message kind {kind} is already taken by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        if cls in _CLASSES:
            raise UsageError(f"message {cls.__qualname__} is already registered")
        if existing is not None:  # the same class defined again (module reload)
            del _CLASSES[existing]
            _SPECS.pop(existing, None)
        _KINDS[kind] = cls
        _CLASSES[cls] = kind
        return cls

    return register


def _same_class(a: type[Any], b: type[Any]) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def kind_of(cls_or_msg: object) -> int:
    """The kind a message class (or an instance of one) is registered under."""
    cls = cls_or_msg if isinstance(cls_or_msg, type) else type(cls_or_msg)
    try:
        return _CLASSES[cls]
    except KeyError:
        raise UsageError(f"{cls.__qualname__} is not a registered message") from None


def message_class(kind: int) -> type[Any]:
    """The class registered under ``kind`` (UsageError if none)."""
    try:
        return _KINDS[kind]
    except (KeyError, TypeError):
        raise UsageError(f"no message is registered under kind {kind!r}") from None


def registered_messages() -> dict[int, type[Any]]:
    """A copy of the registry: kind -> message class."""
    return dict(_KINDS)


# -- compiling a class's field converters ---------------------------------------------------


def _spec(cls: type[Any]) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _compile(cls)
        _SPECS[cls] = spec
    return spec


def _compile(cls: type[Any]) -> _Spec:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, AttributeError, TypeError) as err:  # an annotation that does not resolve
        raise UsageError(f"cannot resolve the annotations of {cls.__qualname__}: {err}") from err
    names: list[str] = []
    decoders: list[Decoder] = []
    encoders: list[Encoder] = []
    for f in dataclasses.fields(cls):
        where = f"{cls.__qualname__}.{f.name}"
        dec, enc = _converters(hints[f.name], dict(f.metadata), where)
        names.append(f.name)
        decoders.append(dec)
        encoders.append(enc)
    validate = getattr(cls, "validate", None)
    return _Spec(
        cls=cls,
        kind=_CLASSES[cls],
        names=tuple(names),
        decoders=tuple(decoders),
        encoders=tuple(encoders),
        validate=validate if callable(validate) else None,
    )


def _bounds(meta: Mapping[str, Any], where: str, *, allow: set[str]) -> None:
    for key in ("max_len", "min", "max", "item_max_len"):
        if key in meta and key not in allow:
            raise UsageError(f"{where}: metadata {key!r} does not apply to this type")
        if key in meta and type(meta[key]) is not int:
            raise UsageError(f"{where}: metadata {key!r} must be an int")


def _item_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata handed to a container's items: ``item_max_len`` becomes their ``max_len``."""
    out = {k: v for k, v in meta.items() if k in ("min", "max")}
    if "item_max_len" in meta:
        out["max_len"] = meta["item_max_len"]
    return out


def _converters(hint: Any, meta: dict[str, Any], where: str) -> tuple[Decoder, Encoder]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if origin is typing.Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1 or len(args) != 2:
            raise UsageError(f"{where}: only `X | None` unions are supported, not {hint}")
        inner_dec, inner_enc = _converters(others[0], meta, where)

        def dec_opt(v: Any, depth: int) -> Any:
            return None if v is None else inner_dec(v, depth)

        def enc_opt(v: Any, depth: int) -> Any:
            return None if v is None else inner_enc(v, depth)

        return dec_opt, enc_opt

    if origin in (list, tuple, dict):
        return _container_converters(hint, origin, args, meta, where)

    if not isinstance(hint, type):
        raise UsageError(f"{where}: unsupported type {hint!r}")
    if issubclass(hint, enum.Enum):
        return _enum_converters(hint, meta, where)
    if hint is bool:
        _bounds(meta, where, allow=set())
        return _dec_bool, _enc_bool
    if hint is int:
        return _int_converters(meta, where)
    if hint is float:
        _bounds(meta, where, allow=set())
        return _dec_float, _enc_float
    if hint is str:
        _bounds(meta, where, allow={"max_len"})
        return _str_converters(meta.get("max_len"))
    if hint is bytes:
        _bounds(meta, where, allow={"max_len"})
        return _bytes_converters(meta.get("max_len"))
    if dataclasses.is_dataclass(hint):
        if hint not in _CLASSES:
            raise UsageError(f"{where}: {hint.__qualname__} is not a registered message")
        _bounds(meta, where, allow=set())
        return _nested_converters(hint)
    raise UsageError(f"{where}: unsupported type {hint!r}")


def _dec_bool(v: Any, depth: int) -> Any:
    if v is True or v is False:
        return v
    raise _Bad(f"expected bool, got {type(v).__name__}")


def _enc_bool(v: Any, depth: int) -> Any:
    if v is True or v is False:
        return v
    raise _Bad(f"expected bool, got {type(v).__name__}")


def _dec_float(v: Any, depth: int) -> Any:
    if type(v) is float and math.isfinite(v):
        return v
    raise _Bad("expected a finite float")


def _enc_float(v: Any, depth: int) -> Any:
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    raise _Bad("expected a finite float")


def _int_converters(meta: Mapping[str, Any], where: str) -> tuple[Decoder, Encoder]:
    _bounds(meta, where, allow={"min", "max"})
    lo = max(INT_MIN, meta.get("min", INT_MIN))
    hi = min(INT_MAX, meta.get("max", INT_MAX))
    if lo > hi:
        raise UsageError(f"{where}: min is above max")

    def dec_int(v: Any, depth: int) -> Any:
        if type(v) is int and lo <= v <= hi:
            return v
        if type(v) is int:
            raise _Bad(f"int {v} outside [{lo}, {hi}]")
        raise _Bad(f"expected int, got {type(v).__name__}")

    def enc_int(v: Any, depth: int) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
            return int(v)
        raise _Bad(f"expected an int in [{lo}, {hi}], got {v!r}")

    return dec_int, enc_int


def _str_converters(max_len: int | None) -> tuple[Decoder, Encoder]:
    limit = max_len if max_len is not None else INT_MAX

    def dec_str(v: Any, depth: int) -> Any:
        if type(v) is str and len(v) <= limit:
            return v
        if type(v) is str:
            raise _Bad(f"string longer than {limit}")
        raise _Bad(f"expected str, got {type(v).__name__}")

    def enc_str(v: Any, depth: int) -> Any:
        if not isinstance(v, str) or len(v) > limit:
            raise _Bad(f"expected a str of at most {limit} characters")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _Bad("string is not encodable as UTF-8") from err
        return str(v)

    return dec_str, enc_str


def _bytes_converters(max_len: int | None) -> tuple[Decoder, Encoder]:
    limit = max_len if max_len is not None else INT_MAX

    def dec_bytes(v: Any, depth: int) -> Any:
        if type(v) is bytes and len(v) <= limit:
            return v
        if type(v) is bytes:
            raise _Bad(f"bytes longer than {limit}")
        raise _Bad(f"expected bytes, got {type(v).__name__}")

    def enc_bytes(v: Any, depth: int) -> Any:
        if isinstance(v, bytes | bytearray | memoryview):
            b = bytes(v)
            if len(b) <= limit:
                return b
        raise _Bad(f"expected bytes of at most {limit} bytes")

    return dec_bytes, enc_bytes


def _enum_converters(
    hint: type[enum.Enum], meta: Mapping[str, Any], where: str
) -> tuple[Decoder, Encoder]:
    _bounds(meta, where, allow=set())
    if issubclass(hint, enum.IntEnum):
        base: type = int
    elif issubclass(hint, enum.StrEnum):
        base = str
    else:
        raise UsageError(f"{where}: only IntEnum and StrEnum enums are supported")
    members = dict(hint._value2member_map_)

    def dec_enum(v: Any, depth: int) -> Any:
        if type(v) is base:
            member = members.get(v)
            if member is not None:
                return member
        raise _Bad(f"not a {hint.__name__} value: {v!r}")

    def enc_enum(v: Any, depth: int) -> Any:
        if isinstance(v, hint):
            return base(v.value)
        if type(v) is base and v in members:
            return v
        raise _Bad(f"expected a {hint.__name__}, got {v!r}")

    return dec_enum, enc_enum


def _container_converters(
    hint: Any, origin: Any, args: tuple[Any, ...], meta: Mapping[str, Any], where: str
) -> tuple[Decoder, Encoder]:
    _bounds(meta, where, allow={"max_len", "item_max_len", "min", "max"})
    limit = meta.get("max_len", INT_MAX)
    items = _item_meta(meta)

    if origin is dict:
        if len(args) != 2 or args[0] not in (str, bytes, int):
            raise UsageError(f"{where}: dict keys must be str, bytes or int, in {hint}")
        key_dec, key_enc = _converters(args[0], {}, where)
        val_dec, val_enc = _converters(args[1], items, where)

        def dec_dict(v: Any, depth: int) -> Any:
            if type(v) is not _Pairs:
                raise _Bad("expected a map")
            if len(v.pairs) > limit:
                raise _Bad(f"map with more than {limit} entries")
            out = {key_dec(k, depth): val_dec(x, depth + 1) for k, x in v.pairs}
            if len(out) != len(v.pairs):
                raise _Bad("map has duplicate keys")
            return out

        def enc_dict(v: Any, depth: int) -> Any:
            if not isinstance(v, Mapping) or len(v) > limit:
                raise _Bad(f"expected a mapping of at most {limit} entries")
            pairs = sorted((key_enc(k, depth), x) for k, x in v.items())
            return {k: val_enc(x, depth + 1) for k, x in pairs}

        return dec_dict, enc_dict

    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if not args or Ellipsis in args:
            raise UsageError(f"{where}: unsupported tuple type {hint}")
        fixed = [_converters(a, items, where) for a in args]
        n = len(fixed)

        def dec_fixed(v: Any, depth: int) -> Any:
            if type(v) is not list or len(v) != n:
                raise _Bad(f"expected an array of {n} items")
            return tuple(d(x, depth + 1) for (d, _), x in zip(fixed, v, strict=True))

        def enc_fixed(v: Any, depth: int) -> Any:
            if not isinstance(v, tuple | list) or len(v) != n:
                raise _Bad(f"expected a tuple of {n} items")
            return [e(x, depth + 1) for (_, e), x in zip(fixed, v, strict=True)]

        return dec_fixed, enc_fixed

    if len(args) < 1:
        raise UsageError(f"{where}: give the item type, as in list[int] or tuple[int, ...]")
    item_dec, item_enc = _converters(args[0], items, where)
    make: Callable[[Any], Any] = tuple if origin is tuple else list

    def dec_seq(v: Any, depth: int) -> Any:
        if type(v) is not list:
            raise _Bad("expected an array")
        if len(v) > limit:
            raise _Bad(f"array longer than {limit}")
        d = depth + 1
        return make([item_dec(x, d) for x in v])

    def enc_seq(v: Any, depth: int) -> Any:
        if not isinstance(v, list | tuple) or len(v) > limit:
            raise _Bad(f"expected a list or tuple of at most {limit} items")
        d = depth + 1
        return [item_enc(x, d) for x in v]

    return dec_seq, enc_seq


def _nested_converters(cls: type[Any]) -> tuple[Decoder, Encoder]:
    # Looked up at call time, so a message may refer to one registered after it.
    def dec_nested(v: Any, depth: int) -> Any:
        return _build(_spec(cls), v, depth + 1)

    def enc_nested(v: Any, depth: int) -> Any:
        if type(v) is not cls:
            raise _Bad(f"expected a {cls.__qualname__}, got {type(v).__name__}")
        return _fields_of(_spec(cls), v, depth + 1)

    return dec_nested, enc_nested


# -- building and flattening messages --------------------------------------------------------


def _build(spec: _Spec, values: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _Bad(f"nested deeper than {MAX_DEPTH}")
    if type(values) is not list:
        raise _Bad(f"{spec.cls.__qualname__}: expected an array of fields")
    if len(values) != len(spec.names):
        raise _Bad(f"{spec.cls.__qualname__}: expected {len(spec.names)} fields, got {len(values)}")
    kwargs: dict[str, Any] = {}
    for name, dec, v in zip(spec.names, spec.decoders, values, strict=True):
        try:
            kwargs[name] = dec(v, depth)
        except _Bad as err:
            raise _Bad(f"{spec.cls.__qualname__}.{name}: {err}") from None
    try:
        obj = spec.cls(**kwargs)
    except ProtocolViolation:
        raise
    except ValueError as err:  # __post_init__ checks (UsageError is a ValueError)
        raise _Bad(f"{spec.cls.__qualname__}: {err}") from err
    if spec.validate is not None:
        spec.validate(obj)
    return obj


def _fields_of(spec: _Spec, msg: Any, depth: int) -> list[Any]:
    if depth > MAX_DEPTH:
        raise _Bad(f"nested deeper than {MAX_DEPTH}")
    out = []
    for name, enc in zip(spec.names, spec.encoders, strict=True):
        try:
            out.append(enc(getattr(msg, name), depth))
        except _Bad as err:
            raise _Bad(f"{spec.cls.__qualname__}.{name}: {err}") from None
    return out


# -- public encode / decode -----------------------------------------------------------------


def encode(msg: object) -> bytes:
    """The wire bytes of a registered message (UsageError if it is not one, or a field's
    value does not match its declared type and bounds)."""
    cls = type(msg)
    if cls not in _CLASSES:
        raise UsageError(f"{cls.__qualname__} is not a registered message")
    spec = _spec(cls)
    try:
        fields = _fields_of(spec, msg, 0)
    except _Bad as err:
        raise UsageError(f"cannot encode: {err}") from None
    return _pack([WIRE_VERSION, spec.kind, fields])


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def unpack_untrusted(data: bytes, max_size: int) -> Any:
    """msgpack-decode untrusted bytes with every length capped by ``max_size``.

    Maps come back as ``_Pairs`` (callers of this module's internals only), any msgpack
    failure as ProtocolViolation("malformed").
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            object_pairs_hook=_Pairs,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size // 2,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as err:
        raise ProtocolViolation(f"not valid msgpack: {err}", reason="malformed") from err


@overload
def decode(data: bytes, *, max_size: int = ..., expect: type[T]) -> T: ...


@overload
def decode(data: bytes, *, max_size: int = ..., expect: None = ...) -> Any: ...


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, expect: type[T] | None = None) -> Any:
    """The message encoded in ``data``; ProtocolViolation on any bad input.

    ``expect`` restricts the accepted kind to that class's. Reasons: ``too_large``,
    ``malformed``, ``bad_version``, ``unknown_kind``, ``bad_field``, or the reason raised by
    the class's ``validate()``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError("decode takes bytes")
    if type(max_size) is not int or max_size < 1:
        raise UsageError("max_size must be a positive int")
    if expect is not None and expect not in _CLASSES:
        raise UsageError(f"{getattr(expect, '__qualname__', expect)} is not a registered message")
    data = bytes(data)
    if len(data) > max_size:
        raise ProtocolViolation(
            f"message of {len(data)} bytes exceeds the limit of {max_size}", reason="too_large"
        )
    top = unpack_untrusted(data, max_size)
    if type(top) is not list or not top:
        raise ProtocolViolation("a message is an array [version, kind, fields]")
    version = top[0]
    if type(version) is not int or version != WIRE_VERSION:
        raise ProtocolViolation(f"unsupported wire version {version!r}", reason="bad_version")
    if len(top) != 3:
        raise ProtocolViolation("a message is an array [version, kind, fields]")
    kind = top[1]
    cls = _KINDS.get(kind) if type(kind) is int else None
    if cls is None:
        raise ProtocolViolation(f"unknown message kind {kind!r}", reason="unknown_kind")
    if expect is not None and cls is not expect:
        raise ProtocolViolation(
            f"expected a {expect.__qualname__}, got kind {kind} ({cls.__qualname__})",
            reason="unknown_kind",
        )
    try:
        obj = _build(_spec(cls), top[2], 0)
    except _Bad as err:
        raise ProtocolViolation(str(err), reason="bad_field") from None
    try:
        canonical = _pack([WIRE_VERSION, kind, _fields_of(_spec(cls), obj, 0)])
    except _Bad as err:
        raise ProtocolViolation(f"decoded value does not re-encode: {err}") from None
    if canonical != data:
        raise ProtocolViolation("non-canonical encoding", reason="malformed")
    return obj


__all__ = [
    "DEFAULT_MAX_SIZE",
    "INT_MAX",
    "INT_MIN",
    "MAX_DEPTH",
    "MAX_KIND",
    "WIRE_VERSION",
    "decode",
    "encode",
    "kind_of",
    "message",
    "message_class",
    "registered_messages",
]
