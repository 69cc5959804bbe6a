"""The demo page's sample images and its demo collection, both made by the synthetic shapes generator
(``core.synthetic.make_sample``: NumPy and Pillow, no torch), so no image file ships with the gateway.

Samples ``0 .. COLLECTION_SAMPLES - 1`` fill the demo collection (labelled with their class);
the next ``PICKER_SAMPLES`` (one per class) are offered on the page as queries and are not in it.
"""

from __future__ import annotations

import asyncio
import io
import logging
from contextlib import suppress
from functools import lru_cache

import numpy as np
from starlette.concurrency import run_in_threadpool

from core.synthetic import CLASSES, make_sample

from .collections import IndexConfig, Item, VectorStore, check_name
from .errors import ApiError
from .inference import Inference

log = logging.getLogger(__name__)

SEED = 0
SIZE = 256  # square: the 224 centre crop of the embedding transform keeps the whole shape
COLLECTION_SAMPLES = 60  # ten per class
PICKER_SAMPLES = len(CLASSES)
SAMPLE_COUNT = COLLECTION_SAMPLES + PICKER_SAMPLES
_EMBED_BATCH = 20


def sample_url(index: int) -> str:
    return f"/demo/samples/{index}.jpg"


def sample_label(index: int) -> str:
    return CLASSES[index % len(CLASSES)]


@lru_cache(maxsize=SAMPLE_COUNT)
def sample_jpeg(index: int) -> bytes:
    """Sample ``index`` (``0 <= index < SAMPLE_COUNT``) as JPEG bytes, identical on every call and machine."""
    if not 0 <= index < SAMPLE_COUNT:
        raise ValueError(f"sample {index} is not one of the {SAMPLE_COUNT} demo samples")
    buffer = io.BytesIO()
    make_sample(index, size=SIZE, seed=SEED).image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def picker_samples() -> list[dict]:
    """The samples the page offers as queries: ``{index, label, url}``."""
    return [{"index": i, "label": sample_label(i), "url": sample_url(i)}
            for i in range(COLLECTION_SAMPLES, SAMPLE_COUNT)]


def collection_items(vectors: np.ndarray) -> list[Item]:
    """The demo collection's items for the unit embeddings ``(COLLECTION_SAMPLES, dim)`` of its samples, with
    ids like ``star-04``, the class as label and the thumbnail's URL in the metadata."""
    return [Item(f"{sample_label(i)}-{i:02d}", vectors[i], sample_label(i),
                 {"sample": i, "thumbnail": sample_url(i)}) for i in range(COLLECTION_SAMPLES)]


async def fill_demo_collection(name: str, store: VectorStore, inference: Inference, model_ready: asyncio.Task) -> None:
    """Create collection ``name`` and add the demo samples, embedded through Triton, once ``model_ready``
    (the gateway's warm-up) is done. A collection of that name is never touched: it may be users' data,
    or the demo collection of an earlier start. The samples are embedded as the API embeds images
    (``Inference.embed``). The items are written in one upsert right after the
    collection is created, so a stop during the embedding leaves no collection behind. Failures are
    logged, not raised: the gateway serves on without the demo collection."""
    try:
        check_name(name)
    except ApiError as exc:
        log.error("demo collection not filled: setting demo_collection: %s", exc.message)
        return
    await model_ready
    try:
        await _fill(name, store, inference)
    except ApiError as exc:
        log.warning("demo collection %r not filled: %s", name, exc.message)
    except Exception:
        log.exception("demo collection %r not filled", name)


async def _fill(name: str, store: VectorStore, inference: Inference) -> None:
    try:
        await run_in_threadpool(store.describe, name)
        log.info("demo collection %r exists; left as it is", name)
        return
    except ApiError as exc:
        if exc.status != 404:
            raise

    jpegs = await run_in_threadpool(lambda: [sample_jpeg(i) for i in range(COLLECTION_SAMPLES)])
    parts = [await inference.embed(jpegs[start:start + _EMBED_BATCH], normalize=True)
             for start in range(0, COLLECTION_SAMPLES, _EMBED_BATCH)]
    items = collection_items(np.concatenate(parts))

    def write() -> bool:
        try:
            store.create_collection(name, inference.card.name, inference.card.embed_dim, IndexConfig())
        except ApiError as exc:
            if exc.status != 409:
                raise
            return False
        store.upsert(name, items)
        return True

    if await _uninterrupted(write):
        log.info("demo collection %r filled with %d labelled samples", name, COLLECTION_SAMPLES)
    else:
        log.info("demo collection %r was created meanwhile (by another gateway?); left as it is", name)


async def _uninterrupted(fn):
    """``fn()`` in a worker thread, waited for even when the caller is cancelled (the cancellation is raised
    after it), so that the gateway's shutdown does not close the store under a write."""
    job = asyncio.ensure_future(run_in_threadpool(fn))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        with suppress(Exception):  # its failure would only hide the cancellation
            await job
        raise
