"""Gateway intake: the torch-free transform equals DINO's torchvision evaluation transform exactly, and
bad files fail with the right status."""

import io

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms as T

from service.errors import ApiError
from core.transform import preprocess
from service.images import decode_image
from core.model_card import Preprocess

DINO_EVAL = T.Compose([
    T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
    T.CenterCrop(224),
    T.ToTensor(),
    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Landscape, portrait and square; shorter side above, at and below 256 (upscaled); odd sizes whose long side
# truncates; sizes where the resize keeps one side (256 wide) or the crop keeps one (224); aspect ratios up to
# the 12:1 past which the transform resizes the crop's region only.
SIZES = [(640, 480), (480, 640), (257, 1000), (300, 300), (200, 150), (2048, 1536), (1536, 2048), (1224, 816),
         (2047, 1029), (256, 400), (400, 256), (224, 224), (225, 3001), (3000, 250), (31, 17), (256, 256)]


RANDOM_SIZES = [tuple(int(v) for v in pair) for pair in np.random.default_rng(5).integers(20, 2600, (16, 2))]


@pytest.mark.parametrize("size", SIZES + RANDOM_SIZES)
def test_preprocess_is_bit_identical_to_the_dino_eval_transform(size):
    img = random_image(*size)
    ours = preprocess(img, Preprocess())
    reference = DINO_EVAL(img).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, 224, 224)
    np.testing.assert_array_equal(ours, reference)


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(img, "PNG", exif=exif), max_pixels=10**6)
    assert decoded.size == (20, 40)
    assert decoded.getpixel((10, 5))[2] > 200  # blue half is now on top
    assert decoded.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_decode_converts_other_modes_to_rgb(mode):
    img = random_image(32, 32).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode(img, fmt), max_pixels=10**6).mode == "RGB"


def test_not_an_image_is_415():
    with pytest.raises(ApiError) as err:
        decode_image(b"hello, this is text", max_pixels=10**6)
    assert err.value.status == 415


def test_truncated_jpeg_is_400():
    data = encode(random_image(200, 200))
    with pytest.raises(ApiError) as err:
        decode_image(data[: len(data) // 2], max_pixels=10**6)
    assert err.value.status == 400 and "truncated" in err.value.message


def test_empty_upload_is_400():
    with pytest.raises(ApiError) as err:
        decode_image(b"", max_pixels=10**6)
    assert err.value.status == 400


def test_pixel_limit_is_checked_from_the_header_with_413():
    data = encode(Image.new("RGB", (2000, 1000)), "PNG")
    with pytest.raises(ApiError) as err:
        decode_image(data, max_pixels=1_999_999)
    assert err.value.status == 413
    assert decode_image(data, max_pixels=2_000_000).size == (2000, 1000)


def test_torch_is_not_imported_by_the_gateway():
    import subprocess
    import sys

    code = "import sys, service.app, service.server, dinoserve.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
