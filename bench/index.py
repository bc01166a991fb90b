"""Indexing throughput next to plain reading and plain embedding, and store search next to raw FAISS.

    .venv/bin/python -m bench.index [--roots /usr/bin,/usr/lib] [--model BUNDLE] [--sizes 10000,100000]

Part 1, on the ELF/PE files under the roots, in one run (the page cache is warmed first, so every rate
below reads from memory; cold-disk reading would only add to all of them):
  * read:   read every file (no hashing, no parsing);
  * embed:  the model on already-preprocessed arrays, batches of 64;
  * index:  the real batch job (hash, parse, preprocess in workers; embed; write) into a fresh store,
            with the job's own breakdown of where the time went.
Part 2: single-query search latency of ``Collection.search`` against ``index.search`` on the same FAISS
index kind over the same random unit vectors (dim 128, k 10, one OpenMP thread for both), at each size.

Without ``--model`` a gate-passing model with random weights and the architecture `lookalike train` ships
for executables is used: speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from bench.common import random_gated_bundle, shipped_config
from embedder.bn_gate import check_model
from embedder.bundle import load_bundle
from embedder.dataspec import load_data
from embedder.embed import Embedder
from embedder.fold import fold_batchnorm
from service.indexer import index_files
from service.store import NewItem, Store
from training.debian import find_executables


def _read_all(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with p.open("rb") as f:
            total += len(f.read())
    return total


def bench_indexing(roots: list[Path], bundle_path: Path, tmp: Path, max_mb: float) -> dict[str, object]:
    paths = sorted(p for p in find_executables(roots) if p.stat().st_size <= max_mb * 1024 * 1024)
    bundle = load_bundle(bundle_path)
    assert check_model(bundle.model, bundle.calibration_x, bundle.calibration_y).passed
    embedder = Embedder(bundle, model=fold_batchnorm(bundle.model))

    _read_all(paths)  # warm the page cache so the three rates compare work, not disk
    t = time.perf_counter()
    nbytes = _read_all(paths)
    read_s = time.perf_counter() - t

    manifest = tmp / "files.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in paths))
    data = load_data(str(manifest), bundle.input_spec, progress=False)
    t = time.perf_counter()
    embedder.embed_arrays(data.x)
    embed_s = time.perf_counter() - t

    collection = Store(tmp / "store").open_or_create("bench", bundle.id, embedder.dim)
    report = index_files(collection, embedder, [(p, p.parent.name) for p in paths])
    collection.close()
    mb = nbytes / 1e6
    return {
        "files": len(paths),
        "mb": round(mb, 1),
        "read": {
            "s": round(read_s, 2),
            "files_per_s": round(len(paths) / read_s, 1),
            "mb_per_s": round(mb / read_s, 1),
        },
        "embed_only": {
            "s": round(embed_s, 2),
            "files_per_s": round(len(data.x) / embed_s, 1),
            "n": len(data.x),
        },
        "index": {
            "s": round(report.wall_s, 2),
            "files_per_s": round(len(paths) / report.wall_s, 1),
            "mb_per_s": round(mb / report.wall_s, 1),
            "outcomes": dict(report.outcomes),
            "busy_s": {k: round(v, 2) for k, v in report.seconds.items()},
        },
    }


def bench_search(n: int, tmp: Path, queries: int = 500, k: int = 10) -> dict[str, float]:
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(n)
    xb = rng.standard_normal((n, 128)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((queries, 128)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    collection = Store(tmp / f"search{n}").open_or_create("bench", "0" * 16, 128)
    for start in range(0, n, 20_000):
        collection.add_many(
            [
                NewItem(sha256=f"{i:064x}", vector=xb[i], name=str(i))
                for i in range(start, min(n, start + 20_000))
            ]
        )
    raw = faiss.IndexFlatIP(128)
    raw.add(xb)
    raw_t, store_t = [], []
    for q in xq:  # interleaved, so both see the same machine state
        t = time.perf_counter()
        raw.search(q[None], k)
        raw_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        collection.search(q[None], k)
        store_t.append(time.perf_counter() - t)
    collection.close(snapshot=False)
    raw_ms, store_ms = statistics.median(raw_t) * 1000, statistics.median(store_t) * 1000
    return {
        "raw_p50_ms": round(raw_ms, 3),
        "store_p50_ms": round(store_ms, 3),
        "ratio": round(store_ms / raw_ms, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roots", default="/usr/bin,/usr/lib")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--max-mb", type=float, default=64)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--skip-indexing", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    out: dict[str, object] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if not args.skip_indexing:
            cfg, spec = shipped_config("executable")
            bundle = args.model or random_gated_bundle(tmp / "model", spec=spec, cfg=cfg)
            out["indexing"] = bench_indexing(
                [Path(r) for r in args.roots.split(",")], bundle, tmp, args.max_mb
            )
        out["search"] = {str(n): bench_search(n, tmp) for n in map(int, args.sizes.split(","))}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if "indexing" in out:
        r = out["indexing"]
        print(f"{r['files']} files, {r['mb']} MB under {args.roots} (page cache warm)")
        print(f"  read only : {r['read']['files_per_s']:>8} files/s {r['read']['mb_per_s']:>8} MB/s")
        print(f"  embed only: {r['embed_only']['files_per_s']:>8} files/s (preprocessed arrays, batch 64)")
        i = r["index"]
        print(
            f"  index     : {i['files_per_s']:>8} files/s {i['mb_per_s']:>8} MB/s in {i['s']} s; "
            f"{i['outcomes']}"
        )
        print(f"  index time: {i['busy_s']} (read, preprocess: summed over worker processes)")
        print(
            f"  index / read = {i['files_per_s'] / r['read']['files_per_s']:.3f}, "
            f"index / embed = {i['files_per_s'] / r['embed_only']['files_per_s']:.3f} (files/s ratios)"
        )
    for n, s in out["search"].items():  # type: ignore[union-attr]
        print(
            f"search at {n:>7} items: raw FAISS p50 {s['raw_p50_ms']} ms, store p50 {s['store_p50_ms']} ms, "
            f"ratio {s['ratio']}"
        )


if __name__ == "__main__":
    main()
