"""Hub downloads, offline: a local HTTP server stands in for dl.fbaipublicfiles.com. A file is used only
when its digests match; the first download of a file without a published checksum pins its SHA-256 and
later uses are checked against the pin."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.embedded_triton import free_port
from training.export import resolve_source
from training.hub import HUB, PINS_FILE, ChecksumError, HubWeights, download, fetch
from training.weights import CheckpointError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def served(tmp_path):
    """A folder served over HTTP on a free loopback port: (folder, base URL, stop())."""
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "weights.pth").write_bytes(PAYLOAD)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    yield folder, f"http://127.0.0.1:{server.server_address[1]}", stop
    if thread.is_alive():
        stop()


def test_download_with_the_right_checksum_keeps_the_file(served, tmp_path):
    _, url, _ = served
    dest = tmp_path / "weights.pth"
    sha256 = hashlib.sha256(PAYLOAD).hexdigest()
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    assert download(f"{url}/weights.pth", dest, sha256, md5[:6], progress=False) == sha256
    assert dest.read_bytes() == PAYLOAD


@pytest.mark.parametrize("sha256, md5_prefix, says", [
    ("0" * 64, None, "expected " + "0" * 64),
    (None, "ffffff", "expected one starting ffffff"),
])
def test_a_checksum_mismatch_leaves_nothing_behind(served, tmp_path, sha256, md5_prefix, says):
    _, url, _ = served
    dest = tmp_path / "weights.pth"
    with pytest.raises(ChecksumError, match=says):
        download(f"{url}/weights.pth", dest, sha256, md5_prefix, progress=False)
    assert list(tmp_path.glob("*weights.pth*")) == []


def test_first_download_pins_the_sha256_and_later_uses_are_checked(served, tmp_path):
    _, url, stop = served
    registry = {"dino_test": HubWeights("dino_test", f"{url}/weights.pth", "dino", "test file")}
    cache = tmp_path / "cache"
    path = fetch("dino_test", cache, registry, progress=False)
    assert path == cache / "hub" / "dino_test.pth" and path.read_bytes() == PAYLOAD
    pins = json.loads((cache / "hub" / PINS_FILE).read_text())
    assert pins == {"dino_test": hashlib.sha256(PAYLOAD).hexdigest()}

    stop()  # from now on only the cache can answer
    assert fetch("dino_test", cache, registry, progress=False) == path
    path.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(ChecksumError, match="the file changed"):
        fetch("dino_test", cache, registry, progress=False)


def test_a_published_sha256_is_checked_on_download(served, tmp_path):
    _, url, _ = served
    registry = {"ibot_test": HubWeights("ibot_test", f"{url}/weights.pth", "ibot", "test file", sha256="1" * 64)}
    with pytest.raises(ChecksumError):
        fetch("ibot_test", tmp_path / "cache", registry, progress=False)
    assert not (tmp_path / "cache" / "hub" / "ibot_test.pth").exists()
    assert not (tmp_path / "cache" / "hub" / PINS_FILE).exists()


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="cannot download .* pass a local file instead"):
        download(f"http://127.0.0.1:{free_port()}/weights.pth", tmp_path / "weights.pth", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_hub_name_resolves_to_its_cached_file_and_an_unknown_name_is_refused(tmp_path):
    cache = tmp_path / "cache"
    (cache / "hub").mkdir(parents=True)
    cached = cache / "hub" / "dino_vits16.pth"
    cached.write_bytes(PAYLOAD)
    (cache / "hub" / PINS_FILE).write_text(json.dumps({"dino_vits16": hashlib.sha256(PAYLOAD).hexdigest()}))
    assert resolve_source("dino_vits16", cache, progress=False) == (cached, HUB["dino_vits16"])
    with pytest.raises(CheckpointError, match="not a hub name .*dino_vitb8"):
        resolve_source("dino_vit_huge", cache)


def test_hub_names_cover_the_official_dino_and_ibot_releases():
    assert set(HUB) == {"dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8",
                        "ibot_vits16", "ibot_vitb16", "ibot_vitl16"}
    for weights in HUB.values():
        host = "dl.fbaipublicfiles.com/dino/" if weights.method == "dino" else "lf3-nlp-opensource.bytetos.com/"
        assert weights.url.startswith("https://" + host) and Path(weights.url).suffix == ".pth"
