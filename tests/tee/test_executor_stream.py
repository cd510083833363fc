"""Job ABI v3: streaming jobs (exports feed + finish) run piece by piece with bounded memory."""

from __future__ import annotations

import itertools
import random
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.errors import (
    FuelExhausted,
    InvalidModule,
    MemoryExhausted,
    OutputTooLarge,
    Trap,
    UsageError,
    WallClockExceeded,
)
from phala_p2p.tee.executor import ABI_VERSION, ExecutorLimits, StreamingRun, WasmExecutor

from .conftest import compile_wat

Job = Callable[[str], bytes]

LIMITS = ExecutorLimits(
    max_fuel=10**10,
    memory_cap_bytes=4 * 1024 * 1024,
    wall_clock_s=0.5,
    max_input=1024 * 1024,
    max_output=1024 * 1024,
    max_module_bytes=256 * 1024,
)
FUEL = 10**9
MiB = 1024 * 1024
STREAM_EXAMPLES = ("stream_echo", "stream_uppercase", "stream_count")

# A streaming job whose feed never returns when a piece starts with 0xff (else: no output).
SLOW_FEED = """(module (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "feed") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 255))
      (then (loop $forever (br $forever))))
    (i64.const 0))
  (func (export "finish") (result i64) (i64.const 0)))"""

# feed divides by the piece's first byte (Trap on 0) and returns no output; feed of "m"
# grows memory until refused, then writes past its end (MemoryExhausted)
FAULTY_FEED = """(module (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "feed") (param $ptr i32) (param $len i32) (result i64)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 109))
      (then
        (block $full (loop $grow
          (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
          (br $grow)))
        (i32.store8 (i32.mul (memory.size) (i32.const 65536)) (i32.const 1))))
    ;; an empty output range at 100 / piece[0]
    (i64.shl (i64.extend_i32_u (i32.div_u (i32.const 100) (i32.load8_u (local.get $ptr))))
             (i64.const 32)))
  (func (export "finish") (result i64) (i64.const 0)))"""

# finish returns secret 0 (copied to offset 0); feed returns nothing
SECRET_FINISH = """(module
  (import "phala" "secret_read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 8192))
  (func (export "feed") (param i32 i32) (result i64) (i64.const 0))
  (func (export "finish") (result i64)
    (i64.extend_i32_u (call $read (i32.const 0) (i32.const 0)))))"""

# both modes: run and feed return the input range unchanged, finish returns "end"
BOTH_MODES = """(module (memory (export "memory") 1)
  (data (i32.const 16) "end")
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func $range (export "run") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
  (func (export "feed") (param i32 i32) (result i64) (call $range (local.get 0) (local.get 1)))
  (func (export "finish") (result i64) (i64.const 0x10_00000003)))"""

# the start function never returns: instantiation is a call under the wall clock too
SLOW_START = """(module (memory (export "memory") 1)
  (func $start (loop $forever (br $forever)))
  (start $start)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "feed") (param i32 i32) (result i64) (i64.const 0))
  (func (export "finish") (result i64) (i64.const 0)))"""


@pytest.fixture(scope="module")
def executor() -> WasmExecutor:
    return WasmExecutor(LIMITS)


def _upper(data: bytes) -> bytes:
    return bytes(c - 32 if 97 <= c <= 122 else c for c in data)


def _words(data: bytes) -> int:
    count, in_word = 0, False
    for c in data:
        if c in b" \t\n\r":
            in_word = False
        elif not in_word:
            count, in_word = count + 1, True
    return count


def _expected(name: str, data: bytes) -> bytes:
    if name == "stream_echo":
        return data
    if name == "stream_uppercase":
        return _upper(data)
    return f"{len(data)} {_words(data)}".encode()


def _split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (any ints, taken modulo len+1), without empty pieces."""
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _stream(executor: WasmExecutor, module: bytes, pieces: Sequence[bytes]) -> tuple[bytes, int]:
    """All the output of one stream over ``pieces``, and the fuel it used."""
    with executor.open_stream(module, fuel=FUEL) as run:
        out = b"".join(run.feed(piece) for piece in pieces) + run.finish()
        assert run.finished
        return out, run.fuel_used


def _text(rng: random.Random, size: int) -> bytes:
    alphabet = b"ab zZ\t\n\r\x00\xff-"
    return bytes(rng.choice(alphabet) for _ in range(size))


def test_abi_version_is_3() -> None:
    assert ABI_VERSION == 3


@pytest.mark.parametrize("name", STREAM_EXAMPLES)
def test_examples_over_many_pieces_match_python(
    executor: WasmExecutor, job: Job, name: str
) -> None:
    rng = random.Random(name)
    data = _text(rng, 300_000)
    pieces = _split(data, [rng.randrange(len(data)) for _ in range(400)])
    assert len(pieces) > 300
    out, _ = _stream(executor, job(name), pieces)
    assert out == _expected(name, data)


def test_stream_count_counts_words_across_pieces(executor: WasmExecutor, job: Job) -> None:
    pieces = [b"hel", b"lo wo", b"r", b"ld", b" ", b"\t", b"x", b"y\r\n", b"z"]
    out, _ = _stream(executor, job("stream_count"), pieces)
    assert out == b"18 4"
    # one piece, nothing but separators, and a stream with no input at all
    assert _stream(executor, job("stream_count"), [b"one two"])[0] == b"7 2"
    assert _stream(executor, job("stream_count"), [b" \t", b"\r\n "])[0] == b"5 0"
    assert _stream(executor, job("stream_count"), [])[0] == b"0 0"


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=1, max_size=3000), cuts=st.lists(st.integers(0, 3000)))
def test_any_split_gives_the_same_output(
    executor: WasmExecutor, job: Job, data: bytes, cuts: list[int]
) -> None:
    for name in STREAM_EXAMPLES:
        whole, _ = _stream(executor, job(name), [data])
        split, _ = _stream(executor, job(name), _split(data, cuts))
        assert whole == split == _expected(name, data)


def test_fuel_is_deterministic(executor: WasmExecutor, job: Job) -> None:
    data = _text(random.Random(7), 50_000)
    one_split = _split(data, range(0, 50_000, 3_001))
    other_split = _split(data, range(0, 50_000, 997))
    for name in STREAM_EXAMPLES:
        first, fuel_first = _stream(executor, job(name), one_split)
        again, fuel_again = _stream(executor, job(name), one_split)
        other, fuel_other = _stream(executor, job(name), other_split)
        assert first == again == other == _expected(name, data)
        assert fuel_first == fuel_again
        assert 0 < fuel_first < fuel_other  # more pieces, more calls
    _, shorter = _stream(executor, job("stream_uppercase"), one_split[:-1])
    _, longer = _stream(executor, job("stream_uppercase"), one_split)
    assert shorter < longer


def test_one_fuel_grant_for_the_whole_stream(executor: WasmExecutor, job: Job) -> None:
    piece = b"fuel per piece " * 1000
    with executor.open_stream(job("stream_uppercase"), fuel=FUEL) as run:
        used = [run.fuel_used]
        for _ in range(4):
            run.feed(piece)
            used.append(run.fuel_used)
    # a grant that covers three pieces and half of the fourth
    grant = used[3] + (used[4] - used[3]) // 2
    run = executor.open_stream(job("stream_uppercase"), fuel=grant)
    for i in range(3):
        assert run.feed(piece) == _upper(piece)
        assert run.fuel_used == used[i + 1]
    with pytest.raises(FuelExhausted, match="out of fuel"):
        run.feed(piece)
    assert run.fuel_used == grant
    assert run.failed
    with pytest.raises(UsageError, match="failed"):
        run.feed(piece)
    with pytest.raises(UsageError, match="failed"):
        run.finish()
    assert not run.finished


def test_wall_clock_bounds_each_call(executor: WasmExecutor, job: Job) -> None:
    other = executor.open_stream(job("stream_echo"), fuel=FUEL)
    assert other.feed(b"before") == b"before"
    run = executor.open_stream(compile_wat(SLOW_FEED), fuel=LIMITS.max_fuel)
    assert run.feed(b"quick") == b""
    started = time.monotonic()
    with pytest.raises(WallClockExceeded, match=r"wall-clock cap of 0\.5 s"):
        run.feed(b"\xffloops forever")
    elapsed = time.monotonic() - started
    assert LIMITS.wall_clock_s <= elapsed < LIMITS.wall_clock_s + 2.0
    with pytest.raises(UsageError, match="failed"):
        run.feed(b"quick")
    # the late watchdog tick hits neither the stream that was open meanwhile nor a new job
    assert other.feed(b"after") == b"after"
    assert executor.run(job("echo"), b"run after", fuel=FUEL).output == b"run after"


def test_many_quick_calls_may_outlast_the_wall_clock(executor: WasmExecutor, job: Job) -> None:
    piece = b"quick piece " * 5000
    run = executor.open_stream(job("stream_uppercase"), fuel=LIMITS.max_fuel)
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 2 * LIMITS.wall_clock_s and calls < 200_000:
        assert run.feed(piece) == _upper(piece)
        calls += 1
    assert time.monotonic() - started >= 2 * LIMITS.wall_clock_s
    assert calls > 1
    assert run.finish() == b""


def test_wall_clock_bounds_instantiation(executor: WasmExecutor, job: Job) -> None:
    with pytest.raises(WallClockExceeded):
        executor.open_stream(compile_wat(SLOW_START), fuel=LIMITS.max_fuel)
    assert _stream(executor, job("stream_echo"), [b"ok"])[0] == b"ok"


def test_output_cap_applies_per_call(job: Job) -> None:
    small = WasmExecutor(ExecutorLimits(max_output=16, max_input=1024, wall_clock_s=1.0))
    run = small.open_stream(job("stream_echo"), fuel=FUEL)
    for _ in range(10):  # 160 bytes in all: the cap is per call, not per stream
        assert run.feed(b"x" * 16) == b"x" * 16
    with pytest.raises(OutputTooLarge, match="17 bytes"):
        run.feed(b"x" * 17)
    with pytest.raises(UsageError, match="failed"):
        run.feed(b"x")


def test_memory_stays_bounded(job: Job) -> None:
    executor = WasmExecutor(LIMITS)  # a 4 MiB memory cap
    piece = bytes(range(256)) * 4096  # 1 MiB
    run = executor.open_stream(job("stream_echo"), fuel=FUEL)
    assert run.feed(piece) == piece
    size = run.memory_bytes
    assert MiB < size <= 2 * MiB
    for i in range(199):  # 200 MiB through a 4 MiB memory
        assert run.feed(piece) == piece, i
        assert run.memory_bytes == size
    assert run.finish() == b""
    # the other examples too, and a larger piece grows the buffer only then
    for name in ("stream_uppercase", "stream_count"):
        run = executor.open_stream(job(name), fuel=LIMITS.max_fuel)
        run.feed(b"a" * 256 * 1024)
        size = run.memory_bytes
        for _ in range(20):
            run.feed(b"b c" * 80_000)
            assert run.memory_bytes == size
        run.feed(b"d" * MiB)
        assert run.memory_bytes > size
        run.close()


def test_job_failures_kill_the_stream(executor: WasmExecutor) -> None:
    module = compile_wat(FAULTY_FEED)
    run = executor.open_stream(module, fuel=FUEL)
    assert run.feed(b"\x05") == b""
    with pytest.raises(Trap, match="division_by_zero"):
        run.feed(b"\x00")
    with pytest.raises(UsageError, match=r"failed.*Trap"):
        run.feed(b"\x05")
    run.close()
    run.close()
    with pytest.raises(UsageError, match="failed"):
        run.finish()
    run = executor.open_stream(module, fuel=LIMITS.max_fuel)
    with pytest.raises(MemoryExhausted, match=str(LIMITS.memory_cap_bytes)):
        run.feed(b"m")
    assert run.memory_bytes > LIMITS.memory_cap_bytes - 65536
    with pytest.raises(UsageError, match="failed"):
        run.feed(b"\x05")


def test_bad_pieces_are_refused_and_leave_the_stream_usable(
    executor: WasmExecutor, job: Job
) -> None:
    run = executor.open_stream(job("stream_count"), fuel=FUEL)
    for bad in (b"", b"x" * (LIMITS.max_input + 1)):
        with pytest.raises(UsageError, match="piece of input"):
            run.feed(bad)
    with pytest.raises(UsageError, match="bytes"):
        run.feed("text")  # type: ignore[arg-type]
    assert not run.failed
    assert run.feed(bytearray(b"a b")) == b""
    assert run.feed(memoryview(b" c")) == b""
    assert run.finish() == b"5 3"


def test_finished_and_closed_streams_refuse_calls(executor: WasmExecutor, job: Job) -> None:
    run = executor.open_stream(job("stream_echo"), fuel=FUEL)
    run.feed(b"abc")
    assert run.finish() == b""
    assert run.finished
    with pytest.raises(UsageError, match="finished"):
        run.feed(b"more")
    with pytest.raises(UsageError, match="finished"):
        run.finish()
    used = run.fuel_used
    run.close()
    assert run.fuel_used == used > 0
    with executor.open_stream(job("stream_echo"), fuel=FUEL) as closed:
        closed.feed(b"x")
    with pytest.raises(UsageError, match="closed"):
        closed.feed(b"y")
    assert not closed.finished


def test_caller_mistakes_are_usage_errors(executor: WasmExecutor, job: Job) -> None:
    for fuel in (0, -1, True, LIMITS.max_fuel + 1):
        with pytest.raises(UsageError, match="fuel"):
            executor.open_stream(job("stream_echo"), fuel=fuel)
    with pytest.raises(UsageError, match="secrets"):
        executor.open_stream(job("stream_echo"), fuel=FUEL, secrets=[b"s"] * 9)


def test_non_streaming_modules(executor: WasmExecutor, job: Job) -> None:
    assert executor.is_streaming(job("echo")) is False
    assert executor.is_streaming(job("stream_echo")) is True
    with pytest.raises(InvalidModule, match="not a streaming job"):
        executor.open_stream(job("echo"), fuel=FUEL)
    with pytest.raises(InvalidModule, match="open_stream"):
        executor.run(job("stream_echo"), b"x", fuel=FUEL)
    with pytest.raises(InvalidModule, match="grants no host imports"):
        executor.is_streaming(job("imports_host"))


def test_a_module_with_both_modes_runs_either_way(executor: WasmExecutor) -> None:
    module = compile_wat(BOTH_MODES)
    assert executor.is_streaming(module)
    assert executor.run(module, b"whole", fuel=FUEL).output == b"whole"
    assert _stream(executor, module, [b"pie", b"ces"])[0] == b"pieces" + b"end"


_HEAD = """(module (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))"""
_FEED = '(func (export "feed") (param i32 i32) (result i64) (i64.const 0))'
_FINISH = '(func (export "finish") (result i64) (i64.const 0))'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('(func (export "feed") (param i32 i32) (result i32) (i32.const 0))' + _FINISH, "'feed'"),
        ('(func (export "feed") (param i64) (result i64) (i64.const 0))' + _FINISH, "'feed'"),
        (_FEED + '(func (export "finish") (param i32) (result i64) (i64.const 0))', "'finish'"),
        (_FEED + '(global (export "finish") i64 (i64.const 0))', "'finish'"),
        (_FEED, "exports 'feed' but not 'finish'"),
        (_FINISH, "exports 'finish' but not 'feed'"),
        ("", r"must export 'run'.*or 'feed'"),
        (
            '(func (export "run") (param i32 i32) (result i32) (i32.const 0))' + _FEED + _FINISH,
            "'run'",
        ),
    ],
)
def test_modules_that_break_the_streaming_abi(
    executor: WasmExecutor, body: str, message: str
) -> None:
    module = compile_wat(f"{_HEAD} {body})")
    with pytest.raises(InvalidModule, match=message):
        executor.open_stream(module, fuel=FUEL)
    with pytest.raises(InvalidModule, match=message):
        executor.is_streaming(module)


def test_bad_ranges_from_a_streaming_job(executor: WasmExecutor) -> None:
    bad_alloc = compile_wat(
        _HEAD.replace("(i32.const 1024)", "(i32.const -16)") + _FEED + _FINISH + ")"
    )
    run = executor.open_stream(bad_alloc, fuel=FUEL)
    with pytest.raises(InvalidModule, match=r"alloc\(32\) returned"):
        run.feed(b"x" * 32)
    bad_finish = compile_wat(
        _HEAD + _FEED + '(func (export "finish") (result i64) (i64.const 0xffff000000000010)))'
    )
    run = executor.open_stream(bad_finish, fuel=FUEL)
    assert run.feed(b"x") == b""
    with pytest.raises(InvalidModule, match="finish returned output"):
        run.finish()
    assert not run.finished


def test_streams_get_their_secrets(executor: WasmExecutor) -> None:
    run = executor.open_stream(compile_wat(SECRET_FINISH), fuel=FUEL, secrets=[b"sk-123"])
    assert run.feed(b"ignored") == b""
    assert run.finish() == b"sk-123"


def test_granted_imports_work_on_several_executors() -> None:
    # wasmtime binds a FuncType to the first engine that uses it and aborts the process when
    # another engine uses it: each executor (engine) must get host functions of its own types
    module = compile_wat(SECRET_FINISH)
    for secret in (b"first", b"second", b"third"):
        run = WasmExecutor(LIMITS).open_stream(module, fuel=FUEL, secrets=[secret])
        assert run.feed(b"x") == b""
        assert run.finish() == secret


def _interleaved_text(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [_text(rng, rng.randrange(1, 5000)) for _ in range(60)]


def test_interleaved_streams_on_one_executor(executor: WasmExecutor, job: Job) -> None:
    upper_pieces, count_pieces = _interleaved_text(1), _interleaved_text(2)
    upper = executor.open_stream(job("stream_uppercase"), fuel=FUEL)
    count = executor.open_stream(job("stream_count"), fuel=FUEL)
    upper_out = []
    for i, (a, b) in enumerate(zip(upper_pieces, count_pieces, strict=True)):
        upper_out.append(upper.feed(a))
        assert count.feed(b) == b""
        if i % 10 == 0:  # a whole-input job between pieces
            assert executor.run(job("word_count"), b"x y", fuel=FUEL).output == b"2"
    assert count.finish() == _expected("stream_count", b"".join(count_pieces))
    assert b"".join(upper_out) + upper.finish() == _upper(b"".join(upper_pieces))


def test_streams_fed_from_threads(executor: WasmExecutor, job: Job) -> None:
    def stream(name: str, seed: int) -> bytes:
        pieces = _interleaved_text(seed)
        run = executor.open_stream(job(name), fuel=FUEL)
        out = b"".join(run.feed(p) for p in pieces) + run.finish()
        assert out == _expected(name, b"".join(pieces))
        return out

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(stream, name, i) for i, name in enumerate(STREAM_EXAMPLES * 2)]
        results = [f.result(timeout=60) for f in futures]
    assert len(results) == 6


@pytest.mark.parametrize("name", ["echo", "uppercase", "word_count", "sum"])
def test_whole_input_jobs_still_run(executor: WasmExecutor, job: Job, name: str) -> None:
    assert executor.is_streaming(job(name)) is False
    data = struct.pack("<3I", 1, 2, 3) + b" ab c"
    expected = {
        "echo": data,
        "uppercase": _upper(data),
        "word_count": str(_words(data)).encode(),
        "sum": struct.pack("<Q", 1 + 2 + 3 + int.from_bytes(b" ab ", "little")),
    }[name]
    assert executor.run(job(name), data, fuel=FUEL).output == expected


def test_streaming_run_is_exported() -> None:
    from phala_p2p.tee import executor as module

    assert "StreamingRun" in module.__all__
    assert StreamingRun.__module__ == module.__name__
