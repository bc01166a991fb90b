"""Service latency against a raw FAISS call on the same vectors, measured in one run.

    .venv/bin/python -m bench.service [--sizes 10000,100000] [--clients 1,4,16] [--requests 400] [--json]

For each collection size N: a store collection of N random unit vectors (dim 128) behind a real
`lookalike serve` on loopback; `/search` by vector with 1, 4 and 16 concurrent clients (p50, p99,
requests/s, errors) next to the median of a raw ``faiss.IndexFlatIP.search`` of one query over the same
vectors in this process. Then `/embed` latency for an executable of about 1 MB.

The clients are threads of this process (one keep-alive httpx connection each) on the same 2 cores as
the server, so their own work is in every latency and requests/s at 16 clients is a floor for what a
separate client machine would see.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import faiss
import httpx
import numpy as np

from bench.common import random_gated_bundle
from embedder.bundle import load_bundle
from service.launch import serving
from service.store import NewItem, Store

DIM = 128


def _fill(store_dir: Path, model_id: str, xb: np.ndarray) -> None:
    collection = Store(store_dir).open_or_create("bench", model_id, DIM)
    for start in range(0, len(xb), 10_000):
        collection.add_many(
            [
                NewItem(sha256=f"{i:064x}", vector=xb[i], name=f"item{i}")
                for i in range(start, min(start + 10_000, len(xb)))
            ]
        )
    collection.close()


def _raw_faiss_p50(xb: np.ndarray, xq: np.ndarray, k: int) -> float:
    faiss.omp_set_num_threads(1)  # as the server runs it: one query per call, no OpenMP fan-out
    index = faiss.IndexFlatIP(DIM)
    index.add(xb)
    times = []
    for q in xq:
        t = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _load(url: str, xq: np.ndarray, clients: int, requests: int, k: int) -> dict[str, float]:
    """``clients`` threads, each with its own keep-alive connection, sending requests back to back."""
    per_client = max(1, requests // clients)
    bodies = [
        json.dumps({"collection": "bench", "vector": q.tolist(), "k": k}).encode()
        for q in xq[: max(per_client, 50)]
    ]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        nonlocal errors
        mine, bad = [], 0
        with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as http:
            http.post(f"{url}/search", content=bodies[0])  # connect and warm up, not counted
            start_line.wait()
            for i in range(per_client):
                t = time.perf_counter()
                r = http.post(f"{url}/search", content=bodies[(c + i) % len(bodies)])
                mine.append(time.perf_counter() - t)
                bad += r.status_code != 200
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start_line.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "rps": round(len(ms) / elapsed, 1),
        "errors": errors,
        "requests": len(ms),
    }


def _embed_latency(url: str, path: Path, n: int = 20) -> dict[str, float]:
    data = path.read_bytes()
    times = []
    with httpx.Client(timeout=60) as http:
        for i in range(n + 2):
            t = time.perf_counter()
            r = http.post(f"{url}/embed", files={"file": (path.name, data)}, data={"collection": "bench"})
            if i >= 2:
                times.append(time.perf_counter() - t)
            r.raise_for_status()
    ms = np.array(times) * 1000
    return {
        "file": str(path),
        "bytes": len(data),
        "p50_ms": round(float(np.median(ms)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def _one_mb_executable() -> Path:
    candidates = [p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink()]
    return min(candidates, key=lambda p: abs(p.stat().st_size - 1_000_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    results: dict[str, object] = {"k": args.k, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = random_gated_bundle(root / "model")
        model_id = load_bundle(bundle).id
        for n in map(int, args.sizes.split(",")):
            xb = rng.standard_normal((n, DIM)).astype(np.float32)
            xb /= np.linalg.norm(xb, axis=1, keepdims=True)
            xq = rng.standard_normal((200, DIM)).astype(np.float32)
            xq /= np.linalg.norm(xq, axis=1, keepdims=True)
            store = root / f"store{n}"
            _fill(store, model_id, xb)
            config = root / f"bench{n}.toml"
            config.write_text(
                f'store = "{store}"\napi_keys = ["bench-key-123"]\n[collections.bench]\nmodel = "{bundle}"\n'
            )
            raw = _raw_faiss_p50(xb, xq, args.k)
            row: dict[str, object] = {"raw_faiss_p50_ms": round(raw, 3)}
            with serving(config) as url:
                for c in map(int, args.clients.split(",")):
                    r = _load(url, xq, c, args.requests, args.k)
                    r["p50_minus_raw_ms"] = round(r["p50_ms"] - raw, 3)
                    row[f"clients{c}"] = r
                if n == max(map(int, args.sizes.split(","))):
                    results["embed"] = _embed_latency(url, _one_mb_executable())
            results["sizes"][str(n)] = row  # type: ignore[index]

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"/search by vector, k={args.k}, dim {DIM}, flat index; clients share the server's 2 cores")
    print(
        f"{'items':>8} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6} "
        f"{'raw FAISS p50':>14} {'p50 - raw':>10}"
    )
    for n, row in results["sizes"].items():  # type: ignore[union-attr]
        for key, r in row.items():
            if not key.startswith("clients"):
                continue
            print(
                f"{n:>8} {key[7:]:>7} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['rps']:>8} {r['errors']:>6} "
                f"{row['raw_faiss_p50_ms']:>14} {r['p50_minus_raw_ms']:>10}"
            )
    e = results.get("embed")
    if e:
        print(f"/embed of {e['file']} ({e['bytes']} bytes): p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms")


if __name__ == "__main__":
    main()
