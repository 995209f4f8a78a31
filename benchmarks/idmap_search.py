"""``search_index`` over a compact id map next to the list of ids it replaced (issue 11).

    python benchmarks/idmap_search.py                 # 100,000 ids, k=100, batches of 1 and 100
    python benchmarks/idmap_search.py --ids 1000000 --repeat 50

One flat inner-product shard of ``--ids`` random d=128 vectors (ids ``doc-<12 digits>``), one
FAISS thread (as a searcher replica with < 2 CPUs has). For batches of 1 and 100 queries,
k=100 (k + 16 fetched, ``ranking.TIE_MARGIN``), the median over ``--repeat`` calls of:

- ``before``: the peer, ``search_index`` as it was before issue 11 (each hit's id looked up as
  ``ids[r]`` with a numpy integer in a ``list[str]``), reproduced here;
- ``list``: today's ``search_index`` over the same list (one lookup for all hits);
- ``IdMap``: over ``retriever.index.idmap.IdMap`` in memory, and ``mapped``: memory-mapped
  from its Arrow IPC copy (what a searcher loads with mmap).

Each is printed as ms per call and as the ratio to ``before`` measured in the same run, both
for the whole call (FAISS' scan included; ``--repeat`` / 10 calls at batch 100) and for the
part after FAISS answered (ids and order), which is what changed. The four take turns call by
call, so a load swing of a shared machine falls on all of them alike. Results are checked
equal first. Also printed: the id map's own memory (``list[str]``: the list and its str
objects, sys.getsizeof; IdMap: Arrow buffers). The machine may be shared and busy: say so
next to any figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.index import exact, idmap  # noqa: E402
from retriever.index.ranking import TIE_MARGIN, order  # noqa: E402


def before(index, ids, queries, k):
    """``exact.search_index`` before issue 11: the peer."""
    fetch = min(len(ids), k + TIE_MARGIN)
    scores, rows = index.search(queries, fetch)
    return [order(((ids[r], float(s)) for r, s in zip(row, score) if r >= 0), k)
            for row, score in zip(rows, scores)]


class Answered:
    """An index that answers a fixed FAISS result at once: times the part after FAISS."""

    def __init__(self, index, queries, fetch):
        self.d, self.ntotal = index.d, index.ntotal
        self.answer = index.search(queries, fetch)

    def search(self, queries, fetch):
        return self.answer


def median_ms(calls: dict, repeat: int) -> dict[str, float]:
    """Median ms per call of each of ``calls`` (name -> callable), taking turns."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def measure(target, ids, peers: dict, queries, k: int, repeat: int) -> str:
    calls = {"before": lambda: before(target, ids, queries, k)}
    calls.update({name: (lambda held=held: exact.search_index(target, held, queries, k))
                  for name, held in peers.items()})
    took = median_ms(calls, repeat)
    return ", ".join([f"before {took['before']:.3f} ms"] + [
        f"{name} {took[name]:.3f} ms ({took[name] / took['before']:.2f}x)" for name in peers])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("-k", type=int, default=100)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(128)
    index.add(rng.standard_normal((args.ids, 128)).astype(np.float32))
    ids = [f"doc-{i:012d}" for i in range(args.ids)]
    compact = idmap.IdMap.of(ids)
    folder = tempfile.TemporaryDirectory(prefix="idmap-bench-")
    mapped = idmap.write_mapped(compact, f"{folder.name}/ids.arrow", "benchmark")
    peers = {"list": ids, "IdMap": compact, "mapped": mapped}
    list_bytes = sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)
    print(f"search_index, flat shard of {args.ids:,} ids (d=128, 1 FAISS thread), k={args.k}, "
          f"median of {args.repeat} calls; machine shared and busy")
    print(f"  id map memory: list[str] {list_bytes / 2**20:.1f} MiB, IdMap "
          f"{compact.nbytes / 2**20:.1f} MiB ({list_bytes / compact.nbytes:.1f}x less), mapped: "
          "the same bytes in the page cache")
    for batch in (1, 100):
        queries = rng.standard_normal((batch, 128)).astype(np.float32)
        answered = Answered(index, queries, min(args.ids, args.k + TIE_MARGIN))
        expected = before(index, ids, queries, args.k)
        for name, held in peers.items():
            assert exact.search_index(index, held, queries, args.k) == expected, name
        for label, target, repeat in (
                ("whole call", index, args.repeat if batch == 1 else max(3, args.repeat // 10)),
                ("after FAISS", answered, args.repeat)):
            print(f"  batch {batch:3d}, {label:11}: "
                  + measure(target, ids, peers, queries, args.k, repeat), flush=True)
    folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
