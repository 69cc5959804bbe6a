"""Official DINO and iBOT weights by name, downloaded once into a cache and checked before use.

URLs are the ones the authors publish: DINO's ``hubconf.py`` / README (``dl.fbaipublicfiles.com``) and
iBOT's README (``lf3-nlp-opensource.bytetos.com``, teacher backbones ``{"state_dict": ...}``). Neither
project publishes checksums. What is known is recorded here: for the DINO files, the first six hex
digits of their MD5 as pinned by open-metric-learning (``oml/models/vit/vit.py``), a third-party
consistency check, not an authenticated one. For every file the SHA-256 of the first download is
written to ``<cache>/hub/sha256.json`` and every later use is checked against it (trust on first use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .checkpoint import sha256_file
from .weights import CheckpointError

log = logging.getLogger(__name__)

DINO_URL = "https://dl.fbaipublicfiles.com/dino"
IBOT_URL = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"
PINS_FILE = "sha256.json"


@dataclass(frozen=True)
class HubWeights:
    name: str
    url: str
    method: str
    description: str
    sha256: str | None = None  # published digest; none of the current entries has one
    md5_prefix: str | None = None  # leading hex digits of the MD5 recorded by a third party


HUB: dict[str, HubWeights] = {w.name: w for w in (
    HubWeights("dino_vits16", f"{DINO_URL}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", "dino",
               "DINO ViT-S/16, ImageNet-1k, k-NN 74.5%", md5_prefix="cf0f22"),
    HubWeights("dino_vits8", f"{DINO_URL}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth", "dino",
               "DINO ViT-S/8, ImageNet-1k, k-NN 78.3%", md5_prefix="230cd5"),
    HubWeights("dino_vitb16", f"{DINO_URL}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", "dino",
               "DINO ViT-B/16, ImageNet-1k, k-NN 76.1%", md5_prefix="552daf"),
    HubWeights("dino_vitb8", f"{DINO_URL}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", "dino",
               "DINO ViT-B/8, ImageNet-1k, k-NN 77.4%", md5_prefix="556550"),
    HubWeights("ibot_vits16", f"{IBOT_URL}/vits_16/checkpoint_teacher.pth", "ibot",
               "iBOT ViT-S/16 teacher, ImageNet-1k, k-NN 75.2%"),
    HubWeights("ibot_vitb16", f"{IBOT_URL}/vitb_16/checkpoint_teacher.pth", "ibot",
               "iBOT ViT-B/16 teacher, ImageNet-1k, k-NN 77.1%"),
    HubWeights("ibot_vitl16", f"{IBOT_URL}/vitl_16/checkpoint_teacher.pth", "ibot",
               "iBOT ViT-L/16 teacher, ImageNet-1k, k-NN 78.0%"),
)}


class ChecksumError(CheckpointError):
    """Downloaded or cached bytes differ from the recorded digest."""


def default_cache_dir() -> Path:
    """``$DINOSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dinoserve``, else ``~/.cache/dinoserve``."""
    if os.environ.get("DINOSERVE_CACHE_DIR"):
        return Path(os.environ["DINOSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinoserve"


def fetch(name: str, cache_dir: Path | None = None, registry: dict[str, HubWeights] = HUB,
          progress: bool = True) -> Path:
    """Local path of hub weights ``name``: downloaded on first use, checked on every use."""
    if name not in registry:
        raise CheckpointError(f"unknown hub name {name!r}; known: {', '.join(registry)}")
    weights = registry[name]
    folder = Path(cache_dir or default_cache_dir()) / "hub"
    path = folder / f"{name}{Path(weights.url).suffix or '.pth'}"
    pins_path = folder / PINS_FILE
    pins = json.loads(pins_path.read_text()) if pins_path.is_file() else {}
    expected = weights.sha256 or pins.get(name)
    if path.is_file():
        digest = sha256_file(path)
        if expected and digest != expected:
            raise ChecksumError(f"cached {path} has sha256 {digest}, recorded {expected}: the file changed; "
                                "delete it to download again")
        return path
    folder.mkdir(parents=True, exist_ok=True)
    digest = download(weights.url, path, expected, weights.md5_prefix, progress)
    if not expected:
        pins[name] = digest
        pins_path.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
        log.warning("%s has no published checksum: recorded sha256 %s in %s; later uses are checked "
                    "against it", name, digest, pins_path)
    return path


def download(url: str, dest: Path, sha256: str | None = None, md5_prefix: str | None = None,
             progress: bool = True, timeout: float = 60.0) -> str:
    """Stream ``url`` to ``dest`` with a progress bar; returns the SHA-256 of the bytes.

    The bytes go to a temporary file that is renamed only after the digests match, so a failed or
    mismatching download leaves nothing at ``dest``.
    """
    dest = Path(dest)
    partial = dest.with_name(f".{dest.name}.part")
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        digest = sha.hexdigest()
        if sha256 and digest != sha256:
            raise ChecksumError(f"{url} has sha256 {digest}, expected {sha256}; not used")
        if md5_prefix and not md5.hexdigest().startswith(md5_prefix):
            raise ChecksumError(f"{url} has md5 {md5.hexdigest()}, expected one starting {md5_prefix}; not used")
        os.replace(partial, dest)
        return digest
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise CheckpointError(f"cannot download {url}: {reason} (offline? pass a local file instead)") from None
    finally:
        partial.unlink(missing_ok=True)
