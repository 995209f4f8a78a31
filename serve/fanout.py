"""What travels between the Router and its searchers and encoder, batched across requests.

- :class:`ShardQuery` (Router -> one searcher): query vectors ``[a, dim]`` float32 for the
  dense ranking and/or query texts (``b``) for the BM25 ranking, and ``k``; one call answers
  both rankings (:func:`answer`), so a hybrid request still costs one call per searcher.
- :class:`ShardAnswer` (searcher -> Router): each ranking as :class:`Rankings`, flat arrays
  (doc ids, float64 scores, row offsets), which Ray serialises as a few buffers instead of a
  Python object per hit.
- :class:`Coalescer`: the queries that wait for a searcher (or the encoder) while
  ``max_in_flight`` calls are under way leave together in its next call (no added wait at
  concurrency 1); a callee that can answer synchronously (shards in the Router's own memory)
  answers a lone request on the spot, without a task, timer or thread hop.
- :func:`fan_out`: every searcher asked concurrently, each under its own timeout.
- :func:`encode_requests`: the encoder's batch of ``(kind, texts)`` requests in one forward
  pass per kind ("query" / "passage" pick the prefixes and the precision), with token counts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from retriever.index.ranking import Hit

SHARD_FAILED = "failed; the error is in the server log"
# In a Serve replica this logger goes to the replica's log file; in-process, to the root's.
log = logging.getLogger("ray.serve")


@dataclass
class Rankings:
    """Ranked hits of several queries, flat: row ``r`` is ``ids[offsets[r]:offsets[r+1]]``."""

    ids: np.ndarray  # str
    scores: np.ndarray  # float64 (lossless for float32 FAISS and BM25 scores)
    offsets: np.ndarray  # int64, rows + 1

    @classmethod
    def pack(cls, rows: Sequence[Sequence[Hit]]) -> "Rankings":
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(row) for row in rows])
        ids = [doc_id for row in rows for doc_id, _ in row]
        scores = np.fromiter((score for row in rows for _, score in row), np.float64,
                             count=int(offsets[-1]))
        return cls(np.asarray(ids, dtype=str), scores, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, start: int = 0, stop: int | None = None) -> list[list[Hit]]:
        stop = len(self) if stop is None else stop
        ids, scores = self.ids.tolist(), self.scores.tolist()
        return [list(zip(ids[self.offsets[r]:self.offsets[r + 1]],
                         scores[self.offsets[r]:self.offsets[r + 1]]))
                for r in range(start, stop)]


@dataclass
class ShardQuery:
    vectors: np.ndarray | None  # [a, dim] float32: rows for the dense ranking
    texts: list[str] | None  # b texts: rows for the BM25 ranking
    k: int


@dataclass
class ShardAnswer:
    dense: Rankings | None
    sparse: Rankings | None


def answer(dense_shards: Sequence, sparse_shards: Sequence, query: ShardQuery) -> ShardAnswer:
    """One searcher's merged top-k of its shards, per ranking asked for (trec_eval order)."""
    from retriever.index import shards as sh

    dense = sparse = None
    if query.vectors is not None:
        dense = Rankings.pack(sh.search_all(dense_shards, query.vectors, query.k))
    if query.texts is not None:
        if not sparse_shards:
            raise RuntimeError("BM25 asked of a searcher that holds no sparse shards")
        from retriever.index import sparse as sp

        sparse = Rankings.pack(sp.search_all(sparse_shards, query.texts, query.k))
    return ShardAnswer(dense, sparse)


def combine_queries(queries: Sequence[ShardQuery]) -> ShardQuery:
    """One searcher call for several queries (a lone query goes as it is)."""
    if len(queries) == 1:
        return queries[0]
    vectors = [q.vectors for q in queries if q.vectors is not None]
    texts = [t for q in queries if q.texts is not None for t in q.texts]
    return ShardQuery(np.concatenate(vectors) if vectors else None,
                      texts if any(q.texts is not None for q in queries) else None,
                      max(q.k for q in queries))


def split_answer(queries: Sequence[ShardQuery], combined: ShardAnswer) -> list[ShardAnswer]:
    """Each query's share of a combined answer (rows in the order :func:`combine_queries` put
    them)."""
    if len(queries) == 1:
        return [combined]
    out, dense_at, sparse_at = [], 0, 0
    for q in queries:
        dense = sparse = None
        if q.vectors is not None:
            dense, dense_at = _take(combined.dense, dense_at, len(q.vectors)), \
                dense_at + len(q.vectors)
        if q.texts is not None:
            sparse, sparse_at = _take(combined.sparse, sparse_at, len(q.texts)), \
                sparse_at + len(q.texts)
        out.append(ShardAnswer(dense, sparse))
    return out


def _take(rankings: Rankings, start: int, count: int) -> Rankings:
    lo, hi = rankings.offsets[start], rankings.offsets[start + count]
    return Rankings(rankings.ids[lo:hi], rankings.scores[lo:hi],
                    rankings.offsets[start:start + count + 1] - lo)


def combine_encodes(requests: Sequence[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """One encoder call for several ``(kind, texts)`` requests: the list of them."""
    return list(requests)


def split_encodes(requests: Sequence[Any], answers: list) -> list:
    return list(answers)


class Coalescer:
    """Opportunistic batching of one callee's calls (no added wait at low load).

    An item is sent at once while fewer than ``max_in_flight`` calls are under way; otherwise
    it waits and leaves with every other waiting item (up to ``max_batch``) in the next call,
    when one returns. At concurrency 1 that is one call per item, as without batching; under
    load the per-call cost (a Serve request, a FAISS call, a forward pass) is shared by the
    batch. ``call(combine(items))`` answers what ``split(items, answer)`` turns into one
    answer per item: by default a searcher's :class:`ShardQuery` -> :class:`ShardAnswer`
    (:func:`combine_queries`, :func:`split_answer`). A call still unanswered after
    ``timeout_s`` is abandoned (its waiters get a TimeoutError), so a hung callee cannot hold
    the in-flight slots forever. ``calls`` counts the calls made (for tests and benchmarks).

    ``inline`` (optional) answers one item synchronously, in the caller's thread; it is used
    instead of ``call`` when nothing is in flight or waiting and ``alone()`` says no other
    request is being handled: a lone request then skips the task, the timer and (for a
    ``call`` that runs in a worker thread) the two thread hops, ~0.1-0.3 ms each on the 2-core
    machine. Under load ``alone()`` is false and items are coalesced as above. An ``inline``
    call blocks the event loop while it runs, harmless only because nothing else is under way
    then: for answers of milliseconds (FAISS and BM25 over loaded shards), not for calls that
    may wait on a network.
    """

    def __init__(self, call: Callable[[Any], Awaitable[Any]], timeout_s: float,
                 max_in_flight: int = 2, max_batch: int = 64,
                 combine: Callable[[Sequence[Any]], Any] = combine_queries,
                 split: Callable[[Sequence[Any], Any], list] = split_answer,
                 inline: Callable[[Any], Any] | None = None,
                 alone: Callable[[], bool] = lambda: False):
        self.call, self.timeout_s = call, timeout_s
        self.max_in_flight, self.max_batch = max_in_flight, max_batch
        self.combine, self.split = combine, split
        self.inline, self.alone = inline, alone
        self.waiting: list[tuple[Any, asyncio.Future]] = []
        self.in_flight = self.calls = self.inline_calls = 0

    async def search(self, query: Any) -> Any:
        if (self.inline is not None and not self.in_flight and not self.waiting
                and self.alone()):
            self.calls += 1
            self.inline_calls += 1
            return self.split([query], self.inline(self.combine([query])))[0]
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((query, future))
        self._send()
        return await future

    def _send(self) -> None:
        while self.waiting and self.in_flight < self.max_in_flight:
            batch, self.waiting = self.waiting[:self.max_batch], self.waiting[self.max_batch:]
            batch = [item for item in batch if not item[1].done()]  # timed out while waiting
            if batch:
                self.in_flight += 1
                self.calls += 1
                asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        pending = None
        try:
            queries = [q for q, _ in batch]
            pending = self.call(self.combine(queries))
            try:
                combined = await asyncio.wait_for(pending, self.timeout_s)
            except asyncio.TimeoutError:
                cancel = getattr(pending, "cancel", None)
                if cancel is not None:
                    cancel()
                raise TimeoutError(f"no answer within {self.timeout_s:g} s") from None
            shares = self.split(queries, combined)
            for (_, future), share in zip(batch, shares):
                if not future.done():
                    future.set_result(share)
        except BaseException as err:  # noqa: BLE001 - every waiter learns of the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(err if isinstance(err, Exception)
                                         else RuntimeError(repr(err)))
        finally:
            self.in_flight -= 1
            self._send()


_TIMEOUT = getattr(asyncio, "timeout", None)  # Python 3.11+


async def within(awaitable: Awaitable[Any], timeout_s: float) -> Any:
    """``await awaitable``, or TimeoutError after ``timeout_s``; on Python 3.11+ without
    wrapping it in a task, so that an answer ready without waiting (a lone request answered
    inline, :class:`Coalescer`) never yields to the event loop: in a Serve replica, the
    replica's background call to the proxy for the request's messages then runs after the
    answer is sent, not in the middle of it (~1-2 ms on the 2-core machine under load)."""
    if _TIMEOUT is None:
        return await asyncio.wait_for(awaitable, timeout_s)
    async with _TIMEOUT(timeout_s):
        return await awaitable


async def fan_out(calls: Sequence[Callable[[], Awaitable[Any]]], names: Sequence[str],
                  timeout_s: float) -> tuple[dict[str, Any], dict[str, str]]:
    """Run every call concurrently, each under ``timeout_s``: (answers, errors) by name. An
    exception is logged with its name; its error is "<name> failed; ..." (exception texts
    hold paths and internals that callers must not see)."""

    async def one(name: str, call: Callable[[], Awaitable[Any]]):
        pending = None
        try:
            pending = call()
            return name, await within(pending, timeout_s), None
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
    results = ([await one(names[0], calls[0])] if len(calls) == 1 else  # no gather task
               await asyncio.gather(*(one(n, c) for n, c in zip(names, calls))))
    for name, got, error in results:
        if error is None:
            answers[name] = got
        else:
            errors[name] = error
    return answers, errors


def encode_requests(encoder, requests: Sequence[tuple[str, Sequence[str]]]
                    ) -> list[tuple[np.ndarray, list[int]]]:
    """``(kind, texts)`` per request -> ``(vectors [n, dim] float32, tokens per text)`` per
    request: the texts of every request of one kind are tokenized and embedded together."""
    out: list[Any] = [None] * len(requests)
    for kind in {k for k, _ in requests}:
        members = [i for i, (k, _) in enumerate(requests) if k == kind]
        ids = encoder.tokenize([t for i in members for t in requests[i][1]], kind)
        vectors = encoder.encode_ids(ids, kind)  # the kind's precision (fp32 queries on CPU)
        at = 0
        for i in members:
            n = len(requests[i][1])
            out[i] = (vectors[at:at + n], [len(row) for row in ids[at:at + n]])
            at += n
    return out
