"""What the collection, classification and durability tests share: a gateway process on a chosen vector
store that uses the session server's Triton, and NumPy references."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from serving import Server

BACKENDS = ("embedded", "qdrant-local")


def start_gateway(server: Server, bundle: Path, log: Path, data_dir: Path, store: str = "embedded") -> Server:
    """`dinoserve serve` of ``store`` in ``data_dir``, using the Triton of ``server``."""
    gateway = Server(bundle, log, ["--triton-url", server.triton_url, "--vector-store", store,
                                   "--data-dir", str(data_dir)])
    gateway.wait_ready()
    return gateway


def own_gateway(server: Server, bundle: Path, tmp_path_factory, name: str) -> Iterator[Server]:
    """Fixture body: an embedded-store gateway of its own (data and log under a fresh ``name`` folder) on the
    session server's Triton, stopped afterwards."""
    folder = tmp_path_factory.mktemp(name)
    gateway = start_gateway(server, bundle, folder / "serve.log", folder / "data")
    yield gateway
    gateway.stop()


def fast_data_dir(tmp_path_factory, store: str) -> Iterator[Path]:
    """A data directory for ``store``. qdrant-client's local mode commits and fsyncs every point on its own
    (~0.1 s each on a busy disk): on tmpfs, where fsync costs nothing, its suite takes seconds."""
    if store == "qdrant-local" and Path("/dev/shm").is_dir():
        folder = Path(tempfile.mkdtemp(prefix="dinoserve-qdrant-", dir="/dev/shm"))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp(f"data-{store}")


def unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def top_k(query: np.ndarray, ids: list[str], vectors: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The reference search: cosine similarity to every vector, best ``k`` first."""
    scores = unit(vectors) @ unit(query)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(ids[i], float(scores[i])) for i in order]


def jpeg(seed: int, size=(160, 120)) -> bytes:
    from training.data import make_sample

    buf = io.BytesIO()
    make_sample(seed, size=size).image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def b64(data: bytes) -> dict:
    return {"data": base64.b64encode(data).decode()}
