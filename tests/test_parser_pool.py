"""Untrusted parsing in limited worker processes: slow, greedy or killed parsers never harm the caller."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import pytest

from embedder.errors import NotAnExecutable, ParserFailed
from embedder.inputs import InputSpec, prepare
from service.parser_pool import ParserPool

EXE = InputSpec()
BIGRAM = InputSpec(representation="bigram")


@pytest.fixture(scope="module")
def pool():
    p = ParserPool(workers=2, timeout_s=20, memory_mb=1024)
    p.warm_up()
    yield p
    p.close()


def test_results_equal_the_in_process_path(pool, elf_path):
    data = elf_path.read_bytes()
    got = pool.prepare_sync(data, EXE)
    assert np.array_equal(got.array, prepare(data, EXE).array) and got.format == "ELF"
    got_async = asyncio.run(pool.prepare(data, EXE))
    assert np.array_equal(got_async.array, got.array)


def test_typed_input_errors_come_back_typed(pool):
    with pytest.raises(NotAnExecutable):
        pool.prepare_sync(b"just text", EXE)


def test_timeout_kills_and_replaces_the_workers(elf_path):
    pool = ParserPool(workers=1, timeout_s=0.05)
    try:
        pool.warm_up()
        before = pool.worker_pids()
        big = os.urandom(48 * 1024 * 1024)  # a bigram of 48 MB takes far longer than 50 ms
        with pytest.raises(ParserFailed, match="longer than"):
            pool.prepare_sync(big, BIGRAM, allow_raw=True)
        pool.timeout_s = 20
        assert pool.prepare_sync(elf_path.read_bytes(), EXE).format == "ELF"
        assert set(pool.worker_pids()).isdisjoint(before)
    finally:
        pool.close()


def test_memory_limit_turns_into_a_typed_error(elf_path):
    pool = ParserPool(workers=1, timeout_s=30, memory_mb=260)  # ~215 MB is the idle worker
    try:
        pool.warm_up()
        with pytest.raises(ParserFailed, match="memory"):
            pool.prepare_sync(os.urandom(60 * 1024 * 1024), EXE, allow_raw=True)
        assert pool.prepare_sync(elf_path.read_bytes(), EXE).format == "ELF"
    finally:
        pool.close()


def test_a_killed_worker_fails_only_its_call(elf_path):
    pool = ParserPool(workers=1, timeout_s=30)
    try:
        pool.warm_up()
        pid = pool.worker_pids()[0]
        big = os.urandom(40 * 1024 * 1024)
        threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(ParserFailed, match="died"):
            pool.prepare_sync(big, BIGRAM, allow_raw=True)
        assert time.monotonic() - started < 30
        assert pool.prepare_sync(elf_path.read_bytes(), EXE).format == "ELF"
    finally:
        pool.close()
