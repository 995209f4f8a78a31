"""The search app's concurrency-1 path (issue 13), in process, in seconds: a lone request is
answered inline (no task, timer or thread hop) while concurrent ones are still coalesced; the
app counts the requests under way; Serve's proxy carries a small body in the scope
(``serve/proxy.py``) and the app takes it from there; the fast JSON parser reads bodies as
Python's ``json`` does and leaves every refusal to it. The same paths through a real Serve
cluster: tests/test_serve.py (``test_shards_in_the_router_answer_the_same``, the bad-request
suites) and ``benchmarks/search_latency.py`` for the latency itself."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import numpy as np
import pytest

from retriever.index import shards as sh
from serve.api import TOKEN_ENV, InFlight, make_api, parse_json
from serve.fanout import Coalescer, ShardAnswer, ShardQuery, answer, fan_out
from serve.proxy import BODY_KEY, BodyInScope, declared_length
from tests.test_serve import _small_index, asgi_post


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return sh.load_all(_small_index(tmp_path_factory.mktemp("fast"), 4), gpu="no")


def test_a_lone_request_is_answered_inline_and_concurrent_ones_coalesced(shards):
    vectors = np.asarray([shards[0].index.reconstruct(i) for i in range(12)], np.float32)
    threads, inline_threads, state = [], [], {"alone": True}

    async def in_thread(query: ShardQuery) -> ShardAnswer:
        threads.append(len(query.vectors))
        await asyncio.sleep(0.02)  # a call under way while the others arrive
        return await asyncio.to_thread(answer, shards, [], query)

    def inline(query: ShardQuery) -> ShardAnswer:
        inline_threads.append(threading.get_ident())
        return answer(shards, [], query)

    async def run():
        coalescer = Coalescer(in_thread, timeout_s=5.0, inline=inline,
                              alone=lambda: state["alone"])
        lone = [await coalescer.search(ShardQuery(v[None], None, 5)) for v in vectors[:3]]
        state["alone"] = False  # other requests under way: coalesced as before
        crowd = await asyncio.gather(*(coalescer.search(ShardQuery(v[None], None, 5))
                                       for v in vectors))
        # alone, but a call is still in flight: it goes the coalescing way too
        slow = asyncio.ensure_future(coalescer.search(ShardQuery(vectors[:1], None, 5)))
        await asyncio.sleep(0)  # `slow` is sent (not alone) and in flight
        state["alone"] = True
        late = await coalescer.search(ShardQuery(vectors[1:2], None, 5))
        await slow
        return coalescer, lone, crowd, late

    coalescer, lone, crowd, late = asyncio.run(run())
    want = sh.search_all(shards, vectors, 5)
    assert [a.dense.rows()[0] for a in lone] == want[:3]
    assert [a.dense.rows()[0] for a in crowd] == want
    assert late.dense.rows()[0] == want[1]
    assert inline_threads == [threading.get_ident()] * 3  # in the caller's thread, no hop
    assert coalescer.inline_calls == 3
    assert sum(threads) == 12 + 2 and len(threads) < 12  # the crowd shared calls
    assert coalescer.calls == 3 + len(threads)


def test_fan_out_of_one_call_keeps_its_timeout_and_failure_semantics():
    async def slow():
        await asyncio.sleep(5)

    async def boom():
        raise OSError("/srv/private/shard-0.faiss")

    async def ready():
        return 7

    async def run():
        return (await fan_out([slow], ["s"], 0.2), await fan_out([boom], ["b"], 1.0),
                await fan_out([ready], ["r"], 1.0))

    timed_out, failed, answered = asyncio.run(run())
    assert timed_out == ({}, {"s": "no answer within 0.2 s"})
    assert failed == ({}, {"b": "b failed; the error is in the server log"})
    assert answered == ({"r": 7}, {})


class _Recording:
    """A backend over real shards that notes ``in_flight.requests`` at each search."""

    def __init__(self, shards, in_flight: InFlight, delay_s: float):
        self.shards, self.in_flight, self.delay_s = shards, in_flight, delay_s
        self.dim, self.sparse = shards[0].dim, False
        self.shard_names = [s.name for s in shards]
        self.shard_groups = [self.shard_names]
        self.seen: list[int] = []

    async def encode(self, texts, kind="query"):
        raise AssertionError("vectors only")

    async def search_group(self, number, query):
        self.seen.append(self.in_flight.requests)
        await asyncio.sleep(self.delay_s)
        return answer(self.shards, [], query)

    def info(self):
        return {}

    def doc(self, doc_id):
        return None


def test_the_app_counts_the_requests_under_way(shards, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    in_flight = InFlight()
    backend = _Recording(shards, in_flight, delay_s=0.05)
    vectors = [shards[1].index.reconstruct(i).tolist() for i in range(6)]

    async def run():
        transport = httpx.ASGITransport(app=make_api(backend, in_flight=in_flight))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            lone = await client.post("/search", json={"vector": vectors[0], "top_k": 3})
            crowd = await asyncio.gather(*(client.post("/search", json={"vector": v,
                                                                        "top_k": 3})
                                           for v in vectors))
            return lone, crowd

    lone, crowd = asyncio.run(run())
    assert lone.status_code == 200 and all(r.status_code == 200 for r in crowd)
    assert backend.seen[0] == 1 and max(backend.seen[1:]) == len(vectors)
    assert in_flight.requests == 0


def _app_reading(seen: list):
    """An ASGI app that notes the scope's carried body and the body it streams."""

    async def app(scope, receive, send):
        streamed = b""
        while True:
            message = await receive()
            streamed += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append((scope.get(BODY_KEY), streamed))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def _call(middleware, headers: list, chunks: list[bytes]) -> int:
    """Run ``middleware`` on one request whose body comes in ``chunks``: the receive calls."""
    calls = {"n": 0}

    async def receive():
        calls["n"] += 1
        if calls["n"] <= len(chunks):
            return {"type": "http.request", "body": chunks[calls["n"] - 1],
                    "more_body": calls["n"] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    asyncio.run(middleware({"type": "http", "headers": headers}, receive, send))
    return calls["n"]


def test_the_proxy_carries_a_small_body_and_still_streams_it():
    seen: list = []
    middleware = BodyInScope(_app_reading(seen), max_bytes=100)
    assert _call(middleware, [(b"content-length", b"10")], [b"01234", b"56789"]) == 2
    assert seen.pop() == (b"0123456789", b"0123456789")  # carried, and replayed to a reader
    _call(middleware, [], [b"abc"])  # chunked: no declared length, nothing read ahead
    assert seen.pop() == (None, b"abc")
    _call(middleware, [(b"Content-Length", b"500")], [b"x" * 500])  # over the limit
    assert seen.pop() == (None, b"x" * 500)
    assert [declared_length({"headers": h}) for h in (
        [(b"content-length", b" 42 ")], [(b"content-length", b"ten")], [],
        [(b"content-length", b"9" * 19)])] == [42, None, None, None]


def test_the_app_takes_a_carried_body_without_reading_the_stream(shards, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    inner = make_api(_Recording(shards, InFlight(), delay_s=0.0))

    async def app_that_must_not_stream(scope, receive, send):
        async def refuse():
            raise AssertionError("the app read the stream of a body carried in the scope")

        await inner(scope, refuse, send)

    vector = shards[2].index.reconstruct(5).tolist()
    body = json.dumps({"vector": vector, "top_k": 3}).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    status, got, read = asgi_post(BodyInScope(app_that_must_not_stream), headers,
                                  [body[:4000], body[4000:]])
    assert status == 200 and read == 2, got  # both chunks read by the proxy's middleware
    assert got["hits"][0]["doc_id"] == shards[2].ids[5]


@pytest.mark.parametrize("body", [
    json.dumps({"vector": np.random.default_rng(1).standard_normal(384).tolist(),
                "top_k": 10.0, "mode": "dense"}).encode(),
    b'{"a": 1, "a": 2.5, "b": [1e400, -0.0, 123456789012345678901234567890]}',
    b'{"query": "caf\\u00e9 \\ud83d\\ude00"}',
    '{"query": "café"}'.encode(),
    b'{"query": "\\ud800"}',  # a lone surrogate: pydantic's parser refuses, json reads it
    b'\xef\xbb\xbf{"query": "bom"}',  # a UTF-8 BOM: the same
])
def test_the_fast_json_parser_reads_bodies_as_json_does(body):
    assert repr(parse_json(body)) == repr(json.loads(body))
