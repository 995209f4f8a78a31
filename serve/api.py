"""The search HTTP API: request validation, bearer-token auth, shard fan-out, merge and fusion.

``make_api(backend, settings)`` returns the FastAPI app; it knows nothing about Ray, so the
same app runs inside the Serve ``Router`` deployment (whose backend calls the QueryEncoder and
ShardSearcher deployments through handles) and in-process over loaded shards
(``serve/local.py``). Request and response models: ``serve/models.py``; OpenAPI and Swagger
UI: ``serve/docs.py``; OpenAI-compatible embeddings: ``serve/openai_api.py``.

Endpoints::

    POST /search   {"query": str} | {"queries": [str, ..]} | {"vector": [float, ..]} |
                   {"vectors": [[float, ..], ..]}, optional "top_k" (default 10),
                   "mode": "dense" | "sparse" | "hybrid", "fusion": {"method": "rrf" |
                   "weighted", "rrf_k": 60, "weight": 0.5}
                   -> {"hits": [{"rank", "doc_id", "score"[, "title", "text"]}] (one input)
                       or "results": [{"hits": [..]}, ..] (a batch, in input order),
                       "top_k", "mode", "partial", "missing_shards", "errors", "shards",
                       "took_ms"}
    POST /v1/embeddings, GET /v1/models      OpenAI-compatible (serve/openai_api.py)
    GET  /healthz  liveness; never needs a token
    GET  /info     model, shards, rows, dims, index type, search parameters, sparse
    GET  /openapi.json, /docs                the API's description and its Swagger UI page
    GET  /         a small search page that calls POST /search

A request, single or batch, costs one encoder call (all its texts in one batch) and one call
per searcher (``serve/fanout.py``; concurrent requests are coalesced further). Each searcher
answers the dense and the BM25 ranking in that one call; the Router merges each ranking over
the shards and, for ``hybrid``, fuses the two merged rankings (``retriever.index.fusion``, each
fetched ``fusion.depth(top_k)`` deep, as the offline ``hybrid_run``). Sparse and hybrid need an
index built with BM25 shards (``retriever index --sparse true``): otherwise a 422 says so.

Every searcher is asked concurrently, each under its own timeout; the shards of a searcher
that errs or does not answer in time are left out and named (``"partial": true``,
``"missing_shards"``, ``"errors"``): a shard failure never turns into a 5xx, and its exception
stays in the server log. Bad requests get a 4xx whose ``detail`` names the field and the
problem: 400 (not JSON, nested too deeply, not an object, a bad Content-Length), 413 (body,
query or batch too large: a declared Content-Length over the limit is refused before the body
is read, a chunked body as soon as it passes the limit), 422 (missing, unknown or mistyped
fields, empty query, top_k out of range, wrong vector dimension, a mode the index cannot
answer). When ``RETRIEVER_API_TOKEN`` is set every endpoint but ``/healthz``, the page ``/``
and Swagger UI's static files wants ``Authorization: Bearer <token>`` (401 otherwise; a
browser cannot send a header when it opens a page: the page asks for the token, keeps it for
the tab and sends it with each call). ``/info`` names the model by its id (a local directory
by its last path component, never its path) and its weights identity (``model_hash``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from retriever.index.ranking import Hit, merge
from serve import models
from serve.docs import PUBLIC, add_docs_routes, body
from serve.fanout import SHARD_FAILED, Coalescer, ShardAnswer, ShardQuery, fan_out, log
from serve.proxy import BODY_KEY

__all__ = ["TOKEN_ENV", "ApiSettings", "ApiError", "Backend", "Coalescer", "InFlight",
           "SHARD_FAILED", "fan_out", "make_api", "model_id", "public_info", "read_body"]

TOKEN_ENV = "RETRIEVER_API_TOKEN"
PAGE = Path(__file__).with_name("page.html")


@dataclass
class ApiSettings:
    """Limits and timeouts of the HTTP API."""

    timeout_s: float = 2.0  # per shard
    max_top_k: int = 1000
    default_top_k: int = 10
    max_query_chars: int = 2048
    max_batch: int = 128  # texts or vectors in one /search or /v1/embeddings request
    max_input_chars: int = 32768  # one /v1/embeddings input (passages are longer than queries)
    max_body_bytes: int = 1 << 20
    token_env: str = TOKEN_ENV

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise ValueError(f"default_top_k {self.default_top_k} must be in 1..max_top_k "
                             f"({self.max_top_k})")
        for name in ("max_query_chars", "max_batch", "max_input_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Backend(Protocol):
    """What the API needs from whoever holds the encoder and the shards."""

    dim: int
    sparse: bool  # BM25 shards are loaded: the sparse and hybrid modes work
    shard_names: Sequence[str]
    shard_groups: Sequence[Sequence[str]]  # the shard names each searcher holds

    async def encode(self, texts: list[str], kind: str = "query"
                     ) -> tuple[np.ndarray, list[int]]:
        """(vectors [n, dim] float32, tokens per text); ``kind`` picks the prefixes."""

    def search_group(self, number: int, query: ShardQuery) -> Awaitable[ShardAnswer]:
        """The merged rankings of the shards in group ``number``."""

    def info(self) -> dict: ...

    def doc(self, doc_id: str) -> tuple[str, str] | None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass ``limit`` bytes: by its
    declared Content-Length before any of it is read, else while it streams in (chunked).
    A body Serve's proxy carried in the scope (``serve/proxy.py``) is taken from there: no
    call back to the proxy."""
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a byte count")
        if len(declared) > 18 or int(declared) > limit:
            raise ApiError(413, f"request body is {declared[:40]} bytes; the limit is {limit}")
    carried = request.scope.get(BODY_KEY)
    if isinstance(carried, bytes) and len(carried) <= limit:
        return carried
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over {limit} bytes; the limit is {limit}")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, parsed by pydantic's parser (~9x faster than ``json`` on a
    vector of 384 numbers: ~0.1 ms of a request) where it accepts the body, which it then reads
    as Python's ``json`` does; where it refuses, Python's ``json`` decides (lone surrogates, a
    UTF-8 BOM, deep nesting), so every refusal and its message stay ``json``'s."""
    try:
        return from_json(body)
    except ValueError:
        return json.loads(body)


def json_object(body: bytes, settings: ApiSettings) -> dict:
    """The body as a JSON object (413 when too large, 400 when not JSON or not an object)."""
    if len(body) > settings.max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is "
                            f"{settings.max_body_bytes}")
    try:
        payload = parse_json(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    except RecursionError:  # the C parser recurses once per level of [ or {
        raise ApiError(400, "the body nests arrays or objects too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the body must be a JSON object like {{\"query\": \"...\", "
                            f"\"top_k\": 10}}, got {models.kind(payload)}")
    return payload


def validate(model: type[BaseModel], payload: dict) -> Any:
    """``payload`` as ``model``, or :class:`ApiError` naming every problem
    (``serve.models.problems``; the first problem's status)."""
    try:
        return model.model_validate(payload)
    except ValidationError as err:
        rows = models.problems(model, err)
        raise ApiError(rows[0][0], "; ".join(message for _, _, message in rows),
                       rows[0][1] or None) from None


def vector_matrix(rows: list[list[float]], name: str) -> np.ndarray:
    """Validated vectors as float32 ``[n, dim]``; 422 when one is not finite in float32."""
    with np.errstate(over="ignore"):  # past float32's range is inf, refused below
        array = np.asarray(rows, dtype=np.float64).astype(np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        where = name if len(rows) == 1 and name == "vector" else \
            f"{name}[{int(np.argmin(finite))}]"
        raise ApiError(422, f"{where} holds a non-finite number (NaN or infinity, or past "
                            "the float32 range)")
    return array


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False, allow_nan=False), status_code=status,
                    media_type="application/json", headers=headers)


class InFlight:
    """The HTTP requests an app is handling now (``requests``), counted by :func:`make_api`'s
    middleware: the Serve Router answers a search on the spot when it is the only one
    (``serve.fanout.Coalescer``'s ``alone``) and coalesces it with the others otherwise."""

    def __init__(self):
        self.requests = 0


class _CountRequests:
    """Pure ASGI middleware (no per-request objects): ``in_flight.requests`` up while an HTTP
    request is handled."""

    def __init__(self, app, in_flight: InFlight):
        self.app, self.in_flight = app, in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.in_flight.requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.requests -= 1


def make_api(backend: Backend, settings: ApiSettings | None = None,
             in_flight: InFlight | None = None) -> FastAPI:
    """The app over ``backend``; with ``in_flight``, it counts the requests under way there."""
    from serve.openai_api import add_openai_routes

    settings = settings or ApiSettings()
    token = os.environ.get(settings.token_env) or None
    app = FastAPI(title="llm-retriever search", version="2", docs_url=None, redoc_url=None,
                  openapi_url=None, description=__doc__.split("\n\n")[0])
    if in_flight is not None:
        app.add_middleware(_CountRequests, in_flight=in_flight)

    def denied(request: Request) -> Response | None:
        return _denied(request, token)

    request_model = models.search_request_model(
        settings.max_top_k, settings.default_top_k, settings.max_query_chars,
        settings.max_batch, backend.dim)
    _add_status_routes(app, backend, denied, PAGE.read_text(encoding="utf-8"))
    _add_search_route(app, backend, settings, denied, request_model)
    openai_models = add_openai_routes(app, backend, settings, token)
    add_docs_routes(app, [request_model, *openai_models], denied, token is not None)
    return app


def bearer_problem(request: Request, token: str | None) -> str | None:
    """None when the request may pass (no token set, or the right bearer token), else what
    is wrong with its Authorization header."""
    if token is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                          token.encode()):
        return None
    return ("missing Authorization header" if not scheme else
            "wrong token" if scheme.lower() == "bearer" else
            f"unsupported auth scheme {scheme!r}")


def _denied(request: Request, token: str | None) -> Response | None:
    """None when the request may pass, else a 401."""
    problem = bearer_problem(request, token)
    if problem is None:
        return None
    return json_response({"detail": f"{problem}: send 'Authorization: Bearer <token>'"}, 401,
                         {"WWW-Authenticate": "Bearer"})


def _add_status_routes(app: FastAPI, backend: Backend,
                       denied: Callable[[Request], Response | None], page: str) -> None:
    """``GET /healthz`` (never needs a token), ``GET /info`` and the search page ``GET /``."""

    @app.get("/healthz", response_model=models.Health, openapi_extra=PUBLIC)
    async def healthz():
        """Liveness: the ingress answers."""
        return json_response({"status": "ok"})

    @app.get("/info", response_model=models.Info, responses={401: models.ERRORS[401]})
    async def info(request: Request):
        """The index, the model, the shards each searcher holds and the search parameters."""
        return denied(request) or json_response(public_info(backend.info()))

    @app.get("/", response_class=HTMLResponse, openapi_extra=PUBLIC)
    async def index_page():  # no token: the page holds no data and asks for the token itself
        """A search page (asks for the token itself when one is needed)."""
        return HTMLResponse(page)


def model_id(model: str) -> str:
    """A model's public name: a packaged name as it is, a directory (local path or URL) by its
    last path component, so that no caller learns where the server keeps its files."""
    if "/" not in model and "\\" not in model:
        return model
    return PurePosixPath(model.replace("\\", "/").rstrip("/")).name or "model"


def public_info(info: dict) -> dict:
    """``/info``: the backend's description with the model named by :func:`model_id` and its
    weights identity (``model_hash``, null when the index recorded none)."""
    return {**info, "model": model_id(str(info.get("model", ""))),
            "model_hash": info.get("model_hash")}


def _add_search_route(app: FastAPI, backend: Backend, settings: ApiSettings,
                      denied: Callable[[Request], Response | None],
                      request_model: type[BaseModel]) -> None:
    """``POST /search``: validate, encode the texts if no vectors came, fan out, merge, fuse."""

    @app.post("/search", response_model=models.SearchResponse | models.BatchSearchResponse,
              responses={k: v for k, v in models.ERRORS.items()},
              openapi_extra=body("SearchRequest"),
              summary="Search the index: one query or a batch, dense, sparse (BM25) or hybrid")
    async def search(request: Request):
        """The top ``top_k`` documents of each query; for hybrid, the fusion of the dense and
        the BM25 ranking, each merged over every shard first."""
        refused = denied(request)
        if refused is not None:
            return refused
        started = time.perf_counter()
        try:
            body_bytes = await read_body(request, settings.max_body_bytes)
            parsed = validate(request_model, json_object(body_bytes, settings))
            if parsed.mode != "dense" and not backend.sparse:
                raise ApiError(422, f"mode {parsed.mode!r} needs BM25 shards; this index has "
                                    "dense shards only (build it with `retriever index "
                                    "--sparse true`)")
            vectors = (vector_matrix(parsed.vector_rows, "vector" if parsed.vector is not None
                                     else "vectors")
                       if parsed.vector_rows is not None else None)
        except ApiError as err:
            return json_response({"detail": err.message}, err.status)
        return await _answer(backend, settings, parsed, vectors, started)


async def _answer(backend: Backend, settings: ApiSettings, parsed, vectors: np.ndarray | None,
                  started: float) -> Response:
    """Encode (when dense needs vectors of texts), fan out once, merge, fuse: the response."""
    from retriever.index import fusion

    mode, k, texts = parsed.mode, parsed.top_k, parsed.texts
    if mode != "sparse" and vectors is None:
        vectors = await _encode_queries(backend, texts, settings)
        if isinstance(vectors, Response):
            return vectors
    depth = fusion.depth(k) if mode == "hybrid" else k
    query = ShardQuery(vectors if mode != "sparse" else None,
                       texts if mode != "dense" else None, depth)
    answers, errors = await _search_shards(backend, query, settings)
    rows = len(texts) if texts is not None else len(vectors)
    dense = _merged(answers, "dense", rows, depth) if mode != "sparse" else None
    sparse = _merged(answers, "sparse", rows, depth) if mode != "dense" else None
    if mode == "hybrid":
        config = fusion.FusionConfig(parsed.fusion.method, parsed.fusion.rrf_k,
                                     parsed.fusion.weight)
        ranked = fusion.fuse_all(dense, sparse, k, config)
    else:
        ranked = dense if dense is not None else sparse
    missing = [n for n in backend.shard_names if n in errors]
    out: dict[str, Any] = {}
    if parsed.batch:
        out["results"] = [{"hits": _hit_rows(backend, hits)} for hits in ranked]
    else:
        out["hits"] = _hit_rows(backend, ranked[0])
    out.update({"top_k": k, "mode": mode, "partial": bool(missing), "missing_shards": missing,
                "errors": errors, "shards": len(backend.shard_names),
                "took_ms": round((time.perf_counter() - started) * 1000, 3)})
    return json_response(out)


async def _encode_queries(backend: Backend, texts: list[str],
                          settings: ApiSettings) -> np.ndarray | Response:
    """The texts' query vectors, or a 503 response when the encoder fails or does not answer."""
    try:
        vectors, _ = await asyncio.wait_for(backend.encode(texts, "query"),
                                            max(settings.timeout_s, 30.0))
        return vectors
    except asyncio.TimeoutError:
        return json_response({"detail": "the query encoder did not answer in time"}, 503)
    except Exception as err:  # noqa: BLE001
        log.warning("the query encoder failed: %s: %s", type(err).__name__, err)
        return json_response({"detail": f"the query encoder failed: {type(err).__name__}"},
                             503)


async def _search_shards(backend: Backend, query: ShardQuery, settings: ApiSettings
                         ) -> tuple[list[ShardAnswer], dict[str, str]]:
    """Ask every searcher concurrently: the answers that came and, per shard left out, why."""
    groups = backend.shard_groups
    labels = [", ".join(names) for names in groups]  # what the log names on a failure
    calls = [lambda g=g: backend.search_group(g, query) for g in range(len(groups))]
    answers, failures = await fan_out(calls, labels, settings.timeout_s)
    errors = {name: failures[label]
              for label, names in zip(labels, groups) if label in failures for name in names}
    return [answers[label] for label in labels if label in answers], errors


def _merged(answers: Sequence[ShardAnswer], ranking: str, rows: int,
            k: int) -> list[list[Hit]]:
    """Each query's global top-``k`` of one ranking ("dense" / "sparse") over the answers."""
    per_group = [getattr(answer, ranking).rows() for answer in answers]
    return [merge([group[r] for group in per_group], k) for r in range(rows)]


def _hit_rows(backend: Backend, hits: Sequence[Hit]) -> list[dict]:
    """The response's hits: rank, doc id, score (null when not finite), title and text if
    the backend has the document."""
    out = []
    for rank, (doc_id, score) in enumerate(hits, start=1):
        hit = {"rank": rank, "doc_id": doc_id,
               "score": score if math.isfinite(score) else None}
        doc = backend.doc(doc_id)
        if doc is not None:
            hit["title"], hit["text"] = doc
        out.append(hit)
    return out
