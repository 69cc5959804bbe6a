"""Hostile and unusual uploads (issue 7) and the reduced-scale JPEG decode (issue 9, lossy and off by default
since issue 19): allowed formats by content, limits before decoding, every pixel mode to RGB, truncations as
400, request-size limits while the body streams, and the reduced-scale decode, when asked for, staying close
to the full one. That the default intake equals the official pipeline is tests/test_intake_fidelity.py."""

import asyncio
import base64
import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from service.errors import ApiError
from service.images import (
    ALLOWED_FORMATS, decode_for_embedding, decode_image, embedding_input, open_image, to_rgb,
)
from service.inference import Inference
from service.metrics import GatewayMetrics
from core.model_card import ModelCard, Preprocess
from core.transform import preprocess
from service.request_body import BodySizeLimit, read_form, read_json, read_request
from service.routes import items as items_route
from service.routes import search as search_route
from service.collections_schemas import AddItemsRequest, SearchRequest
from service.schemas import EmbeddingsRequest, ImageData
from service.settings import Settings
from core.synthetic import make_sample

SPEC = Preprocess()
LIMIT = 10**7


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def status_of(data: bytes, max_pixels: int = LIMIT, max_bytes: int | None = None) -> int:
    try:
        decode_image(data, max_pixels, max_bytes)
    except ApiError as err:
        return err.status
    return 200


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR announcing ``width`` x ``height`` RGB, with one tiny IDAT: a bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# --- formats -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats_decode_to_rgb_of_their_size(fmt):
    decoded = decode_image(encode(noise(64, 48), fmt), LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (64, 48)


def test_mpo_the_multi_picture_jpeg_of_phone_cameras_is_accepted():
    data = encode(noise(64, 48), "MPO", save_all=True, append_images=[noise(64, 48, seed=1)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data, LIMIT).size == (64, 48)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "JPEG2000"])
def test_other_formats_are_415_naming_the_detected_format_and_the_allowed_ones(fmt):
    with pytest.raises(ApiError) as err:
        decode_image(encode(noise(32, 32), fmt), LIMIT)
    assert err.value.status == 415
    assert f"format {fmt} is not accepted" in err.value.message
    assert ", ".join(ALLOWED_FORMATS) in err.value.message


def test_text_is_415_naming_the_allowed_formats():
    with pytest.raises(ApiError) as err:
        decode_image(b"<html>a web page saved as photo.jpg</html>", LIMIT)
    assert err.value.status == 415 and "JPEG" in err.value.message


def test_an_allowed_signature_with_a_broken_header_is_400_not_415():
    with pytest.raises(ApiError) as err:
        decode_image(b"GIF89a" + b"\0" * 4, LIMIT)
    assert err.value.status == 400 and "GIF" in err.value.message


def test_gif_decodes_its_first_frame_only():
    frames = [Image.new("RGB", (16, 16), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data, LIMIT).getpixel((8, 8)) == (255, 0, 0)


# --- limits --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [8_000, 100_000])
def test_a_bomb_header_is_413_before_any_pixel_is_decoded(side):
    data = png_header_only(side, side)  # up to 10^10 pixels announced, ~80 bytes on disk
    assert len(data) < 200
    with pytest.raises(ApiError) as err:
        open_image(data, max_pixels=40_000_000)
    assert err.value.status == 413 and f"{side * side} pixels" in err.value.message


def test_a_header_beyond_pillows_own_bomb_guard_is_413_too():
    assert status_of(png_header_only(100_000, 100_000), max_pixels=10**12) == 413


def test_a_large_but_legal_image_decodes_and_one_pixel_more_is_413():
    data = encode(Image.new("RGB", (4000, 3000), (10, 20, 30)), "PNG")  # 12 MP
    assert decode_image(data, max_pixels=12_000_000).size == (4000, 3000)
    assert status_of(data, max_pixels=11_999_999) == 413


def test_the_per_image_byte_limit_is_413():
    data = encode(noise(64, 64), "PNG")
    assert status_of(data, max_bytes=len(data)) == 200
    assert status_of(data, max_bytes=len(data) - 1) == 413


@pytest.mark.parametrize("size", [(1, 1), (20000, 1), (1, 20000)])
def test_extreme_shapes_give_a_model_input(size):
    decoded = decode_for_embedding(encode(noise(*size), "PNG"), SPEC, LIMIT)
    x = embedding_input(decoded, SPEC)
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()


# --- pixel modes ---------------------------------------------------------------------------------------------

def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to display": the left half goes to the bottom
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95), LIMIT)
    assert decoded.size == (20, 40)
    assert decoded.getpixel((10, 35))[2] > 200 and decoded.getpixel((10, 5))[0] > 200


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr"])
def test_opaque_modes_convert_like_pillow(mode):
    img = noise(16, 16).convert(mode)
    assert to_rgb(img).tobytes() == img.convert("RGB").tobytes()


def test_alpha_is_composited_over_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)        # transparent black → white
    rgba[0, 1] = (0, 0, 0, 255)      # opaque black stays black
    rgba[0, 2] = (255, 0, 0, 128)    # half-transparent red → pink
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [255, 127, 127]


def test_grey_with_alpha_is_composited_over_white():
    la = Image.fromarray(np.dstack([np.zeros((2, 2), np.uint8), np.full((2, 2), 128, np.uint8)]), "LA")
    assert decode_image(encode(la, "PNG"), LIMIT).getpixel((0, 0)) == (127, 127, 127)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_a_palette_transparent_colour_becomes_white(fmt):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    out = decode_image(encode(img, fmt, transparency=0), LIMIT)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)


def test_grey_and_rgb_with_a_transparent_colour_become_white():
    grey = encode(Image.new("L", (2, 2), 7), "PNG", transparency=7)
    rgb = encode(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG", transparency=(1, 2, 3))
    assert decode_image(grey, LIMIT).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(rgb, LIMIT).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped(fmt):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(decode_image(data, LIMIT))[0, :, 0]
    assert out.tolist() == [0, 1, 4, 128, 255]  # round(v * 255 / 65535); Pillow's convert("L") clips 1000 to 255


def test_big_endian_sixteen_bit_grey_is_scaled_too():
    img = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], dtype=">u2").tobytes())
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_integer_grey_is_read_on_the_16_bit_scale_and_clipped():
    values = np.array([[-5, 0, 32768, 65535, 10**6]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert np.asarray(decode_image(data, LIMIT))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_float_grey_is_read_from_zero_to_one_and_clipped():
    values = np.array([[-1.0, 0.0, 0.5, 1.0, 7.0, np.nan]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert np.asarray(decode_image(data, LIMIT))[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]


def test_one_bit_is_black_and_white():
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    out = decode_image(encode(img, "BMP"), LIMIT)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


# --- corruption ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.02, 0.25, 0.5, 0.75, 0.95])
def test_truncated_files_are_400(fmt, keep):
    data = encode(noise(160, 120), fmt)
    cut = data[: max(8, int(len(data) * keep))]
    assert status_of(cut) == 400
    with pytest.raises(ApiError) as err:
        decode_for_embedding(cut, SPEC, LIMIT)
    assert err.value.status == 400


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_corrupted_bytes_are_400_or_decode_never_anything_else(fmt):
    data = bytearray(encode(noise(96, 64), fmt))
    rng = np.random.default_rng(1)
    for _ in range(30):
        broken = bytearray(data)
        for i in rng.integers(16, len(data), 8):
            broken[i] ^= 0xFF
        assert status_of(bytes(broken)) in (200, 400)


def test_a_zero_sized_header_is_400():
    data = png_header_only(0, 10)
    assert status_of(data) == 400


# --- remote URLs ---------------------------------------------------------------------------------------------

def test_images_are_bytes_only_the_api_takes_no_urls_to_fetch():
    with pytest.raises(ValidationError):
        ImageData.model_validate({"url": "http://169.254.169.254/latest/meta-data"})
    with pytest.raises(ValidationError):
        EmbeddingsRequest.model_validate({"images": [{"data": "", "url": "http://example.com/a.jpg"}]})


# --- the reduced-scale JPEG decode (lossy, only when asked) ---------------------------------------------------

def photo_jpeg(size=(2048, 1536), index: int = 0, **exif_kwargs) -> bytes:
    return encode(make_sample(index, size).image, "JPEG", quality=90, **exif_kwargs)


def mean_levels(tensor: np.ndarray, exact: np.ndarray) -> float:
    """The largest per-channel mean absolute difference of two normalised ``[3, H, W]`` inputs, in 8-bit
    levels of the picture (normalised units · std · 255). Below 1: on average within one level of the exact
    input, the rounding step of the 8-bit pixels themselves."""
    return float((np.abs(tensor - exact) * np.asarray(SPEC.std)[:, None, None] * 255).mean(axis=(1, 2)).max())


@pytest.mark.parametrize("index", [0, 1, 2])
def test_reduced_scale_jpeg_input_is_on_average_within_one_8_bit_level_of_the_full_decode(index):
    data = photo_jpeg(index=index)
    fast = decode_for_embedding(data, SPEC, LIMIT, draft_margin=1)
    assert fast.scale == 4 and fast.image.size == (512, 384)  # shorter side 384 >= 256
    full = preprocess(decode_image(data, LIMIT), SPEC)
    assert mean_levels(embedding_input(fast, SPEC), full) < 1.0


def test_margin_two_decodes_larger_and_closer():
    data = photo_jpeg()
    full = preprocess(decode_image(data, LIMIT), SPEC)
    one = np.abs(embedding_input(decode_for_embedding(data, SPEC, LIMIT, draft_margin=1), SPEC) - full).mean()
    two_decoded = decode_for_embedding(data, SPEC, LIMIT, draft_margin=2)
    two = np.abs(embedding_input(two_decoded, SPEC) - full).mean()
    assert two_decoded.scale == 2 and two < one


def test_the_default_and_small_jpegs_take_the_exact_path():
    data = photo_jpeg()
    assert decode_for_embedding(data, SPEC, LIMIT).scale == 1  # no margin given: full decode
    assert Settings().jpeg_draft_margin == 0  # nor in the gateway's settings
    small = photo_jpeg(size=(400, 300))  # 300 // 256 = 1: nothing to gain
    assert decode_for_embedding(small, SPEC, LIMIT, draft_margin=1).scale == 1


def test_non_jpeg_inputs_take_the_exact_path_whatever_the_margin():
    data = encode(noise(640, 480), "PNG")
    decoded = decode_for_embedding(data, SPEC, LIMIT, draft_margin=1)
    assert decoded.scale == 1
    np.testing.assert_array_equal(embedding_input(decoded, SPEC), preprocess(decode_image(data, LIMIT), SPEC))


def test_reduced_scale_follows_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = photo_jpeg(size=(2048, 1536), exif=exif)
    fast = decode_for_embedding(data, SPEC, LIMIT, draft_margin=1)
    assert fast.full_size == (1536, 2048) and fast.image.size == (384, 512)
    full = preprocess(decode_image(data, LIMIT), SPEC)
    assert mean_levels(embedding_input(fast, SPEC), full) < 1.0


def test_odd_sizes_map_the_crop_through_the_exact_dct_scale():
    data = photo_jpeg(size=(2047, 1029))  # decoded 1024x515 at 1/2: not exactly half
    fast = decode_for_embedding(data, SPEC, LIMIT, draft_margin=2)
    assert fast.scale == 2 and fast.image.size == (1024, 515)
    full = preprocess(decode_image(data, LIMIT), SPEC)
    assert mean_levels(embedding_input(fast, SPEC), full) < 1.0


# --- request bodies ------------------------------------------------------------------------------------------

def body_app(settings: Settings) -> TestClient:
    """The request-body helpers of the image endpoints behind the same limit middleware and error handler."""
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.post("/form")
    async def form(request: Request) -> dict:
        files = (await read_form(request, max_files=settings.max_images_per_request + 1)).getlist("images")
        if len(files) > settings.max_images_per_request:
            raise ApiError(413, "payload_too_large", "too many images")
        return {"files": len(files)}

    @app.post("/json")
    async def json_body(request: Request) -> dict:
        return {"images": len((await read_json(request, settings, EmbeddingsRequest)).images)}

    @app.post("/search")
    async def search_body(request: Request) -> dict:
        """What the search endpoint's reader makes of a body: the options and the images' bytes."""
        query = await read_request(request, settings, SearchRequest, search_route.SEARCH_FORM)
        images = [query.image] if query.image is not None else query.images or []
        return {"options": query.model_dump(exclude={"image", "images"}),
                "images": [image.content.decode("latin-1") for image in images]}

    @app.post("/items")
    async def items_body(request: Request) -> dict:
        entries = (await read_request(request, settings, AddItemsRequest, items_route.FORM)).items
        return {"items": [{"id": e.id, "label": e.label, "metadata": e.metadata,
                           "image": e.image.content.decode("latin-1")} for e in entries]}

    return TestClient(app)


def b64text(data: bytes) -> dict:
    return {"data": base64.b64encode(data).decode("ascii")}


def test_json_and_multipart_bodies_read_into_the_same_request():
    client = body_app(Settings())
    as_json = client.post("/search", json={"image": b64text(b"\x89PNG-bytes"), "k": 3, "filter": {"label": "cat"}})
    as_form = client.post("/search", files=[("image", ("a.png", b"\x89PNG-bytes", "image/png"))],
                          data={"k": "3", "filter": '{"label": "cat"}'})
    assert as_json.status_code == as_form.status_code == 200, (as_json.text, as_form.text)
    assert as_json.json() == as_form.json()
    assert as_form.json()["images"] == ["\x89PNG-bytes"] and as_form.json()["options"]["k"] == 3
    batch = client.post("/search", files=[("images", ("a.png", b"one", "image/png")),
                                          ("images", ("b.png", b"two", "image/png"))])
    assert batch.json()["images"] == ["one", "two"]


def test_multipart_items_take_per_image_fields_once_each_or_once_for_all():
    client = body_app(Settings())
    files = [("images", ("a.png", b"A", "image/png")), ("images", ("b.png", b"B", "image/png"))]
    response = client.post("/items", files=files, data={"id": ["a", "b"], "label": "shape", "metadata": '{"n": 1}'})
    assert response.status_code == 200, response.text
    assert response.json()["items"] == [
        {"id": "a", "label": "shape", "metadata": {"n": 1}, "image": "A"},
        {"id": "b", "label": "shape", "metadata": {"n": 1}, "image": "B"},
    ]
    one_id = client.post("/items", files=files, data={"id": "a"})  # an id names one item: never shared
    assert one_id.status_code == 422 and "one per image" in one_id.json()["error"]["message"]


@pytest.mark.parametrize("form, message", [
    ({"colour": "red"}, "colour"),  # an unknown field: refused, as in JSON (docs/api.md)
    ({"k": ["1", "2"]}, "given 2 times"),
    ({"filter": "{not json"}, "not valid JSON"),
    ({"images": "not a file"}, "must be a file part"),
])
def test_a_form_the_model_does_not_describe_is_a_422_naming_the_field(form, message):
    client = body_app(Settings())
    response = client.post("/search", files=[("image", ("a.png", b"A", "image/png"))], data=form)
    assert response.status_code == 422 and message in response.json()["error"]["message"], response.text


def test_multipart_without_images_and_a_second_single_image_are_422():
    client = body_app(Settings())
    none = client.post("/search", data={"k": "3"}, files=[("other", ("a.png", b"A", "image/png"))])
    assert none.status_code == 422 and "unexpected file part 'other'" in none.json()["error"]["message"]
    two = client.post("/search", files=[("image", ("a.png", b"A", "image/png")), ("image", ("b.png", b"B", "image/png"))])
    assert two.status_code == 422 and "exactly one file part named 'image'" in two.json()["error"]["message"]


def test_images_are_counted_before_any_is_decoded():
    client = body_app(Settings(max_images_per_request=2))
    bad = {"data": "not base64!"}
    assert client.post("/search", json={"images": [bad, bad, bad]}).status_code == 413
    response = client.post("/search", json={"images": [b64text(b"fine"), bad]})
    assert response.status_code == 400 and response.json()["error"] == {
        "code": "invalid_base64", "message": "images[1].data is not valid base64"}


def test_a_chunked_body_without_length_is_cut_off_at_the_request_limit_with_413():
    client = body_app(Settings(max_request_bytes=10_000))

    def chunks(total: int):
        for _ in range(total // 1000):
            yield b"x" * 1000

    response = client.post("/json", content=chunks(50_000), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    ok = client.post("/json", json={"images": [{"data": "aGk="}]})
    assert ok.status_code == 200 and ok.json() == {"images": 1}


def test_a_chunked_multipart_body_is_cut_off_at_the_request_limit_with_413():
    client = body_app(Settings(max_request_bytes=10_000))
    body = (b"--b\r\ncontent-disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n"
            + b"x" * 50_000 + b"\r\n--b--\r\n")
    response = client.post("/form", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413


@pytest.mark.parametrize("count", [3, 4, 10])
def test_more_files_than_the_image_limit_is_413_however_many(count):
    client = body_app(Settings(max_images_per_request=2))
    files = [("images", (f"{i}.png", b"x", "image/png")) for i in range(count)]
    assert client.post("/form", files=files).status_code == 413
    assert client.post("/form", files=files[:2]).json() == {"files": 2}


# --- the worker pool -----------------------------------------------------------------------------------------

def inference_of(settings: Settings) -> Inference:
    card = ModelCard(name="tiny", method="dino", arch="vit_nano", patch_size=16, embed_dim=192, num_heads=3,
                     preprocess=SPEC, segmentation_size=480, raw={})
    return Inference(settings, card, backend=None, metrics=GatewayMetrics(settings.max_inflight))  # no Triton call


def test_decoding_runs_off_the_event_loop_at_most_decode_workers_at_once():
    inference = inference_of(Settings(decode_workers=2))
    lock, running, peak, threads = threading.Lock(), [0], [0], set()

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            threads.add(threading.get_ident())
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i

    async def main():
        return threading.get_ident(), await asyncio.gather(*(inference.off_loop(work, i) for i in range(8)))

    loop_thread, results = asyncio.run(main())
    assert results == list(range(8))
    assert peak[0] == 2 and loop_thread not in threads


def test_the_default_pool_size_is_the_cores_this_process_may_use():
    assert Settings().decode_workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("margin", [0, 1])
def test_pixel_batch_is_the_embedding_input_of_each_image_at_the_servers_draft_margin(margin):
    inference = inference_of(Settings(decode_workers=2, jpeg_draft_margin=margin))
    images = [photo_jpeg(index=1), encode(noise(300, 200), "PNG"), encode(noise(64, 64).convert("RGBA"), "WEBP")]
    batch = asyncio.run(inference.pixel_batch(images))
    expected = [embedding_input(decode_for_embedding(data, SPEC, LIMIT, draft_margin=margin), SPEC) for data in images]
    np.testing.assert_array_equal(batch, np.stack(expected))
    exact_jpeg = preprocess(decode_image(images[0], LIMIT), SPEC)
    assert np.array_equal(batch[0], exact_jpeg) == (margin == 0)  # margin 1 decodes the 3 MP JPEG at 1/4
