"""Retrieval benchmark: the embedded store's FAISS indexes on clustered synthetic embeddings.

For each size: build time, memory, single-query and batched queries/s, and recall@10 of HNSW at several
``ef_search`` against exact search (``service.collections.faiss_index.FaissIndex``, the code the
gateway searches with). Then, once, the whole embedded store (SQLite + index) at ``--store-size``:
ingest rate with durable commits, and the time to reopen it (exact: rebuilt from SQLite; HNSW: the saved
graph loaded).

    python bench/retrieval.py                         # 100k and 1M vectors of dimension 384
    python bench/retrieval.py --sizes 100000 --ef-search 32 64 96

Data: unit vectors around ``--clusters`` random centres, Gaussian noise of norm ``--noise`` (relative to
the unit centres; 1.0 makes neighbouring clusters overlap, which is harder for ANN than separated
blobs); queries are held-out points of the same distribution.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import faiss
import numpy as np

from service.collections import IndexConfig, Item
from service.collections.embedded import EmbeddedStore
from service.collections.faiss_index import FaissIndex

CHUNK = 50_000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def release_memory() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def clustered(count: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    """``(count, dim)`` float32 unit vectors: a random centre each plus noise of norm ~``noise``."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        block = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim), dtype=np.float32) * (
            noise / np.sqrt(dim))
        out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build(config: IndexConfig, vectors: np.ndarray) -> tuple[FaissIndex, float, float]:
    release_memory()
    before, started = rss_mb(), time.perf_counter()
    index = FaissIndex(vectors.shape[1], config)
    for start in range(0, len(vectors), CHUNK):
        index.add(np.arange(start + 1, start + 1 + len(vectors[start:start + CHUNK]), dtype=np.int64),
                  vectors[start:start + CHUNK])
    return index, time.perf_counter() - started, rss_mb() - before


def queries_per_second(index: FaissIndex, queries: np.ndarray, batch: int, k: int = 10) -> float:
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start:start + batch], k)
    return len(queries) / (time.perf_counter() - started)


def top10(index: FaissIndex, queries: np.ndarray) -> np.ndarray:
    return np.array([[key for key, _ in row] for row in index.search(queries, 10)])


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))


def bench_size(size: int, args) -> list[tuple]:
    vectors = clustered(size, args.dim, args.clusters, args.noise, seed=1)
    queries = clustered(args.queries, args.dim, args.clusters, args.noise, seed=2)
    single = queries[:args.single_queries]
    rows = []

    exact, seconds, memory = build(IndexConfig("exact"), vectors)
    truth = top10(exact, queries)
    rows.append((size, "exact", seconds, memory, queries_per_second(exact, single, 1),
                 queries_per_second(exact, queries, args.batch), 1.0))
    print(f"  {size:>9,} exact built", flush=True)
    del exact

    config = IndexConfig("hnsw", m=args.m, ef_construction=args.ef_construction)
    graph, seconds, memory = build(config, vectors)
    print(f"  {size:>9,} hnsw{args.m} built in {seconds:.0f} s", flush=True)
    for ef in args.ef_search:
        graph.config = replace(config, ef_search=ef)
        rows.append((size, f"hnsw{args.m} ef_search={ef}", seconds, memory, queries_per_second(graph, single, 1),
                     queries_per_second(graph, queries, args.batch), recall_at_10(top10(graph, queries), truth)))
    return rows


def bench_store(size: int, args) -> list[tuple]:
    """The embedded store end to end: durable ingest and reopening, per index kind."""
    vectors = clustered(size, args.dim, args.clusters, args.noise, seed=3)
    rows = []
    for kind in ("exact", "hnsw"):
        folder = Path(tempfile.mkdtemp(prefix="dinoserve-bench-", dir=args.tmp))
        try:
            store = EmbeddedStore(folder)
            store.create_collection("bench", "bench", args.dim, IndexConfig(kind))
            started = time.perf_counter()
            for start in range(0, size, args.store_batch):
                store.upsert("bench", [Item(f"item-{start + i}", v, "label", {"n": start + i})
                                       for i, v in enumerate(vectors[start:start + args.store_batch])])
            ingest = size / (time.perf_counter() - started)
            store.close()  # saves the HNSW graph
            started = time.perf_counter()
            EmbeddedStore(folder).close()
            rows.append((size, kind, ingest, time.perf_counter() - started,
                         sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=384, help="ViT-S/16's embedding size")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to the unit centres")
    parser.add_argument("--queries", type=int, default=1000, help="batched queries, also for recall")
    parser.add_argument("--single-queries", type=int, default=200, help="queries sent one at a time")
    parser.add_argument("--batch", type=int, default=64, help="queries per call when batched")
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 96, 128])
    parser.add_argument("--store-size", type=int, default=100_000, help="0 skips the store benchmark")
    parser.add_argument("--store-batch", type=int, default=1000, help="items per durable write")
    parser.add_argument("--tmp", default=None, help="directory for the store benchmark (default: system temp)")
    args = parser.parse_args()

    print(f"{date.today()}, {platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()} threads, "
          f"faiss {faiss.__version__}, dim {args.dim}, {args.clusters} clusters, noise {args.noise}, "
          f"{args.queries} queries (k = 10), batches of {args.batch}", flush=True)
    rows = [row for size in args.sizes for row in bench_size(size, args)]
    print("\n| vectors | index | build (s) | memory (MB) | single queries/s | batched queries/s | recall@10 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size, name, seconds, memory, single, batched, recall in rows:
        print(f"| {size:,} | {name} | {seconds:.1f} | {memory:,.0f} | {single:,.0f} | {batched:,.0f} | {recall:.3f} |")
    if args.store_size:
        print(f"\n| items | store index | durable ingest (items/s, {args.store_batch} per write) | reopen (s) | "
              f"on disk (MB) |")
        print("|---:|---|---:|---:|---:|")
        for size, kind, ingest, reopen, disk in bench_store(args.store_size, args):
            print(f"| {size:,} | {kind} | {ingest:,.0f} | {reopen:.1f} | {disk:,.0f} |")


if __name__ == "__main__":
    main()
