"""The search API's request and response models (pydantic), and its one error shape.

``search_request_model(settings, dim)`` builds ``SearchRequest`` for one app: its limits
(``top_k`` range, query length, batch size, vector dimension) come from the app's settings
and index, so ``/openapi.json`` states the limits the server enforces. A request gives exactly
one of ``query`` (text), ``queries`` (texts, at most ``max_batch``), ``vector`` or ``vectors``;
``mode`` picks the ranking (``dense`` | ``sparse`` [BM25] | ``hybrid`` [both, fused after each
is merged over the shards]); sparse and hybrid need text.

:func:`problems` turns pydantic's validation errors into ``(status, param, message)`` rows
whose message names the field (``vector[1]``, ``fusion.k``) and the problem in words, e.g.
"top_k must be between 1 and 1000, got 0"; sizes over a limit are 413, the rest 422. The
search API answers ``{"detail": "<messages joined by '; '>"}``; ``serve/openai_api.py`` puts
the same rows in OpenAI's error shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      StrictStr, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

MODES = ("dense", "sparse", "hybrid")
INPUTS = ("query", "queries", "vector", "vectors")
# what an array field holds, for "X must be an array of ..., got ..."
ARRAY_OF = {"vector": "an array of numbers", "vectors": "an array of arrays of numbers",
            "queries": "an array of strings", "input": "a string or an array of strings"}
TOO_LARGE = {"string_too_long", "too_long", "too_large"}  # 413: the request is too big
EXPECTED = {"string_type": "a string", "int_type": "an integer", "int_from_float": "an integer",
            "int_parsing": "an integer", "float_type": "a number", "float_parsing": "a number",
            "bool_type": "a boolean", "dict_type": "an object", "model_type": "an object",
            "model_attributes_type": "an object"}


def kind(value: Any) -> str:
    """A JSON value's kind in words ("a string", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "an object"


def _integral(value: Any) -> Any:
    """10.0 is the integer 10 (JSON has one number type); 2.5 stays and is refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("empty", "is empty")
    return text


Integer = Annotated[int, BeforeValidator(_integral), Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # ints are numbers too; booleans and text not


class FusionOptions(BaseModel):
    """How ``mode: hybrid`` fuses the merged dense and BM25 rankings of each query."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["rrf", "weighted"] = Field(
        "rrf", description="rrf: reciprocal rank fusion, sum of 1 / (rrf_k + rank); weighted: "
                           "weight * dense + (1 - weight) * sparse, each min-max normalised")
    rrf_k: Integer = Field(60, ge=1, le=100_000, description="RRF's rank constant")
    weight: Number = Field(0.5, ge=0.0, le=1.0, description="the dense ranking's weight "
                                                            "(weighted)")


def search_request_model(max_top_k: int, default_top_k: int, max_query_chars: int,
                         max_batch: int, dim: int) -> type[BaseModel]:
    """``SearchRequest`` with this app's limits (see the module docstring)."""

    def dims(vector: list[float]) -> list[float]:
        if len(vector) != dim:
            raise PydanticCustomError("dims", "has {got} dimensions; the index has {dim}",
                                      {"got": len(vector), "dim": dim})
        return vector

    Text = Annotated[StrictStr, Field(max_length=max_query_chars), AfterValidator(_not_blank)]
    Vector = Annotated[list[Number], AfterValidator(dims)]

    class SearchRequest(BaseModel):
        """One query (``query`` or ``vector``) or a batch (``queries`` or ``vectors``)."""

        model_config = ConfigDict(extra="forbid")
        query: Text | None = Field(None, description="query text")
        queries: list[Text] | None = Field(None, min_length=1, max_length=max_batch,
                                           description="query texts: one answer each")
        vector: Vector | None = Field(None, description=f"a query vector ({dim} numbers)")
        vectors: list[Vector] | None = Field(None, min_length=1, max_length=max_batch,
                                             description="query vectors: one answer each")
        top_k: Integer = Field(default_top_k, ge=1, le=max_top_k, description="hits per query")
        mode: Literal["dense", "sparse", "hybrid"] = Field(
            "dense", description="dense (vectors), sparse (BM25) or hybrid (both, fused)")
        fusion: FusionOptions = Field(default_factory=FusionOptions)

        @model_validator(mode="after")
        def one_input(self):
            given = [name for name in INPUTS if getattr(self, name) is not None]
            if len(given) != 1:
                raise PydanticCustomError("input_choice", "give exactly one of 'query' (text), "
                                          "'queries' (texts), 'vector' or 'vectors' (numbers)"
                                          + (f"; {' and '.join(given)} were given" if given
                                             else ""))
            if self.mode != "dense" and given[0] in ("vector", "vectors"):
                raise PydanticCustomError("needs_text", f"mode {self.mode!r} needs query text "
                                          "('query' or 'queries'): BM25 scores words, not "
                                          "vectors")
            return self

        @property
        def batch(self) -> bool:
            return self.queries is not None or self.vectors is not None

        @property
        def texts(self) -> list[str] | None:
            return [self.query] if self.query is not None else self.queries

        @property
        def vector_rows(self) -> list[list[float]] | None:
            return [self.vector] if self.vector is not None else self.vectors

    return SearchRequest


class Hit(BaseModel):
    rank: int
    doc_id: str
    score: float | None = Field(description="null when not finite")
    title: str | None = Field(None, description="with a doc store only")
    text: str | None = Field(None, description="with a doc store only")


class Ranked(BaseModel):
    hits: list[Hit]


class _Answer(BaseModel):
    top_k: int
    mode: str
    partial: bool = Field(description="true when shards are missing from the answer")
    missing_shards: list[str]
    errors: dict[str, str] = Field(description="why each missing shard is missing")
    shards: int
    took_ms: float


class SearchResponse(_Answer):
    """The answer to ``query`` or ``vector``."""

    hits: list[Hit]


class BatchSearchResponse(_Answer):
    """The answer to ``queries`` or ``vectors``: ``results[i]`` answers input ``i``."""

    results: list[Ranked]


class Info(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="the query encoder's id (never a path)")
    model_hash: str | None = None
    shards: int
    searchers: list[list[str]]
    rows: int
    dims: int
    index_type: str
    sparse: bool = Field(False, description="BM25 shards loaded: sparse and hybrid modes work")
    docs: bool = False


class Health(BaseModel):
    status: Literal["ok"]


class ErrorDetail(BaseModel):
    detail: str


ERRORS = {status: {"model": ErrorDetail, "description": text} for status, text in (
    (400, "not JSON, or not an object"), (401, "missing or wrong bearer token"),
    (413, "body, query or batch too large"), (422, "a field is missing, unknown or invalid"),
    (503, "the query encoder failed or did not answer"))}


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _bounds(model: type[BaseModel], loc: Sequence[Any]) -> tuple[Any, Any]:
    """(lowest, highest) allowed for the field at ``loc`` (None where unbounded)."""
    fields, low, high = model.model_fields, None, None
    for part in loc:
        info = fields.get(part) if isinstance(part, str) else None
        if info is None:
            break
        for item in info.metadata:
            low = getattr(item, "ge", None) if getattr(item, "ge", None) is not None else low
            high = getattr(item, "le", None) if getattr(item, "le", None) is not None else high
        nested = info.annotation
        fields = nested.model_fields if isinstance(nested, type) and issubclass(
            nested, BaseModel) else {}
    return low, high


def _message(model: type[BaseModel], error: dict) -> str:
    """One pydantic error in words, naming the field."""
    kind_, loc, value = error["type"], error["loc"], error.get("input")
    ctx, path = error.get("ctx") or {}, _path(error["loc"])
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind_ == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        return f"{path} is a non-finite number (past the float range)"
    if kind_ in EXPECTED:
        return f"{path} must be {EXPECTED[kind_]}, got {kind(value)}"
    if kind_ == "list_type":
        return f"{path} must be {ARRAY_OF.get(field, 'an array')}, got {kind(value)}"
    if kind_ in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _bounds(model, loc)
        return f"{path} must be between {low} and {high}, got {value}"
    if kind_ == "string_too_long":
        return f"{path} is {len(value)} characters; the limit is {ctx['max_length']}"
    if kind_ == "too_long":
        return f"{path} holds {ctx['actual_length']} items; the limit is {ctx['max_length']}"
    if kind_ == "too_short":
        return f"{path} is empty" if ctx.get("min_length") == 1 else \
            f"{path} holds {ctx['actual_length']} items; at least {ctx['min_length']} needed"
    if kind_ == "literal_error":
        return f"{path} must be {ctx['expected']}, got {value!r}"
    if kind_ == "missing":
        return f"{path} is required"
    return f"{path} {error['msg']}" if loc else error["msg"]


def problems(model: type[BaseModel], err: ValidationError) -> list[tuple[int, str, str]]:
    """``(status, param, message)`` for each problem; unknown fields come first, in one row
    per object, naming the fields that object takes."""
    rows, unknown = [], {}
    for error in err.errors(include_url=False):
        if error["type"] == "extra_forbidden":
            unknown.setdefault(tuple(error["loc"][:-1]), []).append(str(error["loc"][-1]))
            continue
        status = 413 if error["type"] in TOO_LARGE else 422
        rows.append((status, _path(error["loc"]), _message(model, error)))
    for parent, names in reversed(list(unknown.items())):
        where = f" in {_path(parent)}" if parent else ""
        allowed = _allowed(model, parent)
        rows.insert(0, (422, _path([*parent, names[0]]),
                        f"unknown field(s) {', '.join(map(repr, names))}{where}: expected "
                        f"{', '.join(map(repr, allowed))}"))
    return rows


def _allowed(model: type[BaseModel], parent: Sequence[Any]) -> list[str]:
    for part in parent:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None or not (isinstance(info.annotation, type)
                                and issubclass(info.annotation, BaseModel)):
            return []
        model = info.annotation
    return list(model.model_fields)
