"""The search HTTP API: request validation, bearer-token auth, shard fan-out and merge.

``make_api(backend, settings)`` returns the FastAPI app; it knows nothing about Ray, so the
same app runs inside the Serve ``Router`` deployment (whose backend calls the QueryEncoder and
ShardSearcher deployments through handles) and in-process over loaded shards.

Endpoints::

    POST /search   {"query": str} or {"vector": [float, ...]}, optional "top_k" (default 10)
                   -> {"hits": [{"rank", "doc_id", "score"[, "title", "text"]}], "top_k",
                       "partial", "missing_shards", "errors", "shards", "took_ms"}
    GET  /healthz  liveness; never needs a token
    GET  /info     model, shards, rows, dims, index type, search parameters
    GET  /         a small search page that calls POST /search

The shards are held by searchers (``shard_groups``: one ShardSearcher deployment per group,
usually one shard each). Every searcher is asked concurrently, each under its own timeout; the
shards of a searcher that errs or does not answer in time are left out and named
(``"partial": true``, ``"missing_shards"``, ``"errors"``): a shard failure never turns into a
5xx, and its exception stays in the server log (the answer names the shard and a generic
reason). Bad requests get a 4xx whose ``detail`` says what is wrong: 400 (not JSON, nested too
deeply, not an object, a bad Content-Length), 413 (body or query too large: a declared
Content-Length over the limit is refused before the body is read, a chunked body as soon as it
passes the limit), 422 (missing, unknown or mistyped fields, empty query, top_k out of range,
wrong vector dimension). When ``RETRIEVER_API_TOKEN`` is set ``/info`` and ``/search`` want
``Authorization: Bearer <token>`` (401 otherwise); ``/healthz`` and the page ``/`` do not (a
browser cannot send a header when it opens a page: the page asks for the token, keeps it for
the tab and sends it with each call). ``/info`` names the model by its id (a local directory by
its last path component, never its path) and its weights identity (``model_hash``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Awaitable, Callable, Protocol, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from retriever.index.ranking import Hit, merge

TOKEN_ENV = "RETRIEVER_API_TOKEN"
PAGE = Path(__file__).with_name("page.html")
SHARD_FAILED = "failed; the error is in the server log"
# In a Serve replica this logger goes to the replica's log file; in-process, to the root's.
log = logging.getLogger("ray.serve")


@dataclass
class ApiSettings:
    """Limits and timeouts of the HTTP API."""

    timeout_s: float = 2.0  # per shard
    max_top_k: int = 1000
    default_top_k: int = 10
    max_query_chars: int = 2048
    max_body_bytes: int = 1 << 20
    token_env: str = TOKEN_ENV

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise ValueError(f"default_top_k {self.default_top_k} must be in 1..max_top_k "
                             f"({self.max_top_k})")
        if self.max_query_chars < 1:
            raise ValueError(f"max_query_chars must be >= 1, got {self.max_query_chars}")


class Backend(Protocol):
    """What the API needs from whoever holds the encoder and the shards."""

    dim: int
    shard_names: Sequence[str]
    shard_groups: Sequence[Sequence[str]]  # the shard names each searcher holds

    async def encode(self, text: str) -> np.ndarray: ...

    def search_group(self, number: int, vector: np.ndarray, k: int) -> Awaitable[list[Hit]]:
        """The merged top-k of the shards in group ``number``."""

    def info(self) -> dict: ...

    def doc(self, doc_id: str) -> tuple[str, str] | None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class SearchRequest:
    top_k: int
    query: str | None = None
    vector: np.ndarray | None = None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def parse_search(body: bytes, settings: ApiSettings, dim: int) -> SearchRequest:
    """The validated request, or :class:`ApiError` naming what is wrong."""
    payload = _json_object(body, settings)
    unknown = sorted(set(payload) - {"query", "vector", "top_k"})
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(map(repr, unknown))}: expected "
                            "'query' or 'vector', and optionally 'top_k'")
    top_k = _top_k(payload, settings)
    has_query, has_vector = "query" in payload, "vector" in payload
    if has_query == has_vector:
        raise ApiError(422, "give exactly one of 'query' (text) or 'vector' (numbers)" +
                            ("; both were given" if has_query else ""))
    if has_query:
        return SearchRequest(top_k=top_k, query=_query(payload["query"], settings))
    return SearchRequest(top_k=top_k, vector=_vector(payload["vector"], dim))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass ``limit`` bytes: by its
    declared Content-Length before any of it is read, else while it streams in (chunked)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a byte count")
        if len(declared) > 18 or int(declared) > limit:
            raise ApiError(413, f"request body is {declared[:40]} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over {limit} bytes; the limit is {limit}")
    return bytes(body)


def _json_object(body: bytes, settings: ApiSettings) -> dict:
    """The body as a JSON object (413 when too large, 400 when not JSON or not an object)."""
    if len(body) > settings.max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is "
                            f"{settings.max_body_bytes}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    except RecursionError:  # the C parser recurses once per level of [ or {
        raise ApiError(400, "the body nests arrays or objects too deeply") from None
    if not isinstance(payload, dict):
        raise ApiError(400, f"the body must be a JSON object like {{\"query\": \"...\", "
                            f"\"top_k\": 10}}, got {_kind(payload)}")
    return payload


def _top_k(payload: dict, settings: ApiSettings) -> int:
    """``top_k`` (default ``settings.default_top_k``): an integer in 1..max_top_k."""
    top_k = payload.get("top_k", settings.default_top_k)
    if isinstance(top_k, float) and top_k.is_integer():
        top_k = int(top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ApiError(422, f"top_k must be an integer, got {_kind(top_k)}")
    if not 1 <= top_k <= settings.max_top_k:
        raise ApiError(422, f"top_k must be between 1 and {settings.max_top_k}, got {top_k}")
    return top_k


def _query(query: Any, settings: ApiSettings) -> str:
    """A non-empty string of at most ``settings.max_query_chars`` characters."""
    if not isinstance(query, str):
        raise ApiError(422, f"query must be a string, got {_kind(query)}")
    if not query.strip():
        raise ApiError(422, "query is empty")
    if len(query) > settings.max_query_chars:
        raise ApiError(413, f"query is {len(query)} characters; the limit is "
                            f"{settings.max_query_chars}")
    return query


def _vector(vector: Any, dim: int) -> np.ndarray:
    """``dim`` finite numbers, as float32."""
    if not isinstance(vector, list):
        raise ApiError(422, f"vector must be an array of numbers, got {_kind(vector)}")
    bad = next((i for i, v in enumerate(vector)
                if isinstance(v, bool) or not isinstance(v, (int, float))), None)
    if bad is not None:
        raise ApiError(422, f"vector[{bad}] must be a number, got {_kind(vector[bad])}")
    if len(vector) != dim:
        raise ApiError(422, f"vector has {len(vector)} dimensions; the index has {dim}")
    try:
        with np.errstate(over="ignore"):  # past float32's range is inf, refused below
            array = np.asarray(vector, dtype=np.float64).astype(np.float32)
    except OverflowError:  # an integer literal past float64's range
        array = np.asarray([np.inf], dtype=np.float32)
    if not np.isfinite(array).all():
        raise ApiError(422, "vector holds a non-finite number (NaN or infinity)")
    return array


async def fan_out(calls: Sequence[Callable[[], Awaitable[Any]]], names: Sequence[str],
                  timeout_s: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Run every call concurrently, each under ``timeout_s``: (answers, errors) by name. An
    exception is logged with its name; its error is "<name> failed; ..." (exception texts
    hold paths and internals that callers must not see)."""

    async def one(name: str, call: Callable[[], Awaitable[Any]]):
        pending = None
        try:
            pending = call()
            return name, await asyncio.wait_for(pending, timeout_s), None
        except asyncio.TimeoutError:
            cancel = getattr(pending, "cancel", None)
            if cancel is not None:
                try:
                    cancel()
                except Exception:  # noqa: BLE001 - best effort
                    pass
            return name, None, f"no answer within {timeout_s:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a shard failure is reported, never raised
            log.warning("search call %s failed: %s: %s", name, type(err).__name__, err)
            return name, None, f"{name} {SHARD_FAILED}"

    answers, errors = {}, {}
    for name, answer, error in await asyncio.gather(*(one(n, c) for n, c in zip(names, calls))):
        if error is None:
            answers[name] = answer
        else:
            errors[name] = error
    return answers, errors


class Coalescer:
    """Opportunistic batching of one shard's searches (no added wait at low load).

    A query is sent at once while fewer than ``max_in_flight`` calls to the shard are under
    way; otherwise it waits and leaves with every other waiting query in the next call, when
    one returns. At concurrency 1 that is one call per query, as without batching; under load
    the per-call cost (a Serve request, a FAISS call) is shared by the batch.
    ``call(vectors [n, d], k)`` returns one hit list per row. A call still unanswered after
    ``timeout_s`` is abandoned (its waiters get a TimeoutError), so a hung shard cannot hold
    the in-flight slots forever.
    """

    def __init__(self, call: Callable[[np.ndarray, int], Awaitable[list[list[Hit]]]],
                 timeout_s: float, max_in_flight: int = 2, max_batch: int = 64):
        self.call, self.timeout_s = call, timeout_s
        self.max_in_flight, self.max_batch = max_in_flight, max_batch
        self.waiting: list[tuple[np.ndarray, int, asyncio.Future]] = []
        self.in_flight = 0

    async def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((vector, k, future))
        self._send()
        return await future

    def _send(self) -> None:
        while self.waiting and self.in_flight < self.max_in_flight:
            batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
            batch = [item for item in batch if not item[2].done()]  # timed out while waiting
            if batch:
                self.in_flight += 1
                asyncio.ensure_future(self._run(batch))

    async def _run(self, batch) -> None:
        pending = None
        try:
            kmax = max(k for _, k, _ in batch)
            pending = self.call(np.stack([v for v, _, _ in batch]), kmax)
            try:
                results = await asyncio.wait_for(pending, self.timeout_s)
            except asyncio.TimeoutError:
                cancel = getattr(pending, "cancel", None)
                if cancel is not None:
                    cancel()
                raise TimeoutError(f"no answer within {self.timeout_s:g} s") from None
            for (_, k, future), hits in zip(batch, results):
                if not future.done():
                    future.set_result(hits[:k])
        except BaseException as err:  # noqa: BLE001 - every waiter learns of the failure
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(err if isinstance(err, Exception)
                                         else RuntimeError(repr(err)))
        finally:
            self.in_flight -= 1
            self._send()


def _json(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False, allow_nan=False), status_code=status,
                    media_type="application/json", headers=headers)


def make_api(backend: Backend, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    token = os.environ.get(settings.token_env) or None
    app = FastAPI(title="llm-retriever search", docs_url=None, redoc_url=None,
                  openapi_url=None)

    def denied(request: Request) -> Response | None:
        return _denied(request, token)

    _add_status_routes(app, backend, denied, PAGE.read_text(encoding="utf-8"))
    _add_search_route(app, backend, settings, denied)
    return app


def _denied(request: Request, token: str | None) -> Response | None:
    """None when the request may pass (no token set, or the right bearer token), else a 401."""
    if token is None:
        return None
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                          token.encode()):
        return None
    problem = ("missing Authorization header" if not scheme else
               "wrong token" if scheme.lower() == "bearer" else
               f"unsupported auth scheme {scheme!r}")
    return _json({"detail": f"{problem}: send 'Authorization: Bearer <token>'"}, 401,
                 {"WWW-Authenticate": "Bearer"})


def _add_status_routes(app: FastAPI, backend: Backend,
                       denied: Callable[[Request], Response | None], page: str) -> None:
    """``GET /healthz`` (never needs a token), ``GET /info`` and the search page ``GET /``."""

    @app.get("/healthz")
    async def healthz():
        return _json({"status": "ok"})

    @app.get("/info")
    async def info(request: Request):
        return denied(request) or _json(public_info(backend.info()))

    @app.get("/")
    async def index_page():  # no token: the page holds no data and asks for the token itself
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
                      denied: Callable[[Request], Response | None]) -> None:
    """``POST /search``: validate, encode the query if no vector came, fan out, merge."""

    @app.post("/search")
    async def search(request: Request):
        refused = denied(request)
        if refused is not None:
            return refused
        started = time.perf_counter()
        try:
            body = await read_body(request, settings.max_body_bytes)
            parsed = parse_search(body, settings, backend.dim)
        except ApiError as err:
            return _json({"detail": err.message}, err.status)
        vector = parsed.vector
        if vector is None:
            vector = await _encode_query(backend, parsed.query, settings)
            if isinstance(vector, Response):
                return vector
        k = parsed.top_k
        hits, errors = await _search_shards(backend, vector, k, settings)
        missing = [n for n in backend.shard_names if n in errors]
        return _json({"hits": _hit_rows(backend, hits), "top_k": k, "partial": bool(missing),
                      "missing_shards": missing, "errors": errors,
                      "shards": len(backend.shard_names),
                      "took_ms": round((time.perf_counter() - started) * 1000, 3)})


async def _encode_query(backend: Backend, query: str,
                        settings: ApiSettings) -> np.ndarray | Response:
    """The query's vector, or a 503 response when the encoder fails or does not answer."""
    try:
        return await asyncio.wait_for(backend.encode(query), max(settings.timeout_s, 10.0))
    except asyncio.TimeoutError:
        return _json({"detail": "the query encoder did not answer in time"}, 503)
    except Exception as err:  # noqa: BLE001
        log.warning("the query encoder failed: %s: %s", type(err).__name__, err)
        return _json({"detail": f"the query encoder failed: {type(err).__name__}"}, 503)


async def _search_shards(backend: Backend, vector, k: int,
                         settings: ApiSettings) -> tuple[list[Hit], dict[str, str]]:
    """Ask every searcher concurrently; the merged top ``k`` and, per shard left out, why."""
    groups = backend.shard_groups
    labels = [", ".join(names) for names in groups]  # what the log names on a failure
    calls = [lambda g=g: backend.search_group(g, vector, k) for g in range(len(groups))]
    answers, failures = await fan_out(calls, labels, settings.timeout_s)
    hits = merge((answers[label] for label in labels if label in answers), k)
    errors = {name: failures[label]
              for label, names in zip(labels, groups) if label in failures for name in names}
    return hits, errors


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
