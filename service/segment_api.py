"""``POST /v1/segment``: one image → foreground masks from the model's attention or patch features
(``segmentation``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from core.model_card import ModelCard
from core.segmentation import MAX_GRAPH_PATCHES, MAX_SIZE, model_input_size, render_outputs, segmentation_input

from .errors import ApiError
from .inference import Inference
from .request_body import ERROR_RESPONSES, body_kind, decode_base64, read_form, read_json, validate
from .schemas import SegmentOptions, SegmentRequest, SegmentResponse
from .settings import Settings

FILE_FIELDS = ("image", "images")


def _request_body(card: ModelCard) -> dict:
    """OpenAPI request body: JSON ``SegmentRequest``, or multipart form fields with the bounds the options are
    checked against (``SegmentOptions``, the size limits of ``model_input_size``, the model's heads)."""
    options = SegmentOptions.model_json_schema()["properties"]
    output = "|".join(options["outputs"]["items"]["enum"])
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": SegmentRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"},
            "keep_mass": options["keep_mass"],
            "size": {"type": "integer", "minimum": card.patch_size, "maximum": MAX_SIZE,
                     "description": options["size"]["description"]},
            "method": options["method"],
            "head": {**options["head"], "maximum": card.num_heads - 1},
            "outputs": {"type": "string", "pattern": f"^({output})(,({output}))*$",
                        "description": "comma-separated, e.g. mask_png,rle"},
        }, "required": ["image"], "additionalProperties": False}},
    }}}


async def read_segment_request(request: Request, settings: Settings) -> tuple[bytes, SegmentOptions]:
    """The image bytes and options, from JSON (base64 ``image.data``) or multipart (one file part named
    ``image``, or ``images`` holding exactly one file, plus form fields)."""
    if body_kind(request, settings) == "json":
        parsed = await read_json(request, settings, SegmentRequest)
        data = decode_base64(parsed.image.data, "image.data")
        return data, SegmentOptions.model_validate(parsed.model_dump(exclude={"image"}))
    form = await read_form(request, max_files=len(FILE_FIELDS))
    files = [f for name in FILE_FIELDS for f in form.getlist(name) if isinstance(f, UploadFile)]
    if len(files) != 1:
        raise ApiError(422, "validation_error",
                       f"multipart body needs exactly one file part named 'image'; it has {len(files)}")
    options = {k: v for k, v in form.items() if k not in FILE_FIELDS}
    if isinstance(options.get("outputs"), str):
        options["outputs"] = [o.strip() for o in options["outputs"].split(",") if o.strip()]
    return await files[0].read(), validate(SegmentOptions, options)


def segment_router(settings: Settings, card: ModelCard, inference: Inference) -> APIRouter:
    """The router of ``POST /v1/segment``, for ``create_app`` to include."""
    router = APIRouter()

    @router.post("/v1/segment", response_model=SegmentResponse, response_model_exclude_none=True,
                 responses=ERROR_RESPONSES, openapi_extra=_request_body(card), tags=["segmentation"])
    async def segment(request: Request) -> SegmentResponse:
        """Foreground masks from the last block's CLS attention (DINO's keep-60%-of-mass rule) or from a
        normalised cut of the patch features (TokenCut)."""
        data, options = await read_segment_request(request, settings)
        size = card.segmentation_size if options.size is None else options.size
        if options.method == "head" and options.head >= card.num_heads:
            raise ApiError(422, "validation_error",
                           f"head must be below the model's {card.num_heads} heads, got {options.head}")

        def prepare():
            img = inference.decode(data)
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

    return router
