"""The message codec: round trips, strict decoding, canonical form, typed errors only."""

from __future__ import annotations

import ast
import importlib
import math
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.wire import codec
from phala_p2p.wire.codec import (
    DEFAULT_MAX_SIZE,
    MAX_DEPTH,
    WIRE_VERSION,
    decode,
    encode,
    kind_of,
    message,
    message_class,
    registered_messages,
)

from .strategies import for_message, locally_invalid

PACKAGE = Path(codec.__file__).resolve().parents[1]


class Color(IntEnum):
    RED = 1
    GREEN = 2


class Mode(StrEnum):
    FAST = "fast"
    SLOW = "slow"


@message(65001)
@dataclass(frozen=True)
class Inner:
    a: int = field(metadata={"min": 0, "max": 1000})
    b: bytes = field(metadata={"max_len": 8})


@message(65002)
@dataclass(frozen=True)
class Everything:
    i: int
    flag: bool
    s: str = field(metadata={"max_len": 16})
    raw: bytes
    ratio: float
    maybe: int | None
    names: list[str] = field(metadata={"max_len": 4, "item_max_len": 5})
    pairs: tuple[Inner, ...] = field(metadata={"max_len": 3})
    by_str: dict[str, int]
    by_bytes: dict[bytes, Inner | None]
    by_int: dict[int, list[bytes]]
    fixed: tuple[int, str]
    color: Color
    mode: Mode
    inner: Inner
    maybe_inner: Inner | None


@message(65003)
@dataclass(frozen=True)
class Range:
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < -100:
            raise UsageError("lo below -100")

    def validate(self) -> None:
        if self.lo > self.hi:
            raise ProtocolViolation("empty range", reason="invalid")


@message(65004)
@dataclass(frozen=True)
class Tree:
    label: int
    children: tuple[Tree, ...]


@message(65005)
@dataclass(frozen=True)
class Holder:
    range: Range


def sample() -> Everything:
    return Everything(
        i=-5,
        flag=True,
        s="héllo",
        raw=b"\x00\xff",
        ratio=0.5,
        maybe=None,
        names=["a", "bc"],
        pairs=(Inner(1, b"x"), Inner(2, b"")),
        by_str={"b": 2, "a": 1},
        by_bytes={b"k": Inner(3, b"y"), b"": None},
        by_int={7: [b"q"], -1: []},
        fixed=(9, "z"),
        color=Color.GREEN,
        mode=Mode.SLOW,
        inner=Inner(0, b"12345678"),
        maybe_inner=Inner(1000, b""),
    )


def wire(kind: int, fields: list[Any], version: int = WIRE_VERSION) -> bytes:
    packed: bytes = msgpack.packb([version, kind, fields], use_bin_type=True)
    return packed


def reason_of(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(ProtocolViolation) as info:
        decode(data, **kwargs)
    return info.value.reason


def import_message_modules() -> list[str]:
    """Import every module of the package that registers messages."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "@message(" in path.read_text(encoding="utf-8") and path.name != "codec.py":
            rel = path.relative_to(PACKAGE.parent).with_suffix("")
            names.append(".".join(rel.parts))
    for name in names:
        importlib.import_module(name)
    return names


import_message_modules()
ALL_KINDS = sorted(registered_messages())


# -- round trips ----------------------------------------------------------------------------


def test_sample_round_trips_with_exact_types() -> None:
    msg = sample()
    out = decode(encode(msg), expect=Everything)
    assert out == msg
    assert type(out.names) is list
    assert type(out.pairs) is tuple
    assert type(out.fixed) is tuple
    assert type(out.color) is Color
    assert type(out.mode) is Mode
    assert type(out.inner) is Inner


def test_layout_is_version_kind_fields() -> None:
    data = encode(Inner(5, b"ab"))
    assert msgpack.unpackb(data) == [WIRE_VERSION, 65001, [5, b"ab"]]
    assert data == b"\x93\x01\xcd\xfd\xe9\x92\x05\xc4\x02ab"


def test_nested_message_is_its_bare_field_array() -> None:
    data = encode(Holder(Range(1, 2)))
    assert msgpack.unpackb(data) == [WIRE_VERSION, 65005, [[1, 2]]]


def test_maps_are_written_with_sorted_keys() -> None:
    a = Everything(**{**sample().__dict__, "by_str": {"b": 2, "a": 1}})
    b = Everything(**{**sample().__dict__, "by_str": {"a": 1, "b": 2}})
    assert encode(a) == encode(b)


@settings(max_examples=100)
@given(for_message(Everything))
def test_every_value_of_every_supported_type_round_trips(msg: Everything) -> None:
    assert decode(encode(msg), expect=Everything) == msg


@settings(max_examples=40)
@given(for_message(Tree))
def test_recursive_message_round_trips(msg: Tree) -> None:
    assert decode(encode(msg)) == msg


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: message_class(k).__qualname__)
@settings(max_examples=30, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_every_registered_message_round_trips(kind: int, data: st.DataObject) -> None:
    """Valid messages come back equal; invalid ones are refused by decode as by validate()."""
    cls = message_class(kind)
    msg = data.draw(for_message(cls))
    encoded = encode(msg)
    if locally_invalid(msg):
        with pytest.raises(ProtocolViolation):
            decode(encoded, expect=cls)
    else:
        assert decode(encoded, expect=cls) == msg


def test_registry_includes_other_rooms_messages() -> None:
    # The round-trip test above is only as good as the registry it iterates over.
    names = import_message_modules()
    assert names, "no module registers messages"
    assert len(ALL_KINDS) > 5


# -- strict decoding ------------------------------------------------------------------------


def test_size_is_checked_before_parsing() -> None:
    data = encode(sample())
    assert reason_of(data, max_size=len(data) - 1) == "too_large"
    assert decode(data, max_size=len(data)) == sample()
    # even garbage is reported as too large, not malformed: nothing was parsed
    assert reason_of(b"\xc1" * (DEFAULT_MAX_SIZE + 1)) == "too_large"


def test_version_and_kind() -> None:
    fields = [1, b"x"]
    assert reason_of(wire(65001, fields, version=2)) == "bad_version"
    assert reason_of(msgpack.packb([2, 65001])) == "bad_version"  # version first, then arity
    assert reason_of(wire(64999, fields)) == "unknown_kind"
    assert reason_of(wire(65001, fields), expect=Range) == "unknown_kind"
    assert reason_of(msgpack.packb([1, "65001", fields])) == "unknown_kind"
    assert reason_of(msgpack.packb([1, 65001])) == "malformed"
    assert reason_of(msgpack.packb([1, 65001, fields, 0])) == "malformed"
    assert reason_of(msgpack.packb({"v": 1})) == "malformed"
    assert reason_of(b"") == "malformed"


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([1], "field count"),
        ([1, b"x", 3], "field count"),
        ([True, b"x"], "bool is not an int"),
        ([1.0, b"x"], "float is not an int"),
        ([-1, b"x"], "below min"),
        ([1001, b"x"], "above max"),
        ([1, "x"], "str is not bytes"),
        ([1, b"123456789"], "over max_len"),
        ([1, None], "nil is not bytes"),
        ({"a": 1}, "fields as a map"),
    ],
)
def test_bad_fields_are_refused(fields: Any, why: str) -> None:
    assert reason_of(wire(65001, fields)) == "bad_field", why


def test_bad_nested_and_container_values() -> None:
    good = encode(sample())
    fields = msgpack.unpackb(good, strict_map_key=False)[2]

    def with_field(index: int, value: Any) -> bytes:
        copy = list(fields)
        copy[index] = value
        return wire(65002, copy)

    assert reason_of(with_field(6, ["a", "b", "c", "d", "e"])) == "bad_field"  # list max_len
    assert reason_of(with_field(6, ["abcdef"])) == "bad_field"  # item_max_len
    assert reason_of(with_field(7, [[1, b""]] * 4)) == "bad_field"  # tuple max_len
    assert reason_of(with_field(7, [[1]])) == "bad_field"  # nested field count
    assert reason_of(with_field(11, [1, "a", 2])) == "bad_field"  # fixed tuple arity
    assert reason_of(with_field(12, 3)) == "bad_field"  # no such enum member
    assert reason_of(with_field(12, "1")) == "bad_field"
    assert reason_of(with_field(13, "medium")) == "bad_field"
    assert reason_of(with_field(8, {1: 1})) == "bad_field"  # wrong key type
    assert reason_of(with_field(8, [["a", 1]])) == "bad_field"  # array is not a map
    assert reason_of(with_field(4, math.nan)) == "bad_field"
    assert reason_of(with_field(4, math.inf)) == "bad_field"
    assert reason_of(with_field(4, 1)) == "bad_field"  # int is not a float


def test_duplicate_map_keys_are_refused() -> None:
    # {"a": 1, "a": 1} written by hand: msgpack libraries would silently keep one
    fields = msgpack.unpackb(encode(sample()), strict_map_key=False)[2]
    head = b"\x93\x01\xcd\xfd\xea\xdc\x00\x10"
    parts = [msgpack.packb(v, use_bin_type=True) for v in fields]
    parts[8] = b"\x82\xa1a\x01\xa1a\x01"
    assert reason_of(head + b"".join(parts)) == "bad_field"
    parts[8] = b"\x82\xa1b\x02\xa1a\x01"  # unsorted keys: valid values, non-canonical form
    assert reason_of(head + b"".join(parts)) == "malformed"
    parts[8] = msgpack.packb({"a": 1, "b": 2})
    assert decode(head + b"".join(parts)) == sample()


def test_non_canonical_encodings_are_refused() -> None:
    canonical = wire(65001, [5, b"ab"])
    assert decode(canonical) == Inner(5, b"ab")
    uint64_five = b"\x93\x01\xcd\xfd\xe9\x92\xcf" + (5).to_bytes(8, "big") + b"\xc4\x02ab"
    assert reason_of(uint64_five) == "malformed"
    bin16 = b"\x93\x01\xcd\xfd\xe9\x92\x05\xc5\x00\x02ab"
    assert reason_of(bin16) == "malformed"
    fields = msgpack.unpackb(encode(sample()), strict_map_key=False)[2]
    parts = [msgpack.packb(v, use_bin_type=True) for v in fields]
    parts[4] = b"\xca" + struct.pack(">f", 0.5)  # float 32 holding the same value
    assert reason_of(b"\x93\x01\xcd\xfd\xea\xdc\x00\x10" + b"".join(parts)) == "malformed"
    assert reason_of(canonical + b"\x00") == "malformed"  # trailing bytes
    assert reason_of(canonical[:-1]) == "malformed"


def test_post_init_and_validate_run_on_decode() -> None:
    assert decode(wire(65003, [1, 2])) == Range(1, 2)
    assert reason_of(wire(65003, [3, 2])) == "invalid"  # validate()
    assert reason_of(wire(65005, [[3, 2]])) == "invalid"  # validate() of a nested message
    assert reason_of(wire(65003, [-101, 2])) == "bad_field"  # __post_init__ UsageError
    # encode does not run validate(): that is the sender's business
    assert decode(encode(Range(1, 1))) == Range(1, 1)


def test_nesting_depth_is_bounded() -> None:
    def chain(levels: int) -> Tree:
        tree = Tree(0, ())
        for i in range(1, levels):
            tree = Tree(i, (tree,))
        return tree

    deepest = max(n for n in range(1, 2 * MAX_DEPTH) if _encodes(chain(n)))
    assert deepest >= MAX_DEPTH // 2  # each Tree level is a message and a tuple
    ok = chain(deepest)
    assert decode(encode(ok)) == ok
    # one level more, written by hand: the decoder refuses it as the encoder does
    inner = msgpack.unpackb(encode(ok))[2]
    assert reason_of(wire(65004, [deepest, [inner]])) == "bad_field"
    assert reason_of(b"\x91" * 100_000) == "malformed"  # msgpack's own stack limit


def _encodes(msg: object) -> bool:
    try:
        encode(msg)
    except UsageError:
        return False
    return True


def test_hostile_lengths_do_not_allocate() -> None:
    # headers announcing 4 GiB of bin, str, array and map in a few bytes
    for header in (b"\xc6", b"\xdb", b"\xdd", b"\xdf"):
        data = b"\x93\x01\xcd\xfd\xe9" + header + b"\xff\xff\xff\xff"
        assert reason_of(data) == "malformed"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_violation(data: bytes) -> None:
    try:
        decode(data)
    except ProtocolViolation:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=100)
@given(st.sampled_from(ALL_KINDS), st.lists(msgpack_values, max_size=17))
def test_well_formed_msgpack_with_wrong_fields_raises_only_protocol_violation(
    kind: int, fields: list[Any]
) -> None:
    try:
        decode(wire(kind, fields))
    except ProtocolViolation:
        pass


@settings(max_examples=80)
@given(
    for_message(Everything),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_mutated_messages_raise_only_protocol_violation(
    msg: Everything, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(encode(msg))
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        out = decode(bytes(data))
    except ProtocolViolation:
        return
    assert encode(out) == bytes(data)  # anything accepted is a canonical message


@settings(max_examples=40)
@given(for_message(Everything), st.integers(0, 10_000))
def test_truncated_messages_are_refused(msg: Everything, cut: int) -> None:
    data = encode(msg)
    assert reason_of(data[: cut % len(data)]) == "malformed"


# -- registration and caller errors ---------------------------------------------------------


def test_registration_rules() -> None:
    with pytest.raises(UsageError):
        message(0)
    with pytest.raises(UsageError):
        message(65536)
    with pytest.raises(UsageError):
        message(True)
    with pytest.raises(UsageError, match="already taken"):

        @message(65001)
        @dataclass(frozen=True)
        class Clash:
            x: int

    with pytest.raises(UsageError, match="frozen"):

        @message(65100)
        @dataclass
        class Mutable:
            x: int

    with pytest.raises(UsageError, match="above @dataclass"):

        @message(65101)
        class NotADataclass:
            x: int

    with pytest.raises(UsageError, match="already registered"):
        message(65102)(Inner)
    assert 65100 not in registered_messages()
    assert 65101 not in registered_messages()
    assert 65102 not in registered_messages()


def test_unsupported_annotations_are_usage_errors() -> None:
    @message(65103)
    @dataclass(frozen=True)
    class Odd:
        x: int | str

    @message(65104)
    @dataclass(frozen=True)
    class WrongBound:
        x: int = field(metadata={"max_len": 3})

    try:
        with pytest.raises(UsageError, match="unions"):
            encode(Odd(1))
        with pytest.raises(UsageError, match="does not apply"):
            decode(wire(65104, [1]))
    finally:
        # keep the registry clean for the other tests
        for cls in (Odd, WrongBound):
            del codec._KINDS[kind_of(cls)]
            del codec._CLASSES[cls]
            codec._SPECS.pop(cls, None)


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(UsageError):
        encode(object())
    with pytest.raises(UsageError):
        encode(Inner(1001, b""))
    with pytest.raises(UsageError):
        encode(Inner(1, b"123456789"))
    with pytest.raises(UsageError):
        encode(Inner(True, b""))
    with pytest.raises(UsageError):
        encode(Inner(1, "str"))  # type: ignore[arg-type]
    bad_text = Everything(**{**sample().__dict__, "s": "\ud800"})
    with pytest.raises(UsageError):
        encode(bad_text)
    with pytest.raises(UsageError):
        encode(Everything(**{**sample().__dict__, "ratio": math.inf}))
    with pytest.raises(UsageError):
        encode(Everything(**{**sample().__dict__, "i": 1 << 64}))


def test_caller_errors_in_decode() -> None:
    with pytest.raises(UsageError):
        decode("text")  # type: ignore[call-overload]
    with pytest.raises(UsageError):
        decode(b"", max_size=0)
    with pytest.raises(UsageError):
        decode(b"", expect=int)


def test_kind_of() -> None:
    assert kind_of(Inner) == 65001
    assert kind_of(Inner(1, b"")) == 65001
    with pytest.raises(UsageError):
        kind_of(int)
    assert message_class(65002) is Everything
    with pytest.raises(UsageError):
        message_class(64998)


# -- sans-IO --------------------------------------------------------------------------------


@pytest.mark.parametrize("room", ["wire", "crypto"])
def test_room_imports_no_io_libraries(room: str) -> None:
    for path in (PACKAGE / room).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not re.match(r"(trio|libp2p|phala_p2p\.(net|services|node))\b", name), (
                    f"{path} imports {name}"
                )
