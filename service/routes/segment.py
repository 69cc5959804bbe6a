"""``POST /v1/segment``: one image → foreground masks from the model's attention or patch features
(``core.segmentation``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from core.model_card import ModelCard
from core.segmentation import MAX_GRAPH_PATCHES, MAX_SIZE, model_input_size, render_outputs, segmentation_input

from ..errors import ApiError
from ..request_body import ERROR_RESPONSES, IMAGE_FILE, Multipart, read_request, request_body
from ..schemas import SegmentOptions, SegmentRequest, SegmentResponse
from .common import CardDep, InferenceDep, SettingsDep

# One file part, named ``image`` (or ``images``, holding exactly one file); ``outputs`` comma-separated.
FORM = Multipart(files={"image": "image", "images": "image"}, single=("image",), csv_fields=("outputs",))


def openapi_body(card: ModelCard) -> dict:
    """The request body, its multipart fields with the bounds the options are checked against
    (``SegmentOptions``, the size limits of ``model_input_size``, the model's heads)."""
    options = SegmentOptions.model_json_schema()["properties"]
    output = "|".join(options["outputs"]["items"]["enum"])
    return request_body(SegmentRequest, {
        "image": IMAGE_FILE,
        "keep_mass": options["keep_mass"],
        "size": {"type": "integer", "minimum": card.patch_size, "maximum": MAX_SIZE,
                 "description": options["size"]["description"]},
        "method": options["method"],
        "head": {**options["head"], "maximum": card.num_heads - 1},
        "outputs": {"type": "string", "pattern": f"^({output})(,({output}))*$",
                    "description": "comma-separated, e.g. mask_png,rle"},
    }, required_parts=("image",))


async def segment(request: Request, settings: SettingsDep, card: CardDep, inference: InferenceDep) -> SegmentResponse:
    """Foreground masks from the last block's CLS attention (DINO's keep-60%-of-mass rule) or from a
    normalised cut of the patch features (TokenCut)."""
    options = await read_request(request, settings, SegmentRequest, FORM)
    size = card.segmentation_size if options.size is None else options.size
    if options.method == "head" and options.head >= card.num_heads:
        raise ApiError(422, "validation_error",
                       f"head must be below the model's {card.num_heads} heads, got {options.head}")

    def prepare():
        img = inference.decode(options.image.content)
        try:
            input_size = model_input_size(*img.size, size, card.patch_size)
        except ValueError as exc:
            raise ApiError(422, "validation_error", str(exc)) from None
        patches = (input_size[0] // card.patch_size) * (input_size[1] // card.patch_size)
        if options.method == "tokencut" and patches > MAX_GRAPH_PATCHES:
            raise ApiError(422, "validation_error",
                           f"method 'tokencut' takes at most {MAX_GRAPH_PATCHES} patches; size {size} gives "
                           f"{patches} for this image: use a smaller size")
        with inference.metrics.stage("preprocess"):
            return img, input_size, segmentation_input(img, input_size, card.preprocess)

    def postprocess(img, attention, grid, patch_tokens):
        with inference.metrics.stage("postprocess"):
            return render_outputs(img, attention, grid, options.keep_mass, options.method, options.outputs,
                                  options.head, patch_tokens)

    async with inference.slot():
        img, (width, height), pixels = await inference.off_loop(prepare)
        grid = (height // card.patch_size, width // card.patch_size)
        # Patch tokens are D floats a patch against one a head for the attention (64x more for ViT-S and B):
        # they travel only when the graph method needs them.
        wanted = ("attention", "patch_tokens") if options.method == "tokencut" else ("attention",)
        result = await inference.run(pixels[None], wanted)
        attention = result["attention"][0]
        patch_tokens = result["patch_tokens"][0] if options.method == "tokencut" else None
        body = await run_in_threadpool(postprocess, img, attention, grid, patch_tokens)
    return SegmentResponse(
        width=img.width, height=img.height, input_size=[width, height], grid=list(grid),
        heads=attention.shape[0], keep_mass=options.keep_mass, method=options.method,
        head=options.head if options.method == "head" else None, **body,
    )


def add_routes(router: APIRouter, card: ModelCard) -> None:
    router.add_api_route("/v1/segment", segment, methods=["POST"], response_model=SegmentResponse,
                         response_model_exclude_none=True, responses=ERROR_RESPONSES,
                         openapi_extra=openapi_body(card), tags=["segmentation"])
