"""The default store: SQLite (the source of truth) and a FAISS index per collection, in one directory.

Durability first. Every write is one SQLite transaction in WAL mode with ``synchronous=FULL``: the WAL
is fsynced before ``COMMIT`` returns, so an acknowledged write survives a killed process and a power
cut (``NORMAL`` would survive only the first). A request's items commit together or not at all. The
in-memory index is applied after the commit; when the process dies in between, opening the store
catches the index up from SQLite:

- ``exact`` collections are rebuilt from their rows (about as fast as reading a saved index);
- ``hnsw`` collections load their last saved graph (written on close, and after a rebuild or a long
  catch-up, as ``indexes/<uid>-<watermark>.faiss``), drop the keys SQLite no longer has, and add the
  rows above the watermark (row keys only grow: ``AUTOINCREMENT``, and an upsert writes a new row).

One process owns a directory at a time (an exclusive ``flock`` on ``LOCK``), because each process keeps
its own index in memory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import ApiError
from .base import (
    CollectionInfo, Hit, IndexConfig, Item, ItemFilter, ItemPage, UpsertResult, VectorStore, check_name,
    collection_exists, collection_not_found, item_not_found, normalized,
)
from .faiss_index import COMPACT_FRACTION, FaissIndex

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    model TEXT NOT NULL,
    dim INTEGER NOT NULL,
    metric TEXT NOT NULL,
    index_config TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    label TEXT,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (collection, id)
);
CREATE INDEX IF NOT EXISTS items_by_collection ON items (collection);
CREATE INDEX IF NOT EXISTS items_by_label ON items (collection, label);
"""
LOAD_CHUNK = 20_000  # rows per read while (re)building an index
SQL_VARIABLES = 900  # keys per "IN (...)" query
SNAPSHOT_AFTER = 50_000  # rows caught up at start beyond which the HNSW graph is saved again


@dataclass
class _Collection:
    info: CollectionInfo
    uid: str
    index: FaissIndex
    lock: threading.Lock
    dirty: bool = False  # changed since the saved graph


def _dumps(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


class EmbeddedStore(VectorStore):
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        (self.directory / "indexes").mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / "LOCK", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"{self.directory} is in use by another dinoserve process") from None
        self._db = self.directory / "collections.sqlite3"
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("PRAGMA synchronous=FULL")
        self._writer.executescript(SCHEMA)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._collections: dict[str, _Collection] = {}
        for name, uid, model, dim, metric, config, created in self._writer.execute(
                "SELECT name, uid, model, dim, metric, index_config, created_at FROM collections ORDER BY name"):
            info = CollectionInfo(name, model, dim, IndexConfig.from_dict(json.loads(config)), created, metric=metric)
            self._collections[name] = _Collection(info, uid, self._open_index(info, uid), threading.Lock())

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            conn.execute("PRAGMA query_only=1")
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction; the caller holds ``_write_lock``."""
        try:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ApiError(503, "storage_error", f"the collection store could not write: {exc}") from None

    # Index (re)building ------------------------------------------------------------------------------

    def _snapshots(self, uid: str) -> list[tuple[int, Path]]:
        found = []
        for path in (self.directory / "indexes").glob(f"{uid}-*.faiss"):
            watermark = path.stem.rsplit("-", 1)[1]
            if watermark.isdigit():
                found.append((int(watermark), path))
        return sorted(found)

    def _save_snapshot(self, collection: _Collection) -> None:
        index = collection.index
        target = self.directory / "indexes" / f"{collection.uid}-{index.watermark}.faiss"
        partial = target.with_suffix(".partial")
        index.save(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
        for _, old in self._snapshots(collection.uid):
            if old != target:
                old.unlink(missing_ok=True)
        collection.dirty = False

    def _add_rows(self, index: FaissIndex, name: str, after: int) -> int:
        """Add the collection's rows with a key above ``after`` to ``index``; how many."""
        added = 0
        cursor = self._writer.execute(
            "SELECT key, vector FROM items WHERE collection = ? AND key > ? ORDER BY key", (name, after))
        while rows := cursor.fetchmany(LOAD_CHUNK):
            index.add(np.array([r[0] for r in rows], dtype=np.int64), np.stack([_vector(r[1]) for r in rows]))
            added += len(rows)
        return added

    def _open_index(self, info: CollectionInfo, uid: str) -> FaissIndex:
        index = None
        if info.index.kind == "hnsw" and (snapshots := self._snapshots(uid)):
            try:
                index = FaissIndex.load(snapshots[-1][1], info.dim, info.index)
            except (RuntimeError, ValueError) as exc:
                log.warning("collection %s: saved index %s is unreadable (%s); rebuilding", info.name,
                            snapshots[-1][1], exc)
        changed = index is None
        if index is None:
            index = FaissIndex(info.dim, info.index)
        else:
            live = np.array([r[0] for r in self._writer.execute(
                "SELECT key FROM items WHERE collection = ? AND key <= ?", (info.name, index.watermark))],
                dtype=np.int64)
            stale = np.setdiff1d(index.keys(), live)
            index.remove(stale)
            changed = len(stale) > 0
        added = self._add_rows(index, info.name, index.watermark)
        if index.tombstones > COMPACT_FRACTION * (len(index) + index.tombstones):
            log.info("collection %s: %d of its graph's nodes are deleted; rebuilding", info.name, index.tombstones)
            index = FaissIndex(info.dim, info.index)
            added = self._add_rows(index, info.name, 0)
            changed = True
        log.info("collection %s: %d items in its %s index (%d rows read from SQLite)", info.name, len(index),
                 info.index.kind, added)
        if info.index.kind == "hnsw" and (changed or added > SNAPSHOT_AFTER):
            self._save_snapshot(_Collection(info, uid, index, threading.Lock()))
        return index

    # Collections -------------------------------------------------------------------------------------

    def _collection(self, name: str) -> _Collection:
        collection = self._collections.get(name)
        if collection is None:
            raise collection_not_found(name)
        return collection

    def create_collection(self, name: str, model: str, dim: int, index: IndexConfig) -> CollectionInfo:
        check_name(name)
        with self._write_lock:
            if name in self._collections:
                raise collection_exists(name)
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            info = CollectionInfo(name, model, dim, index, created)
            uid = uuid.uuid4().hex
            with self._transaction() as db:
                db.execute("INSERT INTO collections VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (name, uid, model, dim, info.metric, json.dumps(index.to_dict()), created))
            self._collections[name] = _Collection(info, uid, FaissIndex(dim, index), threading.Lock())
        return info

    def list_collections(self) -> list[CollectionInfo]:
        return [self.describe(name) for name in sorted(self._collections)]

    def describe(self, name: str) -> CollectionInfo:
        collection = self._collection(name)
        return replace(collection.info, count=len(collection.index))

    def drop_collection(self, name: str) -> None:
        with self._write_lock:
            collection = self._collection(name)
            with self._transaction() as db:
                db.execute("DELETE FROM items WHERE collection = ?", (name,))
                db.execute("DELETE FROM collections WHERE name = ?", (name,))
            with collection.lock:
                del self._collections[name]
            for _, path in self._snapshots(collection.uid):
                path.unlink(missing_ok=True)

    # Items -------------------------------------------------------------------------------------------

    def upsert(self, name: str, items: list[Item]) -> UpsertResult:
        collection = self._collection(name)
        vectors = normalized(np.stack([item.vector for item in items]), collection.info.dim)
        added = updated = unchanged = 0
        new: dict[int, np.ndarray] = {}  # key -> vector, in key order
        removed = []
        with self._write_lock:
            if self._collections.get(name) is not collection:  # dropped meanwhile
                raise collection_not_found(name)
            with self._transaction() as db:
                for item, vector in zip(items, vectors):
                    blob, metadata = vector.astype("<f4").tobytes(), _dumps(item.metadata)
                    row = db.execute("SELECT key, label, metadata, vector FROM items WHERE collection = ? AND id = ?",
                                     (name, item.id)).fetchone()
                    if row is not None and (row[1], row[2], row[3]) == (item.label, metadata, blob):
                        unchanged += 1
                        continue
                    if row is None:
                        added += 1
                    else:
                        updated += 1
                        db.execute("DELETE FROM items WHERE key = ?", (row[0],))
                        removed.append(row[0])
                    key = db.execute(
                        "INSERT INTO items (collection, id, label, metadata, vector) VALUES (?, ?, ?, ?, ?)",
                        (name, item.id, item.label, metadata, blob)).lastrowid
                    new[key] = vector
            with collection.lock:
                collection.index.remove(np.array(removed, dtype=np.int64))
                if new:
                    collection.index.add(np.fromiter(new, dtype=np.int64), np.stack(list(new.values())))
                collection.dirty = True
        return UpsertResult(added, updated, unchanged)

    def get(self, name: str, item_id: str) -> Item:
        self._collection(name)
        row = self._reader().execute("SELECT label, metadata, vector FROM items WHERE collection = ? AND id = ?",
                                     (name, item_id)).fetchone()
        if row is None:
            raise item_not_found(name, item_id)
        return Item(item_id, _vector(row[2]), row[0], json.loads(row[1]))

    def delete(self, name: str, item_id: str) -> None:
        collection = self._collection(name)
        with self._write_lock:
            with self._transaction() as db:
                row = db.execute("SELECT key FROM items WHERE collection = ? AND id = ?", (name, item_id)).fetchone()
                if row is None:
                    raise item_not_found(name, item_id)
                db.execute("DELETE FROM items WHERE key = ?", (row[0],))
            with collection.lock:
                collection.index.remove(np.array([row[0]], dtype=np.int64))
                collection.dirty = True

    def list_items(self, name: str, cursor: str | None, limit: int) -> ItemPage:
        self._collection(name)
        after = int(cursor) if cursor and cursor.isdigit() else 0
        rows = self._reader().execute(
            "SELECT key, id, label, metadata FROM items WHERE collection = ? AND key > ? ORDER BY key LIMIT ?",
            (name, after, limit)).fetchall()
        items = [Item(r[1], np.empty(0, np.float32), r[2], json.loads(r[3])) for r in rows]
        return ItemPage(items, str(rows[-1][0]) if len(rows) == limit else None)

    # Search ------------------------------------------------------------------------------------------

    def _matching_keys(self, name: str, where: ItemFilter) -> np.ndarray:
        sql, args = ["SELECT key FROM items WHERE collection = ?"], [name]
        if where.label is not None:
            sql.append("AND label = ?")
            args.append(where.label)
        if where.labelled:
            sql.append("AND label IS NOT NULL")
        for key, value in where.metadata.items():
            # json_each of a scalar yields the scalar itself, of an array its elements (Qdrant's "match").
            sql.append("AND EXISTS (SELECT 1 FROM json_each(items.metadata, ?) AS e "
                       "WHERE typeof(e.key) != 'text' AND e.type = ?" + ("" if isinstance(value, bool) else
                                                                         " AND e.value = ?") + ")")
            args.append(f'$."{key}"')
            if isinstance(value, bool):
                args.append("true" if value else "false")
            else:
                args.extend(("integer" if isinstance(value, int) else "text", value))
        return np.array([r[0] for r in self._reader().execute(" ".join(sql), args)], dtype=np.int64)

    def search(self, name: str, queries: np.ndarray, k: int, where: ItemFilter) -> list[list[Hit]]:
        collection = self._collection(name)
        queries = normalized(queries, collection.info.dim, "query vector")
        allowed = self._matching_keys(name, where) if where else None
        with collection.lock:
            found = collection.index.search(queries, k, allowed)
        keys = sorted({key for row in found for key, _ in row})
        rows = {}
        for start in range(0, len(keys), SQL_VARIABLES):
            chunk = keys[start:start + SQL_VARIABLES]
            rows.update((r[0], r[1:]) for r in self._reader().execute(
                f"SELECT key, id, label, metadata FROM items WHERE key IN ({','.join('?' * len(chunk))})", chunk))
        # A key deleted between the index search and this read is left out.
        return [[Hit(rows[key][0], score, rows[key][1], json.loads(rows[key][2])) for key, score in row if key in rows]
                for row in found]

    def close(self) -> None:
        with self._write_lock:
            for collection in self._collections.values():
                if collection.info.index.kind == "hnsw" and collection.dirty:
                    with collection.lock:
                        self._save_snapshot(collection)
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._writer.close()
            self._lock_file.close()
