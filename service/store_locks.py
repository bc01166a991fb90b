"""The two locks of the vector store: an in-process reader/writer lock around the FAISS index, and the
cross-process writer lock (flock) around SQLite write transactions."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from service.store_errors import WriterBusy


class RWLock:
    """Many readers (searches) or one writer (catch-up) at a time.

    FAISS searches are const and release the GIL, so they may run in parallel; adding or removing vectors
    may not run alongside them. Writers are preferred: once one waits, new readers queue behind it, so a
    steady stream of searches cannot starve catch-up. Not reentrant.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    # Plain acquire/release for the search path: a generator-based context manager costs more than the
    # lock itself there.
    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class FileLock:
    """Exclusive `flock` on a lock file, held for the duration of one write transaction.

    A second writer (another process, or another Collection object on the same directory) waits up to
    ``timeout`` seconds and then gets `WriterBusy`. Holding it per transaction rather than per process
    lets the batch job and the API interleave their writes. flock locks belong to the open file
    description, so every acquisition opens its own descriptor.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.timeout
            pause = 0.002
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise WriterBusy(
                            f"another writer has held {self.path} for over {self.timeout:g} s; wait for it "
                            f"to finish (e.g. a running `lookalike index`) or raise lock_timeout"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
