from __future__ import annotations

import struct
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.errors import (
    ExecutionError,
    FuelExhausted,
    InvalidModule,
    MemoryExhausted,
    OutputTooLarge,
    Trap,
    UsageError,
    WallClockExceeded,
)
from phala_p2p.tee.executor import ExecutorLimits, WasmExecutor

from .conftest import compile_wat

Job = Callable[[str], bytes]

LIMITS = ExecutorLimits(
    max_fuel=10**10,
    memory_cap_bytes=4 * 1024 * 1024,
    wall_clock_s=0.3,
    max_input=1024 * 1024,
    max_output=1024 * 1024,
    max_module_bytes=256 * 1024,
)
FUEL = 10**8


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


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)), b"x" * 200_000])
def test_echo_returns_its_input(executor: WasmExecutor, job: Job, data: bytes) -> None:
    result = executor.run(job("echo"), data, fuel=FUEL)
    assert result.output == data
    assert 0 < result.fuel_used <= FUEL


def test_examples_compute_the_right_output(executor: WasmExecutor, job: Job) -> None:
    assert executor.run(job("uppercase"), b"Hello, World! z{", fuel=FUEL).output == (
        b"HELLO, WORLD! Z{"
    )
    text = b"  the quick\tbrown\n\nfox  jumps\r\n"
    assert executor.run(job("word_count"), text, fuel=FUEL).output == b"5"
    assert executor.run(job("word_count"), b"", fuel=FUEL).output == b"0"
    numbers = [1, 2, 2**32 - 1, 7]
    packed = struct.pack(f"<{len(numbers)}I", *numbers) + b"\x09"  # trailing byte ignored
    out = executor.run(job("sum"), packed, fuel=FUEL).output
    assert struct.unpack("<Q", out) == (sum(numbers),)


@settings(max_examples=60)
@given(data=st.binary(max_size=2048))
def test_uppercase_and_word_count_match_python(
    executor: WasmExecutor, job: Job, data: bytes
) -> None:
    assert executor.run(job("uppercase"), data, fuel=FUEL).output == _upper(data)
    words = executor.run(job("word_count"), data, fuel=FUEL).output
    assert words == str(_words(data)).encode()


def test_fuel_accounting_is_deterministic(executor: WasmExecutor, job: Job) -> None:
    data = b"some words to count " * 50
    first = executor.run(job("word_count"), data, fuel=FUEL)
    second = executor.run(job("word_count"), data, fuel=FUEL)
    assert first.fuel_used == second.fuel_used
    longer = executor.run(job("word_count"), data * 2, fuel=FUEL)
    assert longer.fuel_used > first.fuel_used


def test_fuel_hog_runs_out_of_fuel_and_executor_keeps_working(
    executor: WasmExecutor, job: Job
) -> None:
    with pytest.raises(FuelExhausted, match="out of fuel"):
        executor.run(job("fuel_hog"), b"", fuel=1_000_000)
    assert executor.run(job("echo"), b"next", fuel=FUEL).output == b"next"


def test_fuel_budget_is_never_exceeded(executor: WasmExecutor, job: Job) -> None:
    data = b"abc" * 100
    used = executor.run(job("uppercase"), data, fuel=FUEL).fuel_used
    exact = executor.run(job("uppercase"), data, fuel=used)
    assert exact.output == _upper(data)
    assert exact.fuel_used == used
    with pytest.raises(FuelExhausted):
        executor.run(job("uppercase"), data, fuel=used // 2)
    # fuel is checked at function entries and loop heads: a budget a few units short may
    # still finish its last straight-line block, but the reported use never exceeds it
    for budget in range(used - 20, used):
        try:
            assert executor.run(job("uppercase"), data, fuel=budget).fuel_used <= budget
        except FuelExhausted:
            pass


def test_infinite_loop_hits_the_wall_clock(executor: WasmExecutor, job: Job) -> None:
    started = time.monotonic()
    with pytest.raises(WallClockExceeded, match=r"wall-clock cap of 0\.3 s"):
        executor.run(job("infinite_loop"), b"", fuel=LIMITS.max_fuel)
    elapsed = time.monotonic() - started
    assert LIMITS.wall_clock_s <= elapsed < LIMITS.wall_clock_s + 2.0
    # the late watchdog tick must not hit the next job
    assert executor.run(job("echo"), b"after", fuel=FUEL).output == b"after"


def test_infinite_loop_with_small_fuel_runs_out_of_fuel(executor: WasmExecutor, job: Job) -> None:
    with pytest.raises(FuelExhausted):
        executor.run(job("infinite_loop"), b"", fuel=10_000)


def test_memory_bomb_is_stopped_at_the_cap(executor: WasmExecutor, job: Job) -> None:
    with pytest.raises(MemoryExhausted, match=str(LIMITS.memory_cap_bytes)):
        executor.run(job("memory_bomb"), b"", fuel=LIMITS.max_fuel)
    assert executor.run(job("echo"), b"ok", fuel=FUEL).output == b"ok"


def test_initial_memory_above_the_cap(executor: WasmExecutor) -> None:
    pages = LIMITS.memory_cap_bytes // 65536 + 1
    wat = f"""(module (memory (export "memory") {pages})
      (func (export "alloc") (param i32) (result i32) (i32.const 0))
      (func (export "run") (param i32 i32) (result i64) (i64.const 0)))"""
    with pytest.raises(MemoryExhausted, match="initial memory"):
        executor.run(compile_wat(wat), b"", fuel=FUEL)


def test_trap_is_reported_with_its_cause(executor: WasmExecutor, job: Job) -> None:
    with pytest.raises(Trap, match="division_by_zero"):
        executor.run(job("trap"), b"", fuel=FUEL)
    assert executor.run(job("trap"), b"x", fuel=FUEL).output == b""


def test_stack_overflow_is_a_trap(executor: WasmExecutor) -> None:
    wat = """(module (memory (export "memory") 1)
      (func $f (param i32) (result i32) (i32.add (call $f (local.get 0)) (i32.const 1)))
      (func (export "alloc") (param i32) (result i32) (i32.const 0))
      (func (export "run") (param i32 i32) (result i64)
        (i64.extend_i32_u (call $f (i32.const 0)))))"""
    with pytest.raises(Trap, match="stack_overflow"):
        executor.run(compile_wat(wat), b"", fuel=LIMITS.max_fuel)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("bad_output", "outside the memory"),
        ("imports_host", "grants no host imports"),
    ],
)
def test_abi_violations_are_invalid_modules(
    executor: WasmExecutor, job: Job, source: str, message: str
) -> None:
    with pytest.raises(InvalidModule, match=message):
        executor.run(job(source), b"", fuel=FUEL)
    assert executor.run(job("echo"), b"fine", fuel=FUEL).output == b"fine"


@pytest.mark.parametrize(
    ("wat", "message"),
    [
        ('(module (func (export "run") (param i32 i32) (result i64) (i64.const 0)))', "memory"),
        (
            """(module (memory (export "memory") 1)
              (func (export "alloc") (param i64) (result i32) (i32.const 0))
              (func (export "run") (param i32 i32) (result i64) (i64.const 0)))""",
            "'alloc'",
        ),
        (
            """(module (memory (export "memory") 1)
              (func (export "alloc") (param i32) (result i32) (i32.const 0))
              (func (export "run") (param i32 i32) (result i32) (i32.const 0)))""",
            "'run'",
        ),
        (
            """(module (memory (export "memory") 1)
              (func (export "alloc") (param i32) (result i32) (i32.const -256))
              (func (export "run") (param i32 i32) (result i64) (i64.const 0)))""",
            "alloc\\(3\\) returned",
        ),
    ],
)
def test_modules_that_break_the_abi(executor: WasmExecutor, wat: str, message: str) -> None:
    with pytest.raises(InvalidModule, match=message):
        executor.run(compile_wat(wat), b"abc", fuel=FUEL)


@pytest.mark.parametrize(
    "module",
    [b"", b"not wasm at all", b"\0asm\x01\0\0\0\x01\xff", b"\0asm\x02\0\0\0"],
)
def test_malformed_modules(executor: WasmExecutor, job: Job, module: bytes) -> None:
    with pytest.raises(InvalidModule):
        executor.run(module, b"", fuel=FUEL)
    assert executor.run(job("echo"), b"still here", fuel=FUEL).output == b"still here"


def test_truncated_example_is_invalid(executor: WasmExecutor, job: Job) -> None:
    module = job("uppercase")
    with pytest.raises(InvalidModule, match="does not compile"):
        executor.run(module[: len(module) // 2], b"", fuel=FUEL)


def test_output_above_the_cap(job: Job) -> None:
    small = WasmExecutor(ExecutorLimits(max_output=16, max_input=1024, wall_clock_s=1.0))
    echo = job("echo")
    assert small.run(echo, b"x" * 16, fuel=FUEL).output == b"x" * 16
    with pytest.raises(OutputTooLarge, match="17 bytes"):
        small.run(echo, b"x" * 17, fuel=FUEL)


def test_caller_mistakes_are_usage_errors(executor: WasmExecutor, job: Job) -> None:
    for fuel in (0, -1, True, LIMITS.max_fuel + 1):
        with pytest.raises(UsageError):
            executor.run(job("echo"), b"", fuel=fuel)
    with pytest.raises(UsageError, match="input"):
        executor.run(job("echo"), b"x" * (LIMITS.max_input + 1), fuel=FUEL)
    with pytest.raises(InvalidModule, match="above the cap"):
        executor.run(b"\0asm" + bytes(LIMITS.max_module_bytes), b"", fuel=FUEL)


def test_errors_share_one_base(executor: WasmExecutor, job: Job) -> None:
    with pytest.raises(ExecutionError):
        executor.run(job("fuel_hog"), b"", fuel=1000)


def test_module_cache_is_bounded(job: Job) -> None:
    executor = WasmExecutor(ExecutorLimits(module_cache_size=2, wall_clock_s=1.0))
    for name in ("echo", "uppercase", "word_count", "echo"):
        executor.run(job(name), b"a b", fuel=FUEL)
    assert executor.cached_modules() == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_fuel": 0},
        {"max_fuel": 2**63},
        {"memory_cap_bytes": 1000},
        {"wall_clock_s": 0},
        {"wall_clock_s": True},
        {"max_input": -5},
        {"max_output": 10**12},
        {"module_cache_size": 1.5},
    ],
)
def test_limits_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        ExecutorLimits(**kwargs)  # type: ignore[arg-type]


def test_benchmark_reports_fuel_per_second(executor: WasmExecutor, job: Job) -> None:
    rate = executor.benchmark(fuel=5_000_000)
    assert rate > 0
    assert rate != float("inf")
    assert executor.run(job("echo"), b"after bench", fuel=FUEL).output == b"after bench"
