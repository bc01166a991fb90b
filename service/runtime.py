"""What a running service holds: per collection a gated, folded, warmed-up model and its store.

Start-up order for each configured collection, and why:

1. load the bundle (safetensors + JSON, never unpickled);
2. run the BN health gate on the bundle's own calibration sample: a model whose running statistics are
   unconverged predicts differently in inference than in training, so it is refused and
   ``lookalike serve`` exits with the gate's explanation;
3. only then fold BatchNorm into the convolutions (folding bakes in the statistics the gate vetted);
4. open (or create) the collection pinned to the bundle id, catch its FAISS index up with SQLite;
5. warm up: one embedding pass and one parse in the worker pool, so the first request is not slow.

The model runs frozen in eval mode, so an upload's embedding never depends on other uploads. Inference
is serialised on one thread: two requests computing convolutions at once on two cores would only fight
over them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faiss
import numpy as np

from embedder.bn_gate import check_model
from embedder.bundle import Bundle, load_bundle
from embedder.embed import Embedder
from embedder.errors import LookalikeError
from embedder.fold import fold_batchnorm
from embedder.inputs import Prepared
from service.config import Settings
from service.parser_pool import ParserPool
from service.store import Collection, Store

log = logging.getLogger("lookalike.service")
T = TypeVar("T")


INLINE_SEARCH_MAX = 250_000
"""Collections up to this many vectors are searched on the event loop (see routes/search.py)."""


class GateRefused(LookalikeError):
    """A configured model failed the BN health gate; the service will not serve it."""

    code = "model_unconverged"
    http_status = 503


@dataclass
class Served:
    name: str
    bundle: Bundle
    embedder: Embedder
    collection: Collection
    gate: dict[str, Any]
    warm: bool = False
    inline_search: bool = True  # refreshed by the catch-up loop from the index size

    def refresh(self) -> None:
        self.inline_search = self.collection.index_status().ntotal <= INLINE_SEARCH_MAX


@dataclass
class Runtime:
    settings: Settings
    store: Store | None = None
    pool: ParserPool | None = None
    served: dict[str, Served] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    _infer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "lookalike-infer"))
    # omp_set_num_threads is per thread: a worker thread would search with OpenMP's default (every core)
    # and fight the event loop for the 2 cores (100k: 7.4 ms a search instead of 2.5; docs/benchmarks.md).
    _search: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            2, "lookalike-search", initializer=faiss.omp_set_num_threads, initargs=(1,)
        )
    )
    _stop: threading.Event = field(default_factory=threading.Event)
    _catch_up: threading.Thread | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    def load(self) -> None:
        """Load, gate, fold and open every configured collection; raise on the first refusal."""
        # One query per request: FAISS's OpenMP threads only fight the server's own threads (a flat
        # search at 100k items measured 2.2 ms on one thread, tens of ms with the default on 2 cores).
        faiss.omp_set_num_threads(1)
        self.store = Store(self.settings.store)
        for name, cfg in self.settings.collections.items():
            started = time.perf_counter()
            bundle = load_bundle(cfg.model)
            report = check_model(
                bundle.model, bundle.calibration_x, bundle.calibration_y, model_id=bundle.id
            ).to_dict()
            if not report["passed"]:
                raise GateRefused(gate_explanation(name, str(cfg.model), bundle.id, report))
            embedder = Embedder(bundle, model=fold_batchnorm(bundle.model))
            collection = self.store.open_or_create(name, bundle.id, embedder.dim, index_kind=cfg.index)
            self.served[name] = Served(name, bundle, embedder, collection, report)
            self.served[name].refresh()
            log.info(
                "collection %s: model %s (%s), gate %s, %d items, loaded in %.1f s",
                name,
                bundle.id,
                cfg.model,
                report["verdict"],
                collection.count(),
                time.perf_counter() - started,
            )

    def warm_up(self) -> None:
        self.pool = ParserPool(
            workers=self.settings.parser_workers,
            timeout_s=self.settings.parser_timeout_s,
            memory_mb=self.settings.parser_memory_mb,
        )
        self.pool.warm_up()
        for s in self.served.values():
            s.embedder.embed_arrays(s.bundle.calibration_x[: s.embedder.batch_size])
            s.warm = True

    def start_catch_up(self) -> None:
        """Follow the store: rows written by the batch indexing job become searchable within seconds."""

        def loop() -> None:
            while not self._stop.wait(self.settings.catch_up_interval_s):
                for s in self.served.values():
                    try:
                        s.collection.catch_up()
                        s.refresh()
                    except Exception:  # keep following; the next tick retries
                        log.exception("catch-up of collection %s failed", s.name)

        self._catch_up = threading.Thread(target=loop, name="lookalike-catch-up", daemon=True)
        self._catch_up.start()

    def close(self) -> None:
        self._stop.set()
        if self._catch_up is not None:
            self._catch_up.join(timeout=10)
        for s in self.served.values():
            s.collection.close()
        if self.pool is not None:
            self.pool.close()
        self._infer.shutdown(wait=False)
        self._search.shutdown(wait=False)

    # ------------------------------------------------------------------------------------- serving

    def get(self, name: str) -> Served | None:
        return self.served.get(name)

    async def prepare(self, served: Served, data: bytes) -> Prepared:
        assert self.pool is not None, "warm_up() starts the parser pool"
        return await self.pool.prepare(data, served.embedder.spec)

    async def embed(self, served: Served, array: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._infer, served.embedder.embed_arrays, array[None])
        return out[0]

    async def search_in_thread(self, run: Callable[[], T]) -> T:
        """``run`` (a FAISS search) on a worker thread with one OpenMP thread, like the event loop's."""
        return await asyncio.get_running_loop().run_in_executor(self._search, run)

    def readiness(self) -> dict[str, Any]:
        collections = {}
        for name in self.settings.collections:
            s = self.served.get(name)
            if s is None:
                collections[name] = {"ready": False, "reason": self.problems.get(name, "not loaded")}
                continue
            status = s.collection.index_status()
            collections[name] = {
                "ready": s.warm and status.caught_up,
                "model": s.bundle.id,
                "gate": s.gate["verdict"],
                "warm": s.warm,
                "index_caught_up": status.caught_up,
            }
        ready = self.pool is not None and all(c["ready"] for c in collections.values())
        return {"ready": ready, "collections": collections}


def gate_explanation(name: str, path: str, model_id: str, report: dict[str, Any]) -> str:
    lines = [
        f"collection {name!r}: model {model_id} ({path}) failed the BN health gate: {report['verdict']}",
        *(f"  - {r}" for r in report.get("reasons", [])),
        f"  repair it with: lookalike recalibrate {path} --out {path}-recalibrated",
    ]
    return "\n".join(lines)
