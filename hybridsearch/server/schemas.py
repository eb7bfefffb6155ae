"""Request and response bodies of the HTTP API as pydantic models.

These models are the only description of the API: FastAPI validates every request body with
them and generates ``/openapi.json`` from them. Where a rule needs a clearer message than
pydantic's (a blank query, a lone surrogate, a filter operator), a validator raises it, and the
field's JSON schema states the same rule (``pattern``) so the document and the server agree.

Limits that depend on the server's settings (query length in characters and tokens, queries x k)
are checked by the endpoint and described in the field descriptions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from ..index.filters import check_filter
from ..index.hybrid import _check_query_inputs

MAX_K = 1000  # hits per query; bounds the arrays a request can make the index allocate
MAX_CANDIDATES = 10_000
MAX_QUERIES = 64  # queries in one batched search request
CHANNEL_NAMES = ("dense", "sparse", "colbert", "bm25")

Channel = Literal["dense", "sparse", "colbert", "bm25"]
Mode = Literal["dense", "sparse", "colbert", "bm25", "hybrid"]
NotBlank = Annotated[StrictStr, Field(json_schema_extra={"pattern": r"\S"})]
Weight = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


Number = StrictInt | StrictFloat


class FilterOps(_Request):
    """Conditions on one field (all must hold). A document without the field fails every condition
    on it except ``ne``; ranges only match numbers."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    eq: Any = None
    ne: Any = None
    in_: list[Any] = Field(None, alias="in")
    gt: Number = None
    gte: Number = None
    lt: Number = None
    lte: Number = None

    @model_validator(mode="before")
    @classmethod
    def _some(cls, v):
        if isinstance(v, dict) and not v:
            raise ValueError("a filter condition needs at least one operator (eq, ne, in, gt, gte, lt, lte)")
        return v


Equality = StrictStr | StrictInt | StrictFloat | StrictBool | list[Any] | None


class SearchRequest(_Request):
    """One query (answered with ``hits``) or a batch (answered with ``results``, one list per query).

    Options left out keep the library's defaults, so a request ranks exactly as
    ``index.search(query)`` does in Python."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"query": "how does late interaction score a passage?"},
        {"query": "late interaction", "k": 5, "mode": "hybrid",
         "weights": {"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0.1},
         "filter": {"year": {"gte": 2020}, "lang": "en"}, "candidates": 200, "fusion": "weighted"},
        {"query": ["bm25 ranking", "photosynthesis"], "k": 3, "fusion": "rrf",
         "filter": {"title": {"in": ["BM25", "ColBERT"]}}},
        {"query": "inverted index", "k": 10, "mode": "bm25"},
    ]})

    query: NotBlank | Annotated[list[NotBlank], Field(min_length=1, max_length=MAX_QUERIES)] = Field(
        description="a query, or a list of queries searched as one batch. Not blank; the server also "
                    "caps its length in characters and in tokens (400 beyond: see the README).")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="hits per query (queries x k is capped too)")
    mode: Mode = Field("hybrid", description="one channel, or `hybrid` to fuse them; a channel the index "
                                             "lacks is a 400")
    weights: dict[Channel, Weight] | None = Field(
        None, description="hybrid only; merged over the model's default weights")
    filter: dict[str, FilterOps | Equality] | None = Field(
        None, description="every condition must hold: `{\"field\": value}`, `{\"field\": {\"gte\": 1, "
                          "\"lt\": 5}}`, `{\"field\": {\"in\": [...]}}`, `{\"field\": {\"ne\": x}}`; ops "
                          "eq, ne, in, gt, gte, lt, lte")
    candidates: StrictInt | None = Field(
        None, ge=1, le=MAX_CANDIDATES,
        description="hits each first-stage channel contributes to the hybrid union (default, as in the "
                    "library: 100 for BGE-M3, 1000 for a dense-only model)")
    fusion: Literal["weighted", "rrf"] = "weighted"
    normalize: list[Channel] | None = Field(
        None, description="channels normalised per query before a weighted sum (default: the model's)")

    @field_validator("query")
    @classmethod
    def _query_text(cls, v):
        _check_query_inputs(v, None, ())  # blank, lone surrogates: the library's own messages
        return v

    @field_validator("filter")
    @classmethod
    def _filter(cls, v):
        if v is None:
            return None
        plain = {f: c.model_dump(by_alias=True, exclude_unset=True) if isinstance(c, FilterOps) else c
                 for f, c in v.items()}
        try:
            return check_filter(plain)  # numbers: finite, 64-bit
        except TypeError as e:  # pydantic reports ValueError; the message is what matters
            raise ValueError(str(e)) from e

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``index.search``: only what the request gave (None = default)."""
        return {k: getattr(self, k) for k in sorted(self.model_fields_set - {"query"}) if getattr(self, k) is not None}

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


class Document(_Request):
    id: StrictStr = Field(min_length=1)
    text: NotBlank = Field(min_length=1, description="must not be blank")
    metadata: dict[str, Any] | None = Field(None, description="JSON values; filterable by field")

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v):
        if not v.strip():
            raise ValueError("the text is empty or blank")
        return v


class AddRequest(_Request):
    """Documents to add (or replace, with ``upsert``) in one atomic commit."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"documents": [{"id": "d1", "text": "Dense retrieval encodes a query and a passage into vectors.",
                        "metadata": {"title": "Dense retrieval", "year": 2020}},
                       {"id": "d2", "text": "BM25 is a lexical ranking function."}]},
        {"documents": [{"id": "d1", "text": "Dense retrieval, revised.", "metadata": {"year": 2024}}],
         "upsert": True},
    ]})

    documents: list[Document] = Field(min_length=1, description="ids must be unique within the request")
    upsert: StrictBool = Field(False, description="replace documents whose id exists")


class DeleteRequest(_Request):
    """Ids to delete in one atomic commit; if any is unknown, nothing is deleted (404)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ids": ["d1", "d2"]}]})

    ids: list[Annotated[StrictStr, Field(min_length=1)]] = Field(min_length=1)


class CompactRequest(_Request):
    """No parameters: send ``{}`` or no body."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"maxProperties": 0, "examples": [{}]})

    @model_validator(mode="before")
    @classmethod
    def _empty(cls, v):
        if isinstance(v, dict) and v:
            raise ValueError("compact takes no parameters: send {} or no body")
        return v


# --------------------------------------------------------------------------- responses


class Error(BaseModel):
    error: str = Field(description="what went wrong")


class Hit(BaseModel):
    id: str
    score: float | None = Field(description="the fused (hybrid) or channel score; null only if not finite")
    text: str
    metadata: dict[str, Any]
    scores: dict[Channel, float | None] = Field(
        description="each channel's score; null where the channel did not see the document")
    contributions: dict[str, float] | None = Field(
        None, description="hybrid weighted fusion: each channel's term in the fused score (they sum to it)")
    rerank_score: float | None = None


class SearchResponse(BaseModel):
    hits: list[Hit]


class BatchSearchResponse(BaseModel):
    results: list[list[Hit]]


class AddResponse(BaseModel):
    added: int = Field(ge=1)
    upsert: bool
    documents: int = Field(ge=0, description="live documents after the commit")


class DeleteResponse(BaseModel):
    deleted: int = Field(ge=0)
    documents: int = Field(ge=0)


class CompactResponse(BaseModel):
    documents: int = Field(ge=0)
    segments: int = Field(ge=0)


class Health(BaseModel):
    status: Literal["ok"]
    documents: int = Field(ge=0)


class Ready(BaseModel):
    status: Literal["ready"]
    documents: int = Field(ge=0)
    generation: int = Field(ge=0)


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    channels: list[Channel]
    documents: int = Field(ge=0)
    segments: int = Field(ge=0)
    generation: int = Field(ge=0)
