"""Service latency against a raw FAISS call on the same vectors, measured in one run.

    .venv/bin/python -m bench.service [--sizes 10000,100000] [--clients 1,4,16] [--requests 800] [--json]

For each collection size N: a store collection of N random unit vectors (dim 128) behind a real
`lookalike serve` on loopback; `/search` by vector with 1, 4 and 16 concurrent clients (p50, p99,
requests/s, errors) next to the median of a raw ``faiss.IndexFlatIP.search`` of one query over the same
vectors in this process, timed just before and just after the clients run. Then `/embed` latency for an
executable of about 1 MB.

Each client is a separate process with one keep-alive connection: a plain socket that sends prebuilt
request bytes and reads the status line, Content-Length and body, about 20 us of Python per request, so
the latency is the server's and the loopback's rather than an HTTP library's (httpx threads in this
process, the earlier client, added ~0.5-1 ms per request and their GIL contention). The clients still
share the 2 cores with the server, so requests/s at 16 clients is a floor for what a separate client
machine would see. Client processes are spawned and import only this module's light top: the heavy
imports (faiss, torch, the service) are inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DIM = 128
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_TOOK_MS = re.compile(rb'"took_ms":\s*([0-9.eE+-]+)')
_WARM_UP = 5  # requests per client before the clock starts: connection set-up, first-touch costs


def _fill(store_dir: Path, model_id: str, xb: np.ndarray) -> None:
    from service.store import NewItem, Store

    collection = Store(store_dir).open_or_create("bench", model_id, DIM)
    for start in range(0, len(xb), 10_000):
        collection.add_many(
            [
                NewItem(sha256=f"{i:064x}", vector=xb[i], name=f"item{i}")
                for i in range(start, min(start + 10_000, len(xb)))
            ]
        )
    collection.close()


def _raw_faiss_ms(xb: np.ndarray) -> Callable[[np.ndarray, int], list[float]]:
    """A raw ``IndexFlatIP`` over ``xb``; the returned function times one search per query row (ms)."""
    import faiss

    faiss.omp_set_num_threads(1)  # as the server runs it: one query per call, no OpenMP fan-out
    index = faiss.IndexFlatIP(DIM)
    index.add(xb)

    def timed(xq: np.ndarray, k: int) -> list[float]:
        times = []
        for q in xq:
            t = time.perf_counter()
            index.search(q[None], k)
            times.append((time.perf_counter() - t) * 1000)
        return times

    return timed


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one request and read its whole response: (HTTP status, body)."""
    sock.sendall(request)
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        data += _recv(sock)
    length = _CONTENT_LENGTH.search(data, 0, end + 2)
    body = data[end + 4 :]
    while len(body) < (int(length.group(1)) if length else 0):
        body += _recv(sock)
    return int(data[9:12]), body


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    return chunk


def _client(port: int, requests: list[bytes], n: int, start_line, results) -> None:
    """One client process: ``n`` requests back to back on one connection, after the start line.

    Besides each round trip it keeps the ``took_ms`` the server reports (its handler, FAISS included), so
    the time outside the handler (HTTP, event loop, loopback, this client) can be told apart.
    """
    latencies, took, errors, sock = [], [], 0, None
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(_WARM_UP):
            _exchange(sock, requests[i % len(requests)])
        start_line.wait()
        for i in range(n):
            t = time.perf_counter_ns()
            status, body = _exchange(sock, requests[i % len(requests)])
            latencies.append(time.perf_counter_ns() - t)
            if status == 200:
                took.append(float(_TOOK_MS.search(body).group(1)))
            else:
                errors += 1
    except (OSError, ValueError, AttributeError, threading.BrokenBarrierError):
        errors += n - len(latencies)  # a dropped connection fails every request it did not complete
    finally:
        if sock is not None:
            sock.close()
    # perf_counter is CLOCK_MONOTONIC on Linux, the same clock in every process: the parent takes the
    # last client's finish as the end of the run.
    results.put((latencies, took, errors, time.perf_counter()))


def _load(port: int, xq: np.ndarray, clients: int, requests: int, k: int) -> dict[str, float]:
    """``clients`` processes, each with its own keep-alive connection, sending requests back to back."""
    per_client = max(1, requests // clients)
    bodies = [
        json.dumps({"collection": "bench", "vector": q.tolist(), "k": k}).encode()
        for q in xq[: max(per_client, 50)]
    ]
    head = f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    raw = [f"{head}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    ctx = mp.get_context("spawn")
    start_line, results = ctx.Barrier(clients + 1, timeout=120), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(port, raw[c:] + raw[:c], per_client, start_line, results))
        for c in range(clients)
    ]
    for p in procs:
        p.start()
    start_line.wait()
    started = time.perf_counter()
    latencies: list[int] = []
    took: list[float] = []
    errors, finished = 0, started
    for _ in procs:
        mine, mine_took, bad, end = results.get(timeout=600)
        latencies += mine
        took += mine_took
        errors += bad
        finished = max(finished, end)
    for p in procs:
        p.join()
    ms = np.array(latencies) / 1e6
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3) if len(ms) else float("nan"),
        "p99_ms": round(float(np.percentile(ms, 99)), 3) if len(ms) else float("nan"),
        "took_ms_p50": round(statistics.median(took), 3) if took else float("nan"),
        "rps": round(len(ms) / (finished - started), 1),
        "errors": errors,
        "requests": len(ms),
    }


def _embed_latency(url: str, path: Path, n: int = 20) -> dict[str, float]:
    import httpx

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
    ap.add_argument("--requests", type=int, default=800, help="per size and client count")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bench.common import random_gated_bundle
    from embedder.bundle import load_bundle
    from service.launch import serving

    sizes = [int(n) for n in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    rng = np.random.default_rng(0)
    results: dict[str, object] = {"k": args.k, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = random_gated_bundle(root / "model")
        model_id = load_bundle(bundle).id
        for n in sizes:
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
            raw_ms = _raw_faiss_ms(xb)
            with serving(config) as url:
                # The raw call is timed just before and just after the clients run, with the server up and
                # idle: memory bandwidth on this shared machine drifts, and the gap should not.
                before = raw_ms(xq, args.k)
                loads = {c: _load(int(url.rsplit(":", 1)[1]), xq, c, args.requests, args.k) for c in clients}
                after = raw_ms(xq, args.k)
                if n == max(sizes):
                    results["embed"] = _embed_latency(url, _one_mb_executable())
            raw = statistics.median(before + after)
            row: dict[str, object] = {
                "raw_faiss_p50_ms": round(raw, 3),
                "raw_faiss_p50_before_after_ms": [round(statistics.median(t), 3) for t in (before, after)],
            }
            for c, r in loads.items():
                row[f"clients{c}"] = r | {"p50_minus_raw_ms": round(r["p50_ms"] - raw, 3)}
            results["sizes"][str(n)] = row  # type: ignore[index]

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"/search by vector, k={args.k}, dim {DIM}, flat index; "
        "clients are socket processes sharing the server's 2 cores"
    )
    print(
        f"{'items':>8} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6} "
        f"{'handler p50':>11} {'raw FAISS p50':>14} {'p50 - raw':>10}"
    )
    for n, row in results["sizes"].items():  # type: ignore[union-attr]
        before, after = row["raw_faiss_p50_before_after_ms"]
        print(f"{n:>8} raw FAISS p50 {before} ms before the clients ran, {after} ms after")
        for key, r in row.items():
            if not key.startswith("clients"):
                continue
            print(
                f"{n:>8} {key[7:]:>7} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['rps']:>8} {r['errors']:>6} "
                f"{r['took_ms_p50']:>11} {row['raw_faiss_p50_ms']:>14} {r['p50_minus_raw_ms']:>10}"
            )
    print("handler p50: the took_ms the server reports (its handler, FAISS included); the rest of p50 is")
    print("HTTP, the event loop, loopback TCP and the client")
    e = results.get("embed")
    if e:
        print(f"/embed of {e['file']} ({e['bytes']} bytes): p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms")


if __name__ == "__main__":
    main()
