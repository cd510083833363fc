"""WebAssembly executor for jobs (job ABI v2, see ``protocols/job-abi.md``).

Runs inside the enclave. Every job gets a fresh store with its own fuel, a memory cap and a
wall-clock cap; the compiled module is cached by its SHA-256. The ABI grants exactly two host
functions, ``phala.secret_len`` and ``phala.secret_read``, which let a job read the secrets it
was given (:data:`GRANTED_IMPORTS`); a module importing anything else is refused. Every
failure becomes a typed error under :class:`phala_p2p.errors.ExecutionError`, and the executor
stays usable after it.

This module is synchronous; drivers call :meth:`WasmExecutor.run` from a worker thread.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version as _dist_version
from typing import Any, Final

import wasmtime

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

__all__ = [
    "ABI_VERSION",
    "ENGINE_SETTINGS",
    "GRANTED_IMPORTS",
    "MAX_JOB_SECRETS",
    "MAX_JOB_SECRET_LEN",
    "WASMTIME_VERSION",
    "ExecResult",
    "ExecutorLimits",
    "WasmExecutor",
]

ABI_VERSION: Final = 2
# Secrets handed to one job (phala.secret_len / phala.secret_read): how many, how large.
MAX_JOB_SECRETS: Final = 8
MAX_JOB_SECRET_LEN: Final = 4096
WASM_PAGE: Final = 65536
WASMTIME_VERSION: Final = _dist_version("wasmtime")

# Engine settings: part of the measurement. Proposals that bring shared state, nondeterminism
# or a second memory are off; NaNs are canonicalised so that results are deterministic.
ENGINE_SETTINGS: Final[dict[str, bool]] = {
    "consume_fuel": True,
    "epoch_interruption": True,
    "wasm_threads": False,
    "shared_memory": False,
    "wasm_memory64": False,
    "wasm_multi_memory": False,
    "wasm_relaxed_simd": False,
    "wasm_component_model": False,
    "wasm_gc": False,
    "wasm_exceptions": False,
    "wasm_function_references": False,
    "wasm_stack_switching": False,
    "cranelift_nan_canonicalization": True,
    "parallel_compilation": False,
}

_MAX_U32: Final = 0xFFFF_FFFF
_I32: Final = wasmtime.ValType.i32()

# The host functions that job ABI v2 grants, by (module, name), with their types.
GRANTED_IMPORTS: Final[dict[tuple[str, str], wasmtime.FuncType]] = {
    ("phala", "secret_len"): wasmtime.FuncType([_I32], [_I32]),
    ("phala", "secret_read"): wasmtime.FuncType([_I32, _I32], [_I32]),
}
_MAX_TABLE_ELEMENTS: Final = 100_000

# A loop that burns fuel as fast as the engine allows: the benchmark job.
_BENCH_WAT: Final = """
(module
  (func (export "spin") (param $n i64) (result i64)
    (local $acc i64)
    (loop $l
      (local.set $acc (i64.add (i64.mul (local.get $acc) (i64.const 6364136223846793005))
                               (i64.const 1442695040888963407)))
      (local.set $n (i64.sub (local.get $n) (i64.const 1)))
      (br_if $l (i64.ne (local.get $n) (i64.const 0))))
    (local.get $acc)))
"""


@dataclass(frozen=True)
class ExecutorLimits:
    """Resource caps for every job; frozen and checked, part of the enclave's measurement."""

    max_fuel: int = 10_000_000_000
    memory_cap_bytes: int = 64 * 1024 * 1024
    wall_clock_s: float = 10.0
    max_input: int = 16 * 1024 * 1024
    max_output: int = 16 * 1024 * 1024
    max_module_bytes: int = 8 * 1024 * 1024
    max_wasm_stack: int = 512 * 1024
    module_cache_size: int = 32

    def __post_init__(self) -> None:
        ints = {
            "max_fuel": self.max_fuel,
            "memory_cap_bytes": self.memory_cap_bytes,
            "max_input": self.max_input,
            "max_output": self.max_output,
            "max_module_bytes": self.max_module_bytes,
            "max_wasm_stack": self.max_wasm_stack,
            "module_cache_size": self.module_cache_size,
        }
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"ExecutorLimits.{name} must be a positive int, got {value!r}")
        if self.max_fuel >= 2**63:
            raise UsageError("ExecutorLimits.max_fuel must be below 2**63")
        if self.memory_cap_bytes < WASM_PAGE or self.memory_cap_bytes > 4 * 1024**3:
            raise UsageError("ExecutorLimits.memory_cap_bytes must be within 64 KiB .. 4 GiB")
        if max(self.max_input, self.max_output) > self.memory_cap_bytes:
            raise UsageError("ExecutorLimits.max_input/max_output cannot exceed memory_cap_bytes")
        wall = self.wall_clock_s
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not 0 < wall <= 3600:
            raise UsageError(f"ExecutorLimits.wall_clock_s must be in (0, 3600], got {wall!r}")

    def canonical(self) -> dict[str, Any]:
        """The limits as a plain dict (for the measurement)."""
        out = asdict(self)
        out["wall_clock_s"] = float(self.wall_clock_s)
        return out


@dataclass(frozen=True)
class ExecResult:
    """What a successful job returns: its output and the fuel it used."""

    output: bytes
    fuel_used: int


@dataclass(frozen=True)
class _Compiled:
    module: wasmtime.Module


def _make_engine(limits: ExecutorLimits) -> wasmtime.Engine:
    config = wasmtime.Config()
    for name, value in ENGINE_SETTINGS.items():
        setattr(config, name, value)
    config.max_wasm_stack = limits.max_wasm_stack
    return wasmtime.Engine(config)


def _first_line(err: BaseException) -> str:
    """A one-line summary of a wasmtime error (its message and innermost cause)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if "Caused by:" not in lines:
        return lines[0][:300]
    head = lines[0]
    causes = [re.sub(r"^\d+:\s*", "", ln) for ln in lines[lines.index("Caused by:") + 1 :]]
    inner = causes[-1] if causes else ""
    if head.startswith("error while executing"):  # followed by a backtrace: keep the cause
        return inner[:300]
    return f"{head}: {inner}"[:300] if inner else head[:300]


class WasmExecutor:
    """Compiles and runs job modules under :class:`ExecutorLimits` (one job at a time)."""

    def __init__(self, limits: ExecutorLimits | None = None) -> None:
        self._limits = limits if limits is not None else ExecutorLimits()
        self._engine = _make_engine(self._limits)
        self._cache: OrderedDict[bytes, _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def limits(self) -> ExecutorLimits:
        return self._limits

    def cached_modules(self) -> int:
        """How many compiled modules the cache holds (bounded by ``module_cache_size``)."""
        return len(self._cache)

    # -- compilation -------------------------------------------------------------------------

    def compile(self, module_bytes: bytes) -> wasmtime.Module:
        """Compile and ABI-check a module (cached by SHA-256); raises InvalidModule."""
        with self._lock:
            return self._compile_locked(module_bytes)

    def _compile_locked(self, module_bytes: bytes) -> wasmtime.Module:
        if not isinstance(module_bytes, bytes | bytearray | memoryview):
            raise UsageError("module_bytes must be bytes")
        module_bytes = bytes(module_bytes)
        if len(module_bytes) > self._limits.max_module_bytes:
            raise InvalidModule(
                f"module is {len(module_bytes)} bytes, above the cap of "
                f"{self._limits.max_module_bytes}"
            )
        key = hashlib.sha256(module_bytes).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit.module
        if not module_bytes.startswith(b"\0asm"):
            raise InvalidModule("not a WebAssembly binary (missing \\0asm magic)")
        try:
            module = wasmtime.Module(self._engine, module_bytes)
        except wasmtime.WasmtimeError as err:
            raise InvalidModule(f"module does not compile: {_first_line(err)}") from err
        _check_abi(module)
        self._cache[key] = _Compiled(module)
        while len(self._cache) > self._limits.module_cache_size:
            self._cache.popitem(last=False)
        return module

    # -- execution ---------------------------------------------------------------------------

    def run(
        self, module_bytes: bytes, input: bytes, *, fuel: int, secrets: Sequence[bytes] = ()
    ) -> ExecResult:
        """Run one job: copy ``input`` in at ``alloc(len)``, call ``run``, return its output.

        ``secrets`` (at most :data:`MAX_JOB_SECRETS`, each at most :data:`MAX_JOB_SECRET_LEN`
        bytes) are what the job reads with ``phala.secret_len``/``phala.secret_read``.
        Raises InvalidModule, Trap, FuelExhausted, MemoryExhausted, WallClockExceeded or
        OutputTooLarge (all ExecutionError); UsageError for a bad ``fuel``, oversized input or
        bad secrets.
        """
        if isinstance(fuel, bool) or not isinstance(fuel, int) or fuel <= 0:
            raise UsageError(f"fuel must be a positive int, got {fuel!r}")
        if fuel > self._limits.max_fuel:
            raise UsageError(
                f"fuel {fuel} is above the executor's max_fuel {self._limits.max_fuel}"
            )
        if not isinstance(input, bytes | bytearray | memoryview):
            raise UsageError("input must be bytes")
        data = bytes(input)
        if len(data) > self._limits.max_input:
            raise UsageError(
                f"input is {len(data)} bytes, above the cap of {self._limits.max_input}"
            )
        if isinstance(secrets, bytes | str) or not isinstance(secrets, Sequence):
            raise UsageError("secrets must be a sequence of bytes")
        if len(secrets) > MAX_JOB_SECRETS:
            raise UsageError(f"a job gets at most {MAX_JOB_SECRETS} secrets")
        for secret in secrets:
            if not isinstance(secret, bytes) or len(secret) > MAX_JOB_SECRET_LEN:
                raise UsageError(f"each secret must be at most {MAX_JOB_SECRET_LEN} bytes")
        with self._lock:
            module = self._compile_locked(module_bytes)
            return self._run_locked(module, data, fuel, tuple(secrets))

    def _run_locked(
        self, module: wasmtime.Module, data: bytes, fuel: int, secrets: tuple[bytes, ...]
    ) -> ExecResult:
        limits = self._limits
        store = wasmtime.Store(self._engine)
        store.set_limits(
            memory_size=limits.memory_cap_bytes,
            table_elements=_MAX_TABLE_ELEMENTS,
            instances=1,
            tables=4,
            memories=1,
        )
        store.set_fuel(fuel)
        store.set_epoch_deadline(1)
        # The watchdog bumps the engine's epoch once the wall-clock cap has passed; the store
        # traps at its next epoch check. Jobs run one at a time (self._lock), and the timer is
        # joined before the next job starts, so a late tick can never hit another job.
        watchdog = threading.Timer(float(limits.wall_clock_s), self._engine.increment_epoch)
        watchdog.daemon = True
        memory: wasmtime.Memory | None = None
        watchdog.start()
        try:
            try:
                imports = _host_imports(store, module, secrets)
                instance = wasmtime.Instance(store, module, imports)
            except wasmtime.Trap as err:
                raise _classify_trap(err, None, store, limits) from err
            except wasmtime.WasmtimeError as err:
                msg = str(err)
                if "memory" in msg and "limit" in msg:
                    raise MemoryExhausted(
                        f"module's initial memory exceeds the cap of {limits.memory_cap_bytes} "
                        f"bytes: {_first_line(err)}"
                    ) from err
                raise InvalidModule(f"module does not instantiate: {_first_line(err)}") from err
            exports = instance.exports(store)
            mem = exports["memory"]
            alloc = exports["alloc"]
            run = exports["run"]
            assert isinstance(mem, wasmtime.Memory)
            assert isinstance(alloc, wasmtime.Func)
            assert isinstance(run, wasmtime.Func)
            memory = mem
            try:
                ptr = alloc(store, len(data)) & _MAX_U32
                size = memory.data_len(store)
                if ptr + len(data) > size:
                    raise InvalidModule(
                        f"alloc({len(data)}) returned {ptr}, outside the memory of {size} bytes"
                    )
                if data:
                    memory.write(store, data, ptr)
                result = run(store, ptr, len(data)) & 0xFFFF_FFFF_FFFF_FFFF
            except wasmtime.Trap as err:
                raise _classify_trap(err, memory, store, limits) from err
            except wasmtime.WasmtimeError as err:
                raise Trap(f"job failed: {_first_line(err)}") from err
            out_ptr = result >> 32
            out_len = result & _MAX_U32
            if out_len > limits.max_output:
                raise OutputTooLarge(
                    f"job output is {out_len} bytes, above the cap of {limits.max_output}"
                )
            size = memory.data_len(store)
            if out_ptr + out_len > size:
                raise InvalidModule(
                    f"run returned output [{out_ptr}, +{out_len}) outside the memory of "
                    f"{size} bytes"
                )
            output = bytes(memory.read(store, out_ptr, out_ptr + out_len))
            fuel_used = fuel - store.get_fuel()
            return ExecResult(output=output, fuel_used=fuel_used)
        finally:
            watchdog.cancel()
            watchdog.join()

    # -- benchmark ---------------------------------------------------------------------------

    def benchmark(self, *, fuel: int = 200_000_000) -> float:
        """Fuel per second of this engine on this machine (runs a fixed spin loop)."""
        if isinstance(fuel, bool) or not isinstance(fuel, int) or fuel <= 0:
            raise UsageError("benchmark fuel must be a positive int")
        with self._lock:
            module = wasmtime.Module(self._engine, bytes(wasmtime.wat2wasm(_BENCH_WAT)))
            store = wasmtime.Store(self._engine)
            store.set_fuel(fuel)
            store.set_epoch_deadline(2**62)
            instance = wasmtime.Instance(store, module, [])
            spin = instance.exports(store)["spin"]
            assert isinstance(spin, wasmtime.Func)
            started = time.perf_counter()
            try:
                spin(store, 2**62)
            except wasmtime.Trap as err:
                if err.trap_code != wasmtime.TrapCode.OUT_OF_FUEL:
                    raise ExecutionError(f"benchmark failed: {_first_line(err)}") from err
            elapsed = time.perf_counter() - started
            used = fuel - store.get_fuel()
        return used / max(elapsed, 1e-9)


def _host_imports(
    store: wasmtime.Store, module: wasmtime.Module, secrets: tuple[bytes, ...]
) -> list[wasmtime.Func]:
    """The granted host functions, in the module's import order, bound to this job's secrets.

    ``secret_len(i)`` is the length of secret ``i``, or -1 if the job has no secret ``i``.
    ``secret_read(i, ptr)`` copies secret ``i`` to ``memory[ptr ..]`` and returns its length
    (-1 if no secret ``i``); a destination outside the memory traps the job.
    """

    def secret_len(index: int) -> int:
        return len(secrets[index]) if 0 <= index < len(secrets) else -1

    def secret_read(caller: wasmtime.Caller, index: int, ptr: int) -> int:
        if not 0 <= index < len(secrets):
            return -1
        secret = secrets[index]
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):  # checked at compile time; be safe
            raise Trap("job trapped: secret_read: the module has no memory")
        start = ptr & _MAX_U32
        if start + len(secret) > memory.data_len(caller):
            raise Trap("job trapped: secret_read: destination outside memory")
        if secret:
            memory.write(caller, secret, start)
        return len(secret)

    funcs: list[wasmtime.Func] = []
    for imp in module.imports:
        name = (imp.module, imp.name)
        if name == ("phala", "secret_len"):
            funcs.append(wasmtime.Func(store, GRANTED_IMPORTS[name], secret_len))
        elif name == ("phala", "secret_read"):
            funcs.append(
                wasmtime.Func(store, GRANTED_IMPORTS[name], secret_read, access_caller=True)
            )
        else:  # refused by _check_abi when the module was compiled
            raise InvalidModule(f"module imports {imp.module}.{imp.name}, which is not granted")
    return funcs


def _same_func_type(a: wasmtime.FuncType, b: wasmtime.FuncType) -> bool:
    return a.params == b.params and a.results == b.results


def _check_abi(module: wasmtime.Module) -> None:
    refused = [
        imp
        for imp in module.imports
        if (granted := GRANTED_IMPORTS.get((imp.module or "", imp.name or ""))) is None
        or not isinstance(imp.type, wasmtime.FuncType)
        or not _same_func_type(imp.type, granted)
    ]
    if refused:
        names = ", ".join(f"{imp.module}.{imp.name}" for imp in refused[:4])
        raise InvalidModule(
            f"module imports {names}; the job ABI grants no host imports other than "
            "phala.secret_len (i32) -> i32 and phala.secret_read (i32, i32) -> i32"
        )
    exports = {exp.name: exp.type for exp in module.exports}
    mem = exports.get("memory")
    if not isinstance(mem, wasmtime.MemoryType):
        raise InvalidModule("module must export a linear memory named 'memory'")
    i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
    alloc = exports.get("alloc")
    if not isinstance(alloc, wasmtime.FuncType) or alloc.params != [i32] or alloc.results != [i32]:
        raise InvalidModule("module must export 'alloc' with type (i32) -> i32")
    run = exports.get("run")
    if not isinstance(run, wasmtime.FuncType) or run.params != [i32, i32] or run.results != [i64]:
        raise InvalidModule("module must export 'run' with type (i32, i32) -> i64")


def _classify_trap(
    err: wasmtime.Trap,
    memory: wasmtime.Memory | None,
    store: wasmtime.Store,
    limits: ExecutorLimits,
) -> ExecutionError:
    code = err.trap_code
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return FuelExhausted("job ran out of fuel")
    if code == wasmtime.TrapCode.INTERRUPT:
        return WallClockExceeded(
            f"job ran longer than the wall-clock cap of {limits.wall_clock_s} s"
        )
    if memory is not None and memory.data_len(store) + WASM_PAGE > limits.memory_cap_bytes:
        # memory.grow returns -1 at the cap; a job that then traps is out of memory.
        return MemoryExhausted(
            f"job trapped with its memory at the cap of {limits.memory_cap_bytes} bytes "
            f"({_first_line(err)})"
        )
    name = code.name.lower() if code is not None else "trap"
    return Trap(f"job trapped: {name}: {_first_line(err)}")
