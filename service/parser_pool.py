"""Untrusted bytes are parsed in worker processes with a time and memory limit, never in the server.

LIEF and Pillow are C/C++ parsers fed with whatever a client uploads: a hostile file may make them loop,
allocate without bound or crash.  :class:`ParserPool` runs :func:`embedder.inputs.prepare` (the one
preprocessing path) in a small process pool whose workers carry an address-space limit; a call that
exceeds its time limit gets its workers killed and the pool replaced, and a worker that dies takes only
its pool with it.  Either way the caller gets :class:`ParserFailed` (HTTP 422) and the server goes on.

Workers start with ``forkserver`` so they never inherit the server's threads or torch state, and they do
not import torch at all (``embedder.inputs`` needs only numpy, LIEF and Pillow).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from embedder.errors import ParserFailed
from embedder.inputs import InputSpec, Prepared, prepare

log = logging.getLogger("lookalike.parser_pool")


def _limit_worker(memory_bytes: int) -> None:
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _prepare(data: bytes, spec: InputSpec, allow_raw: bool) -> Prepared:
    try:
        return prepare(data, spec, allow_raw=allow_raw)
    except MemoryError as exc:
        raise ParserFailed("the parser ran out of memory on this input") from exc


class ParserPool:
    """A restartable process pool for :func:`embedder.inputs.prepare` on untrusted bytes."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024) -> None:
        self.workers, self.timeout_s, self.memory_bytes = workers, timeout_s, memory_mb * 1024 * 1024
        self._lock = threading.Lock()
        self._generation = 0
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_limit_worker,
            initargs=(self.memory_bytes,),
        )

    def _submit(self, data: bytes, spec: InputSpec, allow_raw: bool) -> tuple[Future[Prepared], int]:
        with self._lock:
            return self._executor.submit(_prepare, data, spec, allow_raw), self._generation

    def _restart(self, generation: int, why: str) -> None:
        """Replace the pool, once per failure even when many callers notice it."""
        with self._lock:
            if generation != self._generation:
                return
            log.warning("restarting the parser pool: %s", why)
            old = self._executor
            # ProcessPoolExecutor cannot cancel a running task; killing its workers is the only way to
            # stop a parser stuck in C code.
            for proc in list(getattr(old, "_processes", {}).values()):
                proc.kill()
            old.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
            self._generation += 1

    def warm_up(self) -> None:
        """Start the workers now rather than on the first upload (process start-up is not a parse)."""
        future, _ = self._submit(b"\x7fELF", InputSpec(), True)
        future.result(timeout=120)

    def _failed(self, exc: BaseException, generation: int, attempt: int) -> None:
        """Turn a pool failure into ParserFailed; return normally when the call deserves a retry."""
        if isinstance(exc, TimeoutError):
            self._restart(generation, f"a parse exceeded {self.timeout_s:g} s")
            raise ParserFailed(f"parsing took longer than {self.timeout_s:g} s") from exc
        # A pool broken by *another* input (its generation already replaced) is retried once.
        innocent = generation != self._generation
        self._restart(generation, "a parser process died")
        if attempt == 0 and innocent:
            return
        raise ParserFailed("the parser process died on this input (a crash or its memory limit)") from exc

    def prepare_sync(self, data: bytes, spec: InputSpec, *, allow_raw: bool = False) -> Prepared:
        for attempt in (0, 1):
            future, generation = self._submit(data, spec, allow_raw)
            try:
                return future.result(timeout=self.timeout_s)
            except (TimeoutError, BrokenProcessPool) as exc:
                self._failed(exc, generation, attempt)
        raise ParserFailed("the parser pool failed twice in a row")

    async def prepare(self, data: bytes, spec: InputSpec, *, allow_raw: bool = False) -> Prepared:
        for attempt in (0, 1):
            future, generation = self._submit(data, spec, allow_raw)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
            except (TimeoutError, BrokenProcessPool) as exc:
                self._failed(exc, generation, attempt)
        raise ParserFailed("the parser pool failed twice in a row")

    def worker_pids(self) -> list[int]:
        return [p.pid for p in getattr(self._executor, "_processes", {}).values()]

    def close(self) -> None:
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)
