"""``dinoserve index add COLLECTION PATH...``: embed a folder tree into a collection.

Goes through a running gateway (``--url``), not to the store directly: the gateway embeds with the
model and preprocessing it serves, it owns the store (the embedded one is single-process), and the
same command fills a remote deployment. Labels come from the first-level sub-folders of each PATH
(``PATH/cat/x.jpg`` → ``cat``; images directly in PATH get none), ids from paths relative to PATH.

Resumable and idempotent: each item records the file's size and modification time in its metadata,
so a second run sends only new or changed files. Unreadable files (I/O errors, images the gateway
cannot decode) are skipped and reported; other failures stop the run, which can simply be run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
RETRIES = 5  # for 429 / 5xx / connection errors, with exponential backoff from 0.5 s
IMAGE_ERRORS = (400, 413, 415)  # the gateway's answers to a file it cannot decode


class Abort(Exception):
    """Stop the run; what is committed stays, a later run resumes."""


@dataclass(frozen=True)
class Source:
    path: Path
    id: str
    label: str | None


@dataclass
class Report:
    found: int = 0
    present: int = 0  # already indexed with the same size and modification time
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, collection: str) -> str:
        sent = self.added + self.updated + self.unchanged
        rate = f" ({sent / self.seconds:.1f} img/s)" if self.seconds > 0 and sent else ""
        lines = [f"{collection}: {self.found} images found, {self.present} already indexed; sent {sent} in "
                 f"{self.seconds:.1f} s{rate}: {self.added} added, {self.updated} updated, "
                 f"{self.unchanged} unchanged"]
        if self.failed:
            lines.append(f"skipped {len(self.failed)} unreadable files:")
            lines.extend(f"  {path}: {reason}" for path, reason in self.failed)
        return "\n".join(lines)


def find_images(paths: Iterable[Path]) -> list[Source]:
    """Image files (by extension; hidden names skipped) under each PATH, sorted by id."""
    sources = []
    for root in map(Path, paths):
        if root.is_dir():
            for current, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    rel = (Path(current) / name).relative_to(root).as_posix()
                    sources.append(Source(Path(current) / name, rel, rel.split("/")[0] if "/" in rel else None))
        elif root.exists() or root.is_symlink():
            sources.append(Source(root, root.name, None))
        else:
            raise FileNotFoundError(f"{root} does not exist")
    ids = [s.id for s in sources]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"several files would get the id {twice[0]!r}: index those PATHs into separate collections")
    return sorted(sources, key=lambda s: s.id)


def file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class Gateway:
    """The few calls the command needs, with retries on overload and unavailability."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0):
        import httpx

        self.httpx = httpx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs):
        for attempt in range(RETRIES + 1):
            try:
                response = self.client.request(method, path, **kwargs)
            except self.httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in (429, 502, 503, 504):
                    return response
                problem = f"{response.status_code} {response.text[:200]}"
            if attempt < RETRIES:
                time.sleep(0.5 * 2 ** attempt)
        raise Abort(f"{method} {path} failed {RETRIES + 1} times; last: {problem}")

    def ensure_collection(self, name: str, index: str) -> bool:
        """True when the collection had to be created."""
        response = self.request("GET", f"/v1/collections/{name}")
        if response.status_code == 200:
            return False
        if response.status_code == 404:
            response = self.request("PUT", f"/v1/collections/{name}", json={"index": index})
            if response.status_code in (201, 409):  # 409: another run created it meanwhile
                return response.status_code == 201
        raise Abort(f"collection {name}: {error_message(response)}")

    def stored_stamps(self, name: str) -> dict[str, dict]:
        stamps, cursor = {}, None
        while True:
            params = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
            response = self.request("GET", f"/v1/collections/{name}/items", params=params)
            if response.status_code != 200:
                raise Abort(f"listing {name}: {error_message(response)}")
            body = response.json()
            stamps.update((item["id"], item["metadata"]) for item in body["data"])
            if not (cursor := body["next"]):
                return stamps

    def close(self) -> None:
        self.client.close()


def error_message(response) -> str:
    try:
        return f"{response.status_code} {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:200]}"


def batches(sources: list[Source], size: int) -> Iterator[list[Source]]:
    """Runs of ``size`` sources sharing a label (one ``label`` field per request)."""
    for _, group in groupby(sources, key=lambda s: s.label):
        group = list(group)
        yield from (group[i:i + size] for i in range(0, len(group), size))


def send(gateway: Gateway, collection: str, batch: list[Source]) -> tuple[dict, list[tuple[Path, str]]]:
    """Post one batch; returns the gateway's counts and the files skipped as unreadable."""
    files, metadata, failed = [], [], []
    for source in batch:
        try:
            stamp = file_stamp(source.path)
            files.append((source, source.path.read_bytes()))
            metadata.append(json.dumps(stamp))
        except OSError as exc:
            failed.append((source.path, exc.strerror or str(exc)))
    if not files:
        return {}, failed
    form = {"id": [s.id for s, _ in files], "metadata": metadata}
    if batch[0].label is not None:
        form["label"] = batch[0].label
    response = gateway.request("POST", f"/v1/collections/{collection}/items", data=form,
                               files=[("images", (s.path.name, data, "application/octet-stream")) for s, data in files])
    if response.status_code == 200:
        return response.json(), failed
    if response.status_code in IMAGE_ERRORS:
        if len(files) == 1:
            return {}, [*failed, (files[0][0].path, error_message(response))]
        counts: dict = {}
        for source, _ in files:  # find the file(s) the gateway refused
            got, bad = send(gateway, collection, [source])
            counts = {k: counts.get(k, 0) + got.get(k, 0) for k in ("added", "updated", "unchanged")}
            failed.extend(bad)
        return counts, failed
    raise Abort(f"adding to {collection}: {error_message(response)}")


def index_add(url: str, collection: str, paths: list[Path], batch_size: int = 16, concurrency: int = 4,
              index: str = "exact", progress: bool = True, api_key: str | None = None) -> Report:
    from tqdm import tqdm

    report = Report()
    sources = find_images(paths)
    report.found = len(sources)
    gateway = Gateway(url, api_key)
    started = time.monotonic()
    try:
        if gateway.ensure_collection(collection, index):
            print(f"created collection {collection} ({index} index)", file=sys.stderr)
        stored = gateway.stored_stamps(collection)
        pending = []
        for source in sources:
            meta = stored.get(source.id)
            try:
                same = meta is not None and all(meta.get(k) == v for k, v in file_stamp(source.path).items())
            except OSError:
                same = False  # reported when it is read
            if same:
                report.present += 1
            else:
                pending.append(source)
        with ThreadPoolExecutor(max_workers=concurrency) as pool, \
                tqdm(total=len(pending), unit="img", desc=collection, disable=not progress) as bar:
            work = iter(batches(pending, batch_size))
            running: dict[Future, int] = {}
            try:
                while True:
                    while len(running) < 2 * concurrency and (batch := next(work, None)) is not None:
                        running[pool.submit(send, gateway, collection, batch)] = len(batch)
                    if not running:
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        bar.update(running.pop(future))
                        counts, failed = future.result()
                        report.added += counts.get("added", 0)
                        report.updated += counts.get("updated", 0)
                        report.unchanged += counts.get("unchanged", 0)
                        report.failed.extend(failed)
            finally:
                for future in running:
                    future.cancel()
    finally:
        report.seconds = time.monotonic() - started
        gateway.close()
    report.failed.sort()
    return report


def add_index_parser(sub) -> None:
    p = sub.add_parser("index", help="bulk-load collections through a running gateway",
                       description="Bulk operations on collections, through a running `dinoserve serve`.")
    actions = p.add_subparsers(dest="index_command", required=True)
    add = actions.add_parser(
        "add", help="embed a folder tree into a collection",
        description="Embed every image under PATHs into COLLECTION (created if missing): labels from "
                    "first-level sub-folders, ids from paths relative to PATH. Re-running sends only new or "
                    "changed files; unreadable files are skipped and listed. A gateway that requires API keys "
                    "gets a write key from $DINOSERVE_API_KEY.")
    add.add_argument("collection", metavar="COLLECTION")
    add.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image folders or files")
    add.add_argument("--url", default=os.environ.get("DINOSERVE_URL", "http://127.0.0.1:8080"),
                     help="the gateway (default: $DINOSERVE_URL or http://127.0.0.1:8080)")
    add.add_argument("--batch-size", type=int, default=16,
                     help="images per request; larger amortises the request cost (default: 16)")
    add.add_argument("--concurrency", type=int, default=4,
                     help="requests in flight; keeps Triton's dynamic batcher fed (default: 4)")
    add.add_argument("--index", choices=["exact", "hnsw"], default="exact",
                     help="index of the collection if this creates it (default: exact)")
    add.add_argument("--quiet", action="store_true", help="no progress bar")


def run_index(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        report = index_add(args.url, args.collection, args.paths, max(1, args.batch_size), max(1, args.concurrency),
                           args.index, progress=not args.quiet, api_key=os.environ.get("DINOSERVE_API_KEY"))
    except (Abort, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"dinoserve index add: {exc}\n(re-run to resume: indexed files are skipped)") from None
    print(report.summary(args.collection))
    return 0
