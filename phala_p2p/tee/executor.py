"""WebAssembly executor for jobs (job ABI v3, see ``protocols/job-abi.md``).

Runs inside the enclave. Every job gets a fresh store with its own fuel, a memory cap and a
wall-clock cap; the compiled module is cached by its SHA-256. A job runs either on its whole
input at once (:meth:`WasmExecutor.run`, the ``run`` export) or, if it is a streaming job
(exports ``feed`` and ``finish``), on its input piece by piece as it arrives
(:meth:`WasmExecutor.open_stream`, :class:`StreamingRun`), with one store for the whole stream
and memory bounded by the job's own buffer, whatever the total size. The ABI grants exactly two host
functions, ``phala.secret_len`` and ``phala.secret_read``, which let a job read the secrets it
was given (:data:`GRANTED_IMPORTS`); a module importing anything else is refused. Every
failure becomes a typed error under :class:`phala_p2p.errors.ExecutionError`, and the executor
stays usable after it.

This module is synchronous; drivers call :meth:`WasmExecutor.run` and the methods of a
:class:`StreamingRun` from a worker thread.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version as _dist_version
from types import TracebackType
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
    "StreamingRun",
    "WasmExecutor",
]

ABI_VERSION: Final = 3
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
_MAX_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_I32: Final = wasmtime.ValType.i32()
_I64: Final = wasmtime.ValType.i64()

# The host functions that the job ABI grants (since v2), by (module, name), with their types.
# For comparisons only: wasmtime binds a FuncType to the first engine that makes a host
# function with it (and aborts the process if another engine uses it), so _host_imports makes
# fresh copies for each store.
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
    runs: bool  # exports ``run``: runs on its whole input (WasmExecutor.run)
    streams: bool  # exports ``feed`` and ``finish``: a streaming job (WasmExecutor.open_stream)


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


@dataclass(frozen=True)
class _Live:
    """One job's store and the instance's exports (those the ABI names)."""

    store: wasmtime.Store
    memory: wasmtime.Memory
    alloc: wasmtime.Func
    run: wasmtime.Func | None
    feed: wasmtime.Func | None
    finish: wasmtime.Func | None


@contextmanager
def _wall_clock(engine: wasmtime.Engine, seconds: float) -> Iterator[None]:
    """Bump the engine's epoch once ``seconds`` have passed, unless the block ends first.

    The store that runs in the block has its epoch deadline set to 1 just before, so it traps
    at its next epoch check after the tick. Calls run one at a time (the executor's lock, held
    by the caller) and the timer is cancelled and joined before the block ends, so a late tick
    can never hit another call.
    """
    watchdog = threading.Timer(seconds, engine.increment_epoch)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        watchdog.join()


@contextmanager
def _job_errors(
    store: wasmtime.Store, memory: wasmtime.Memory, limits: ExecutorLimits
) -> Iterator[None]:
    """Turn wasmtime's errors from a call into the job into typed execution errors."""
    try:
        yield
    except wasmtime.Trap as err:
        raise _classify_trap(err, memory, store, limits) from err
    except wasmtime.WasmtimeError as err:
        raise Trap(f"job failed: {_first_line(err)}") from err


def _instantiate(
    engine: wasmtime.Engine,
    limits: ExecutorLimits,
    module: wasmtime.Module,
    fuel: int,
    secrets: tuple[bytes, ...],
) -> _Live:
    """A fresh store with the job's caps and fuel, and the module instantiated in it.

    The caller holds the executor's lock and runs this under :func:`_wall_clock` (a start
    function runs here, on the job's fuel).
    """
    store = wasmtime.Store(engine)
    store.set_limits(
        memory_size=limits.memory_cap_bytes,
        table_elements=_MAX_TABLE_ELEMENTS,
        instances=1,
        tables=4,
        memories=1,
    )
    store.set_fuel(fuel)
    store.set_epoch_deadline(1)
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

    def func(name: str) -> wasmtime.Func | None:
        item = exports.get(name)
        return item if isinstance(item, wasmtime.Func) else None

    memory = exports.get("memory")
    alloc = func("alloc")
    # both checked by _check_abi when the module was compiled
    assert isinstance(memory, wasmtime.Memory)
    assert alloc is not None
    return _Live(
        store=store,
        memory=memory,
        alloc=alloc,
        run=func("run"),
        feed=func("feed"),
        finish=func("finish"),
    )


def _alloc_and_copy(live: _Live, data: bytes | bytearray) -> int:
    """Call ``alloc(len(data))``, check the pointer it returns and copy ``data`` there."""
    ptr = int(live.alloc(live.store, len(data))) & _MAX_U32
    size = live.memory.data_len(live.store)
    if ptr + len(data) > size:
        raise InvalidModule(
            f"alloc({len(data)}) returned {ptr}, outside the memory of {size} bytes"
        )
    if data:
        live.memory.write(live.store, data, ptr)
    return ptr


def _take_output(live: _Live, result: object, limits: ExecutorLimits, export: str) -> bytes:
    """Copy out the output range ``out_ptr << 32 | out_len`` that ``export`` returned."""
    assert isinstance(result, int)  # the export's type was checked: (...) -> i64
    packed = result & _MAX_U64
    out_ptr, out_len = packed >> 32, packed & _MAX_U32
    if out_len > limits.max_output:
        raise OutputTooLarge(f"job output is {out_len} bytes, above the cap of {limits.max_output}")
    size = live.memory.data_len(live.store)
    if out_ptr + out_len > size:
        raise InvalidModule(
            f"{export} returned output [{out_ptr}, +{out_len}) outside the memory of {size} bytes"
        )
    return bytes(live.memory.read(live.store, out_ptr, out_ptr + out_len))


def _checked_fuel(fuel: int, limits: ExecutorLimits) -> int:
    if isinstance(fuel, bool) or not isinstance(fuel, int) or fuel <= 0:
        raise UsageError(f"fuel must be a positive int, got {fuel!r}")
    if fuel > limits.max_fuel:
        raise UsageError(f"fuel {fuel} is above the executor's max_fuel {limits.max_fuel}")
    return fuel


def _checked_secrets(secrets: Sequence[bytes]) -> tuple[bytes, ...]:
    if isinstance(secrets, bytes | str) or not isinstance(secrets, Sequence):
        raise UsageError("secrets must be a sequence of bytes")
    if len(secrets) > MAX_JOB_SECRETS:
        raise UsageError(f"a job gets at most {MAX_JOB_SECRETS} secrets")
    for secret in secrets:
        if not isinstance(secret, bytes) or len(secret) > MAX_JOB_SECRET_LEN:
            raise UsageError(f"each secret must be at most {MAX_JOB_SECRET_LEN} bytes")
    return tuple(secrets)


class StreamingRun:
    """One streaming job (job ABI v3) fed its input piece by piece; see ``protocols/job-abi.md``.

    Made by :meth:`WasmExecutor.open_stream`, which instantiates the module: one store and one
    instance for the whole stream, one fuel grant drawn on by the instantiation and every
    ``alloc``/``feed``/``finish``. Each call takes the executor's lock for its own duration only
    (other jobs interleave between pieces) and is bounded by ``wall_clock_s`` on its own; time
    spent between calls, waiting for input, is not the job's.

    Any failure (an :class:`~phala_p2p.errors.ExecutionError` from a call) kills the stream: its
    store is dropped and every later call raises :class:`~phala_p2p.errors.UsageError`. A piece
    refused before the job sees it (not bytes, empty or above ``max_input``) raises UsageError
    and leaves the stream as it was. :meth:`finish` and :meth:`close` drop the store as well;
    :attr:`fuel_used` and :attr:`memory_bytes` keep their last values. Thread-safe, but pieces
    must of course be fed in order by one caller.
    """

    def __init__(
        self,
        *,
        live: _Live,
        fuel: int,
        lock: threading.Lock,
        engine: wasmtime.Engine,
        limits: ExecutorLimits,
    ) -> None:
        self._live: _Live | None = live
        self._fuel = fuel
        self._lock = lock
        self._engine = engine
        self._limits = limits
        self._fuel_used = fuel - live.store.get_fuel()
        self._memory_bytes = live.memory.data_len(live.store)
        self._finished = False
        self._failure: str | None = None

    def __enter__(self) -> StreamingRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def fuel_used(self) -> int:
        """Fuel used so far by the whole stream (instantiation included); at most the grant."""
        return self._fuel_used

    @property
    def memory_bytes(self) -> int:
        """Size in bytes of the instance's linear memory after the last call."""
        return self._memory_bytes

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` has returned."""
        return self._finished

    @property
    def failed(self) -> bool:
        """Whether a call failed (the stream is then dead)."""
        return self._failure is not None

    def feed(self, data: bytes) -> bytes:
        """Give the job one piece of input (1 to ``max_input`` bytes); return its output.

        Calls ``alloc(len)``, copies the piece to the pointer it returns, calls ``feed`` and
        copies out the output range it returns (possibly empty). Raises the execution errors
        of :meth:`WasmExecutor.run`; UsageError for a bad piece or a dead stream.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("a piece of input must be bytes")
        piece = bytearray(data)
        if not 0 < len(piece) <= self._limits.max_input:
            raise UsageError(
                f"a piece of input must be 1 to {self._limits.max_input} bytes, got {len(piece)}"
            )
        with self._lock:
            live = self._usable("feed")
            return self._call(live, piece)

    def finish(self) -> bytes:
        """Tell the job its input has ended (calls ``finish``); return its last output."""
        with self._lock:
            live = self._usable("finish")
            output = self._call(live, None)
            self._finished = True
            self._live = None
            return output

    def close(self) -> None:
        """Drop the store and instance (and the job's memory); idempotent."""
        with self._lock:
            self._live = None

    def _usable(self, what: str) -> _Live:
        if self._failure is not None:
            raise UsageError(
                f"cannot {what}: the stream failed earlier ({self._failure}); open a new one"
            )
        if self._finished:
            raise UsageError(f"cannot {what}: the stream is finished")
        if self._live is None:
            raise UsageError(f"cannot {what}: the stream is closed")
        return self._live

    def _call(self, live: _Live, piece: bytearray | None) -> bytes:
        """One call into the job (alloc + feed, or finish); the caller holds the lock."""
        store = live.store
        export = "finish" if piece is None else "feed"
        ok = False
        try:
            store.set_epoch_deadline(1)
            with _wall_clock(self._engine, self._limits.wall_clock_s):
                with _job_errors(store, live.memory, self._limits):
                    if piece is None:
                        assert live.finish is not None  # open_stream checked
                        result = live.finish(store)
                    else:
                        assert live.feed is not None  # open_stream checked
                        ptr = _alloc_and_copy(live, piece)
                        result = live.feed(store, ptr, len(piece))
            output = _take_output(live, result, self._limits, export)
            ok = True
            return output
        except ExecutionError as err:
            self._failure = f"{export}: {type(err).__name__}: {err}"
            raise
        finally:
            self._fuel_used = self._fuel - store.get_fuel()
            self._memory_bytes = live.memory.data_len(store)
            if not ok:
                if self._failure is None:  # interrupted by something other than the job
                    self._failure = f"{export} was interrupted"
                self._live = None


class WasmExecutor:
    """Compiles and runs job modules under :class:`ExecutorLimits` (one call at a time)."""

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
            return self._compile_locked(module_bytes).module

    def is_streaming(self, module_bytes: bytes) -> bool:
        """Whether the module is a streaming job (exports ``feed`` and ``finish``).

        Compiles and checks it (cached); raises InvalidModule if it fits neither mode.
        """
        with self._lock:
            return self._compile_locked(module_bytes).streams

    def _compile_locked(self, module_bytes: bytes) -> _Compiled:
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
            return hit
        if not module_bytes.startswith(b"\0asm"):
            raise InvalidModule("not a WebAssembly binary (missing \\0asm magic)")
        try:
            module = wasmtime.Module(self._engine, module_bytes)
        except wasmtime.WasmtimeError as err:
            raise InvalidModule(f"module does not compile: {_first_line(err)}") from err
        runs, streams = _check_abi(module)
        compiled = _Compiled(module, runs=runs, streams=streams)
        self._cache[key] = compiled
        while len(self._cache) > self._limits.module_cache_size:
            self._cache.popitem(last=False)
        return compiled

    # -- execution ---------------------------------------------------------------------------

    def run(
        self, module_bytes: bytes, input: bytes, *, fuel: int, secrets: Sequence[bytes] = ()
    ) -> ExecResult:
        """Run one job: copy ``input`` in at ``alloc(len)``, call ``run``, return its output.

        ``secrets`` (at most :data:`MAX_JOB_SECRETS`, each at most :data:`MAX_JOB_SECRET_LEN`
        bytes) are what the job reads with ``phala.secret_len``/``phala.secret_read``.
        Raises InvalidModule (also for a streaming job without ``run``), Trap, FuelExhausted,
        MemoryExhausted, WallClockExceeded or OutputTooLarge (all ExecutionError); UsageError
        for a bad ``fuel``, oversized input or bad secrets.
        """
        fuel = _checked_fuel(fuel, self._limits)
        if not isinstance(input, bytes | bytearray | memoryview):
            raise UsageError("input must be bytes")
        data = bytes(input)
        if len(data) > self._limits.max_input:
            raise UsageError(
                f"input is {len(data)} bytes, above the cap of {self._limits.max_input}"
            )
        secret_tuple = _checked_secrets(secrets)
        with self._lock:
            compiled = self._compile_locked(module_bytes)
            if not compiled.runs:
                raise InvalidModule(
                    "module is a streaming job without a 'run' export; run it with open_stream"
                )
            return self._run_locked(compiled.module, data, fuel, secret_tuple)

    def _run_locked(
        self, module: wasmtime.Module, data: bytes, fuel: int, secrets: tuple[bytes, ...]
    ) -> ExecResult:
        limits = self._limits
        # The wall clock covers instantiation (a start function), alloc and run together.
        with _wall_clock(self._engine, limits.wall_clock_s):
            live = _instantiate(self._engine, limits, module, fuel, secrets)
            assert live.run is not None  # the caller checked
            with _job_errors(live.store, live.memory, limits):
                ptr = _alloc_and_copy(live, data)
                result = live.run(live.store, ptr, len(data))
            output = _take_output(live, result, limits, "run")
            return ExecResult(output=output, fuel_used=fuel - live.store.get_fuel())

    def open_stream(
        self, module_bytes: bytes, *, fuel: int, secrets: Sequence[bytes] = ()
    ) -> StreamingRun:
        """Instantiate a streaming job (exports ``feed`` and ``finish``) to feed piece by piece.

        ``fuel`` is the grant for the whole stream; ``secrets`` as in :meth:`run`. The
        instantiation (a start function) runs here under the wall-clock cap. Raises
        InvalidModule if the module is not a streaming job, the other execution errors of
        :meth:`run` if instantiation fails, UsageError for a bad ``fuel`` or bad secrets.
        """
        fuel = _checked_fuel(fuel, self._limits)
        secret_tuple = _checked_secrets(secrets)
        with self._lock:
            compiled = self._compile_locked(module_bytes)
            if not compiled.streams:
                raise InvalidModule(
                    "module is not a streaming job: it does not export 'feed' and 'finish'"
                )
            with _wall_clock(self._engine, self._limits.wall_clock_s):
                live = _instantiate(self._engine, self._limits, compiled.module, fuel, secret_tuple)
            return StreamingRun(
                live=live, fuel=fuel, lock=self._lock, engine=self._engine, limits=self._limits
            )

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

    def fresh_type(name: tuple[str, str]) -> wasmtime.FuncType:
        granted = GRANTED_IMPORTS[name]
        return wasmtime.FuncType(list(granted.params), list(granted.results))

    funcs: list[wasmtime.Func] = []
    for imp in module.imports:
        name = (imp.module, imp.name)
        if name == ("phala", "secret_len"):
            funcs.append(wasmtime.Func(store, fresh_type(name), secret_len))
        elif name == ("phala", "secret_read"):
            funcs.append(wasmtime.Func(store, fresh_type(name), secret_read, access_caller=True))
        else:  # refused by _check_abi when the module was compiled
            raise InvalidModule(f"module imports {imp.module}.{imp.name}, which is not granted")
    return funcs


def _same_func_type(a: wasmtime.FuncType, b: wasmtime.FuncType) -> bool:
    return a.params == b.params and a.results == b.results


# The exports of the two modes, with their types (job ABI v3).
_RUN_TYPE: Final = wasmtime.FuncType([_I32, _I32], [_I64])
_FEED_TYPE: Final = wasmtime.FuncType([_I32, _I32], [_I64])
_FINISH_TYPE: Final = wasmtime.FuncType([], [_I64])


def _check_abi(module: wasmtime.Module) -> tuple[bool, bool]:
    """Check the module's imports and exports; return (exports ``run``, is a streaming job).

    A module must export ``memory`` and ``alloc``, and ``run`` or ``feed`` + ``finish`` (or
    both). ``run``, ``feed`` and ``finish`` are reserved names: exported under another type,
    or ``feed`` without ``finish`` (or the reverse), the module is refused.
    """
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
    alloc = exports.get("alloc")
    if (
        not isinstance(alloc, wasmtime.FuncType)
        or alloc.params != [_I32]
        or alloc.results != [_I32]
    ):
        raise InvalidModule("module must export 'alloc' with type (i32) -> i32")
    wanted = {"run": _RUN_TYPE, "feed": _FEED_TYPE, "finish": _FINISH_TYPE}
    for name, func_type in wanted.items():
        found = exports.get(name)
        if found is not None and (
            not isinstance(found, wasmtime.FuncType) or not _same_func_type(found, func_type)
        ):
            raise InvalidModule(
                f"module must export '{name}' with type {_describe(func_type)}, "
                f"not {_describe(found)}"
            )
    runs = "run" in exports
    if ("feed" in exports) != ("finish" in exports):
        have, lacks = ("feed", "finish") if "feed" in exports else ("finish", "feed")
        raise InvalidModule(
            f"module exports '{have}' but not '{lacks}'; a streaming job must export both "
            f"'feed' {_describe(_FEED_TYPE)} and 'finish' {_describe(_FINISH_TYPE)}"
        )
    streams = "feed" in exports
    if not (runs or streams):
        raise InvalidModule(
            f"module must export 'run' {_describe(_RUN_TYPE)}, or 'feed' "
            f"{_describe(_FEED_TYPE)} and 'finish' {_describe(_FINISH_TYPE)} (a streaming job)"
        )
    return runs, streams


def _describe(extern: object) -> str:
    """An export's type as the messages show it, e.g. ``(i32, i32) -> i64``."""
    if not isinstance(extern, wasmtime.FuncType):
        return "a function" if extern is None else f"a {type(extern).__name__}"
    params = ", ".join(str(t) for t in extern.params)
    results = ", ".join(str(t) for t in extern.results) or "()"
    return f"({params}) -> {results}"


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
