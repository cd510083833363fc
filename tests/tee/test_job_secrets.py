"""Job ABI v2: the granted host imports phala.secret_len / phala.secret_read (executor only)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from phala_p2p.errors import InvalidModule, Trap, UsageError
from phala_p2p.tee.executor import (
    MAX_JOB_SECRET_LEN,
    MAX_JOB_SECRETS,
    ExecutorLimits,
    WasmExecutor,
)

from .conftest import compile_wat

Job = Callable[[str], bytes]
FUEL = 10_000_000

# secret_len(i) for i = input[0] as i32, then secret_read(i, 64) and the bytes written there:
# output = 4 bytes little-endian secret_len || 4 bytes little-endian secret_read || the secret
PROBE = """(module
  (import "phala" "secret_len" (func $len (param i32) (result i32)))
  (import "phala" "secret_read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 16384))
  (func (export "run") (param $ptr i32) (param $n i32) (result i64)
    (local $i i32) (local $l i32)
    (local.set $i (i32.load8_s (local.get $ptr)))
    (local.set $l (call $len (local.get $i)))
    (i32.store (i32.const 56) (local.get $l))
    (i32.store (i32.const 60) (call $read (local.get $i) (i32.const 64)))
    (i64.or (i64.shl (i64.const 56) (i64.const 32))
            (i64.extend_i32_u (i32.add (i32.const 8)
                                       (select (local.get $l) (i32.const 0)
                                               (i32.gt_s (local.get $l) (i32.const 0))))))))"""


def _fnv_tag(data: bytes) -> bytes:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return b"%08x" % h


@pytest.fixture(scope="module")
def executor() -> WasmExecutor:
    limits = ExecutorLimits(
        memory_cap_bytes=4 * 1024 * 1024, max_input=1 << 20, max_output=1 << 20, wall_clock_s=2.0
    )
    return WasmExecutor(limits)


def test_secret_tag_example_reads_its_secret(executor: WasmExecutor, job: Job) -> None:
    for secret, data in ((b"sk-live-123", b"GET /v1/me"), (b"", b""), (b"k" * 4096, b"x" * 999)):
        result = executor.run(job("secret_tag"), data, fuel=FUEL, secrets=[secret])
        assert result.output == _fnv_tag(secret + data)
    with pytest.raises(Trap, match="unreachable"):
        executor.run(job("secret_tag"), b"no secret given", fuel=FUEL)


def test_secret_len_and_read(executor: WasmExecutor) -> None:
    module = compile_wat(PROBE)
    secrets = [b"zero", b"", b"two!!"]

    def probe(index: int) -> tuple[int, int, bytes]:
        out = executor.run(module, bytes([index & 0xFF]), fuel=FUEL, secrets=secrets).output
        return (
            int.from_bytes(out[:4], "little", signed=True),
            int.from_bytes(out[4:8], "little", signed=True),
            out[8:],
        )

    assert probe(0) == (4, 4, b"zero")
    assert probe(1) == (0, 0, b"")
    assert probe(2) == (5, 5, b"two!!")
    assert probe(3) == (-1, -1, b"")
    assert probe(-1) == (-1, -1, b"")
    # a job without secrets sees none
    out = executor.run(module, b"\x00", fuel=FUEL).output
    assert out[:8] == (-1).to_bytes(4, "little", signed=True) * 2


def test_secret_read_outside_memory_traps(executor: WasmExecutor, job: Job) -> None:
    wat = """(module
      (import "phala" "secret_read" (func $read (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 0))
      (func (export "run") (param i32 i32) (result i64)
        (drop (call $read (i32.const 0) (i32.const 65530)))
        (i64.const 0)))"""
    with pytest.raises(Trap, match="outside memory"):
        executor.run(compile_wat(wat), b"", fuel=FUEL, secrets=[b"0123456789"])
    assert executor.run(compile_wat(wat), b"", fuel=FUEL, secrets=[b"012345"]).output == b""
    assert executor.run(job("echo"), b"still fine", fuel=FUEL).output == b"still fine"


@pytest.mark.parametrize(
    "imports",
    [
        '(import "phala" "secret_len" (func (param i64) (result i32)))',
        '(import "phala" "secret_read" (func (param i32) (result i32)))',
        '(import "phala" "secret_write" (func (param i32 i32) (result i32)))',
        '(import "env" "secret_len" (func (param i32) (result i32)))',
        '(import "phala" "secret_len" (global i32))',
        '(import "phala" "memory" (memory 1))',
    ],
)
def test_other_imports_are_refused(executor: WasmExecutor, imports: str) -> None:
    wat = f"""(module {imports}
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 0))
      (func (export "run") (param i32 i32) (result i64) (i64.const 0)))"""
    if "(memory 1)" in imports:
        wat = wat.replace('(memory (export "memory") 1)', '(export "memory" (memory 0))')
    with pytest.raises(InvalidModule, match="grants no host imports other than"):
        executor.run(compile_wat(wat), b"", fuel=FUEL)


def test_secrets_are_validated(executor: WasmExecutor, job: Job) -> None:
    for secrets in (
        [b"s"] * (MAX_JOB_SECRETS + 1),
        [b"s" * (MAX_JOB_SECRET_LEN + 1)],
        ["text"],
        b"bytes-not-a-list",
    ):
        with pytest.raises(UsageError):
            executor.run(job("echo"), b"", fuel=FUEL, secrets=secrets)  # type: ignore[arg-type]
