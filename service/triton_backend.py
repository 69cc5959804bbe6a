"""The gateway's view of Triton: KServe v2 over HTTP with binary tensors (``tritonclient.http.aio``), the
input tensor through system shared memory when Triton runs on this host."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import aiohttp
import numpy as np
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

from core.model_card import ModelCard

from .errors import ApiError, not_ready

log = logging.getLogger(__name__)


READY_CHECK_TIMEOUT_S = 2.0  # below the readiness probes' own timeouts (3 s in deploy/k8s)
# Shared-memory regions are sized in powers of two from 1 MiB (one 224² image is 0.6 MB) and kept for reuse up to
# this many bytes in all; past it, or with /dev/shm short of room, a tensor goes in the HTTP body instead.
MIN_REGION_BYTES = 1 << 20
MAX_POOL_BYTES = 256 << 20


@dataclass(eq=False)
class _Region:
    name: str  # Triton's name of the region, and its POSIX shared-memory key without the "/"
    memory: SharedMemory

    @property
    def size(self) -> int:
        return self.memory.size


class SharedMemoryInputs:
    """Input tensors written to POSIX shared memory that Triton maps once per region (system shared memory,
    KServe's extension) instead of crossing the loopback socket in each request body.

    A region serves one request at a time and returns to a pool of free ones. Its name is unlinked from
    /dev/shm as soon as Triton has mapped it, so a gateway that dies leaves no file behind. A region whose
    request was given up on (deadline) may still be read by Triton: it is never reused, and is unregistered
    once Triton no longer holds it (Triton refuses while it does). The first region Triton refuses (another
    host, another IPC namespace, a shared-memory API closed to this client) turns the pool off for good:
    tensors go in the HTTP body. ``headers`` go with the registration calls (PyTriton's access token).
    """

    def __init__(self, headers: dict[str, str] | None = None):
        self.headers = headers
        self.usable: bool | None = None  # unknown until Triton answers a first registration
        self._free: dict[int, list[_Region]] = {}
        self._retired: list[_Region] = []
        self._bytes = 0  # of every region not yet closed
        self._reaper: asyncio.Task | None = None

    async def acquire(self, client: aioclient.InferenceServerClient, nbytes: int) -> _Region | None:
        """A registered region of at least ``nbytes`` for this caller alone, or None: send the HTTP body."""
        if self.usable is False:
            return None
        size = max(MIN_REGION_BYTES, 1 << (nbytes - 1).bit_length())
        if free := self._free.get(size):
            return free.pop()
        if self._bytes + size > MAX_POOL_BYTES or not _room_in_dev_shm(size):
            return None
        region = _Region(f"dinoserve-{os.getpid()}-{secrets.token_hex(8)}",
                         SharedMemory(create=True, size=size))
        self._bytes += size
        try:
            await client.register_system_shared_memory(region.name, "/" + region.memory.name, size,
                                                       headers=self.headers)
        except InferenceServerException as exc:
            self._close(region)
            if self.usable is None:
                self.usable = False
                log.info("input tensors go to Triton in the HTTP body: it did not map a shared-memory "
                         "region (%s)", exc.message())
            return None
        except (aiohttp.ClientError, OSError):  # Triton unreachable: the request itself will say so
            self._close(region)
            return None
        except BaseException:  # cancelled: Triton may have mapped it or not
            region.memory.unlink()
            self.retire(region, client)
            raise
        region.memory.unlink()  # mapped by both sides now; the name is no longer needed
        self.usable = True
        return region

    def release(self, region: _Region) -> None:
        self._free.setdefault(region.size, []).append(region)

    def retire(self, region: _Region, client: aioclient.InferenceServerClient) -> None:
        """Never reuse ``region`` (Triton may still read it); unregister it in the background."""
        self._retired.append(region)
        self._reap(client)

    def forget_free(self, client: aioclient.InferenceServerClient) -> None:
        """Triton failed a request that used a region: it may be a new Triton process that never saw the pool's
        regions. Retire them all; the next requests register new ones."""
        for regions in self._free.values():
            self._retired.extend(regions)
        self._free.clear()
        self._reap(client)

    def _reap(self, client: aioclient.InferenceServerClient) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._unregister_retired(client))

    async def _unregister_retired(self, client: aioclient.InferenceServerClient) -> None:
        while self._retired:
            held = []
            for region in self._retired:
                try:
                    await client.unregister_system_shared_memory(region.name, headers=self.headers)
                except InferenceServerException as exc:
                    if "in use" in exc.message():  # a cut-off request still queued in Triton
                        held.append(region)
                        continue
                except (aiohttp.ClientError, OSError):
                    pass  # Triton gone: its mappings went with it
                self._close(region)
            self._retired = held
            if held:
                await asyncio.sleep(1.0)

    async def close(self, client: aioclient.InferenceServerClient) -> None:
        """Unregister every region from Triton (best effort, a few seconds at most) and free them here."""
        if self._reaper is not None:
            self._reaper.cancel()
        regions = [r for free in self._free.values() for r in free] + self._retired
        self._free.clear()
        self._retired = []
        for region in regions:
            try:
                async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                    await client.unregister_system_shared_memory(region.name, headers=self.headers)
            except (InferenceServerException, aiohttp.ClientError, OSError, TimeoutError):
                pass
            self._close(region)

    def _close(self, region: _Region) -> None:
        self._bytes -= region.size
        region.memory.close()
        try:
            region.memory.unlink()
        except FileNotFoundError:  # unlinked once Triton had mapped it
            pass


def _room_in_dev_shm(size: int) -> bool:
    """/dev/shm (a tmpfs, 64 MB in a default Docker container) has room for ``size`` more bytes: writing past a
    full tmpfs through a mapping is a SIGBUS, not an error."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize >= 2 * size


class TritonBackend:
    """Runs the bundle's model on Triton. Several images go as one request per ``max_batch`` (default: the
    card's ``max_batch_size``), all sent at once; only the outputs a caller names are transferred.
    ``timeout_s`` is the deadline of one request's inference, all its batches together (504 past it).
    ``shared_memory`` sends input tensors through system shared memory when Triton accepts a region
    (``access_token``: the value of the ``triton-access-token`` header that Triton asks of the shared-memory
    API, as PyTriton starts it); without it they always go in the HTTP body."""

    def __init__(self, url: str, card: ModelCard, timeout_s: float = 30.0, max_batch: int | None = None,
                 shared_memory: bool = True, access_token: str | None = None):
        self.url = url
        self.card = card
        self.timeout_s = timeout_s
        self.max_batch = max_batch or int(card.raw.get("serving", {}).get("max_batch_size", 64))
        self.shared_memory = None
        if shared_memory:
            self.shared_memory = SharedMemoryInputs({"triton-access-token": access_token} if access_token else None)
        self._client: aioclient.InferenceServerClient | None = None

    @property
    def client(self) -> aioclient.InferenceServerClient:
        # Created lazily inside the running event loop (aiohttp sessions are bound to one).
        if self._client is None:
            # No session-wide timeout: each call has its own (readiness checks, inference deadlines).
            self._client = aioclient.InferenceServerClient(self.url, conn_timeout=None)
        return self._client

    async def is_ready(self) -> bool:
        """Triton answers and reports the model ready; False when it is down, unreachable or loading."""
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                return bool(await self.client.is_model_ready(self.card.name))
        except (InferenceServerException, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def infer(self, pixel_values: np.ndarray, outputs: tuple[str, ...],
                    timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """``pixel_values`` float32 ``[B, 3, H, W]`` → the named outputs, each with B rows. 504
        ``backend_timeout`` after ``timeout_s`` (default: the backend's deadline), 503 when Triton is
        unreachable or cannot run the model. A request given up on is cancelled in aiohttp, which closes
        its connection instead of returning it to the pool, so the next request gets a clean one."""
        deadline = self.timeout_s if timeout_s is None else timeout_s
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        try:
            async with asyncio.timeout(deadline):
                # All batches at once: Triton queues them and its batcher keeps the model busy.
                parts = await asyncio.gather(*(self._infer_batch(pixel_values[i:i + self.max_batch], outputs)
                                               for i in range(0, len(pixel_values), self.max_batch)))
        except TimeoutError:
            raise ApiError(504, "backend_timeout", f"Triton did not answer within {deadline} s") from None
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in outputs}

    async def _infer_batch(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        region = None
        if self.shared_memory is not None:
            region = await self.shared_memory.acquire(self.client, batch.nbytes)
        try:
            result = await self._send(batch, outputs, region)
        except ApiError:
            if region is None:
                raise
            # Triton may have been restarted and know none of the pool's regions: this once, the HTTP body.
            self.shared_memory.retire(region, self.client)
            self.shared_memory.forget_free(self.client)
            return await self._send(batch, outputs, None)
        except BaseException:  # cancelled (deadline): Triton may still read the region
            if region is not None:
                self.shared_memory.retire(region, self.client)
            raise
        if region is not None:
            self.shared_memory.release(region)
        return result

    async def _send(self, batch: np.ndarray, outputs: tuple[str, ...], region: _Region | None) -> dict[str, np.ndarray]:
        tensor = httpclient.InferInput(self.card.input_name, list(batch.shape), "FP32")
        if region is None:
            tensor.set_data_from_numpy(batch, binary_data=True)
        else:
            np.copyto(np.ndarray(batch.shape, np.float32, region.memory.buf), batch)
            tensor.set_shared_memory(region.name, batch.nbytes)
        requested = [httpclient.InferRequestedOutput(self.card.output_name(o), binary_data=True) for o in outputs]
        try:
            result = await self.client.infer(self.card.name, [tensor], outputs=requested)
        except (aiohttp.ClientError, OSError) as exc:
            raise not_ready(f"Triton at {self.url} is unreachable: {exc}") from None
        except InferenceServerException as exc:
            raise not_ready(f"Triton could not run {self.card.name}: {exc.message()}") from None
        return {o: result.as_numpy(self.card.output_name(o)) for o in outputs}

    async def close(self) -> None:
        # An open keep-alive connection makes Triton's shutdown wait its full exit timeout.
        if self._client is not None:
            if self.shared_memory is not None:
                await self.shared_memory.close(self._client)
            await self._client.close()
            self._client = None
