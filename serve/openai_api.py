"""OpenAI-compatible embeddings: ``POST /v1/embeddings`` and ``GET /v1/models[/{id}]``.

Request (OpenAI's, https://platform.openai.com/docs/api-reference/embeddings/create):
``model`` (this server's model id, as ``/info`` and ``/v1/models`` name it), ``input`` (a
string or an array of at most ``max_batch`` strings; token arrays are refused),
``encoding_format`` ``"float"`` (default) or ``"base64"`` (the little-endian float32 bytes of
each vector, as OpenAI sends them), ``dimensions`` (the first N dimensions, re-normalised to
unit length), ``user`` (accepted, unused) and the extension ``input_type``: ``"query"``
(default) or ``"passage"``, which picks the encoder's prefixes. The texts are embedded by
the backend's encoder (the Serve app's batching QueryEncoder) in one batch with the texts of
concurrent requests. Answer: ``{"object": "list", "data": [{"object": "embedding", "index",
"embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``.

Errors are in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400
``invalid_request_error`` for bad input (the message names the field, as the search API's),
401 for a missing or wrong bearer token (the API key is this server's RETRIEVER_API_TOKEN),
404 ``model_not_found``, 503 when the encoder fails.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictStr,
                      WithJsonSchema)

from serve import models
from serve.api import (ApiError, ApiSettings, Backend, bearer_problem, json_object,
                       json_response, model_id, read_body, validate)
from serve.docs import body
from serve.fanout import log

OWNER = "llm-retriever"


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def embedding_request_model(max_batch: int, max_chars: int, dim: int) -> type[BaseModel]:
    Text = Annotated[StrictStr, Field(min_length=1, max_length=max_chars)]

    class EmbeddingRequest(BaseModel):
        """OpenAI's embeddings request, plus ``input_type``."""

        model_config = ConfigDict(extra="forbid")
        model: StrictStr = Field(description="the served model's id (GET /v1/models)")
        input: Annotated[list[Text], BeforeValidator(_as_list), WithJsonSchema({
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                          "maxItems": max_batch}]})] = Field(
            min_length=1, max_length=max_batch, description="a text or a list of texts")
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: models.Integer | None = Field(None, ge=1, le=dim, description=(
            "keep the first N dimensions, re-normalised to unit length"))
        input_type: Literal["query", "passage"] = Field(
            "query", description="extension: which prefixes the encoder puts before the texts")
        user: StrictStr | None = None

    return EmbeddingRequest


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of float32 LE bytes")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIError(BaseModel):
    error: dict[str, Any] = Field(description='{"message", "type", "param", "code"}')


ERRORS = {status: {"model": OpenAIError, "description": text} for status, text in (
    (400, "invalid input"), (401, "missing or wrong API key"), (404, "unknown model"),
    (503, "the encoder failed or did not answer"))}


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error") -> Response:
    """An error in OpenAI's shape."""
    return json_response({"error": {"message": message, "type": kind, "param": param,
                                    "code": code}}, status)


def vectors_out(vectors: np.ndarray, dimensions: int | None, encoding: str) -> list:
    """Each vector cut to ``dimensions`` and re-normalised, as floats or base64 float32 LE."""
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions].astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1.0)
    if encoding == "base64":
        little = vectors.astype("<f4")
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return vectors.astype(np.float32).tolist()


def add_openai_routes(app: FastAPI, backend: Backend, settings: ApiSettings,
                      token: str | None) -> list[type[BaseModel]]:
    """The /v1 routes; returns the request models to document."""
    request_model = embedding_request_model(settings.max_batch, settings.max_input_chars,
                                            backend.dim)

    def refused(request: Request) -> Response | None:
        problem = bearer_problem(request, token)
        return None if problem is None else error(
            401, f"{problem}: send 'Authorization: Bearer <token>' (the API key)",
            code="invalid_api_key")

    def served() -> str:
        return model_id(str(backend.info().get("model", "")))

    @app.get("/v1/models", response_model=ModelList, responses={401: ERRORS[401]})
    async def list_models(request: Request):
        """The one embedding model this server serves (OpenAI's model list)."""
        return refused(request) or json_response(
            {"object": "list", "data": [_model_row(served())]})

    @app.get("/v1/models/{name}", response_model=Model, responses=ERRORS)
    async def get_model(name: str, request: Request):
        """One model, by id."""
        return refused(request) or (json_response(_model_row(name)) if name == served()
                                    else _unknown_model(name))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS,
              openapi_extra=body("EmbeddingRequest"))
    async def embeddings(request: Request):
        """Embed texts (OpenAI-compatible; ``input_type`` picks query or passage prefixes)."""
        return refused(request) or await _embed(request, backend, settings, request_model,
                                                served())

    return [request_model]


def _model_row(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def _unknown_model(name: str) -> Response:
    return error(404, f"The model {name[:200]!r} does not exist: this server serves one model "
                      "(GET /v1/models)", "model", "model_not_found")


async def _embed(request: Request, backend: Backend, settings: ApiSettings,
                 request_model: type[BaseModel], served: str) -> Response:
    try:
        parsed = validate(request_model, json_object(
            await read_body(request, settings.max_body_bytes), settings))
    except ApiError as err:
        return error(400, err.message, err.param)
    if parsed.model != served:
        return _unknown_model(parsed.model)
    try:
        vectors, tokens = await asyncio.wait_for(
            backend.encode(parsed.input, parsed.input_type), max(settings.timeout_s, 30.0))
    except Exception as err:  # noqa: BLE001 - a timeout or the encoder's failure
        log.warning("embeddings: the encoder failed: %s: %s", type(err).__name__, err)
        return error(503, f"the encoder failed: {type(err).__name__}", kind="server_error")
    data = vectors_out(np.asarray(vectors), parsed.dimensions, parsed.encoding_format)
    return json_response({
        "object": "list", "model": served,
        "data": [{"object": "embedding", "index": i, "embedding": row}
                 for i, row in enumerate(data)],
        "usage": {"prompt_tokens": int(sum(tokens)), "total_tokens": int(sum(tokens))}})

