"""Request and response bodies of ``/v1/collections/...`` and ``/v1/classify`` (the contract: docs/api.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from core.knn import DEFAULT_K, DEFAULT_TEMPERATURE

from .schemas import ImageData

MAX_K = 1000
Vector = list[Annotated[float, Field(allow_inf_nan=False)]]
ItemId = Annotated[str, Field(min_length=1, max_length=1024)]
Label = Annotated[str, Field(min_length=1, max_length=256)]
MetadataKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _exactly_one(model: BaseModel, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields)}" + (f" (got {', '.join(given)})" if given else ""))


class HnswOptions(_Strict):
    m: int = Field(32, ge=4, le=128, description="Links per node: more is better recall, more memory.")
    ef_construction: int = Field(200, ge=8, le=2048, description="Candidates while building: graph quality.")
    ef_search: int = Field(96, ge=1, le=4096, description="Candidates per query (at least k): recall vs speed.")


class CreateCollectionRequest(_Strict):
    metric: Literal["cosine"] = Field("cosine", description="Similarity; embeddings are L2-normalised.")
    index: Literal["exact", "hnsw"] = Field(
        "exact", description="'exact': compare with every vector (recall 1, fine to ~1M vectors); 'hnsw': "
                             "graph search for large collections (see docs/benchmarks.md).")
    hnsw: HnswOptions | None = Field(None, description="HNSW settings (index 'hnsw' only).")

    @model_validator(mode="after")
    def _hnsw_only_with_hnsw(self):
        if self.hnsw is not None and self.index != "hnsw":
            raise ValueError("'hnsw' settings need index 'hnsw'")
        return self


class CollectionResponse(BaseModel):
    name: str
    model: str = Field(description="The model whose embeddings the collection holds.")
    dim: int
    metric: str
    index: str
    hnsw: HnswOptions | None = None
    count: int = Field(description="Number of items.")
    created_at: str


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionResponse]


class ItemIn(_Strict):
    id: ItemId | None = Field(None, description="Caller's id; an item with the same id is replaced. Generated "
                                                "(32 hex digits) when absent.")
    image: ImageData | None = None
    vector: Vector | None = Field(None, description="A raw embedding of the collection's dimension.")
    label: Label | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, description="Any JSON object.")

    @model_validator(mode="after")
    def _image_or_vector(self):
        _exactly_one(self, ("image", "vector"))
        return self


class AddItemsRequest(_Strict):
    items: list[ItemIn] = Field(min_length=1)


class AddItemsResponse(BaseModel):
    collection: str
    ids: list[str] = Field(description="The items' ids, in request order.")
    added: int
    updated: int
    unchanged: int = Field(description="Items equal to the stored ones (nothing written).")


class ItemSummary(BaseModel):
    id: str
    label: str | None
    metadata: dict[str, Any]


class ItemResponse(ItemSummary):
    vector: list[float] | None = Field(description="The stored, L2-normalised vector (null with ?vector=false).")


class ItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ItemSummary]
    next: str | None = Field(description="Pass as 'cursor' for the next page; null on the last page.")


class SearchFilter(_Strict):
    label: Label | None = None
    metadata: dict[MetadataKey, StrictStr | StrictInt | StrictBool] = Field(
        default_factory=dict, description="Equality on metadata keys; a list in the metadata matches when it holds "
                                          "the value.")


class SearchRequest(_Strict):
    image: ImageData | None = None
    vector: Vector | None = None
    id: ItemId | None = Field(None, description="A stored item's id: its neighbours, itself left out.")
    images: list[ImageData] | None = Field(None, min_length=1)
    vectors: list[Vector] | None = Field(None, min_length=1)
    ids: list[ItemId] | None = Field(None, min_length=1)
    k: int = Field(10, ge=1, le=MAX_K)
    filter: SearchFilter | None = None

    @model_validator(mode="after")
    def _one_query_kind(self):
        _exactly_one(self, ("image", "vector", "id", "images", "vectors", "ids"))
        return self


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="Cosine similarity to the query.")
    label: str | None
    metadata: dict[str, Any]


class SearchResults(BaseModel):
    index: int
    results: list[SearchHit]


class SearchResponse(BaseModel):
    results: list[SearchHit] | None = Field(None, description="For a single query.")
    data: list[SearchResults] | None = Field(None, description="For a batch (images, vectors or ids).")


class ClassifyRequest(_Strict):
    collection: StrictStr = Field(description="A collection of labelled items.")
    images: list[ImageData] | None = Field(None, min_length=1)
    vectors: list[Vector] | None = Field(None, min_length=1)
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="Neighbours that vote (DINO: 20).")
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, le=100,
                               description="T in each neighbour's vote exp(cosine / T) (DINO: 0.07).")
    top: int = Field(5, ge=1, le=MAX_K, description="Classes returned per query.")
    filter: SearchFilter | None = Field(None, description="Vote among these items only.")

    @model_validator(mode="after")
    def _images_or_vectors(self):
        _exactly_one(self, ("images", "vectors"))
        return self


class ClassScore(BaseModel):
    label: str
    score: float = Field(description="The label's share of the neighbours' votes.")


class Classification(BaseModel):
    index: int
    label: str = Field(description="The most voted label.")
    scores: list[ClassScore]
    neighbors: list[SearchHit]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    collection: str
    k: int = Field(description="Neighbours that voted: the requested k, or fewer if the collection is smaller.")
    temperature: float
    data: list[Classification]
