"""bf16 autocast vs fp32 on CPU: speed ratios, per-doc cosine, and NDCG@10 on a collection.

    python benchmarks/bf16_quality.py [--dataset ../shared/datasets/scifact] [--model minilm]
                                      [--docs N] [--query-dtype float32]

The device policy (retriever/modeling/device.py) picks bf16 autocast for passages on CPUs with
native bf16 and fp32 for queries; this prints the evidence. Passages: docs/s in fp32 and in
bf16, their ratio, the minimum and mean cosine between the two sets of vectors, and NDCG@10 of
both, with the queries embedded in ``--query-dtype`` for both rows (default float32, the
policy's), so the NDCG delta is the passages' precision alone. Queries: the median latency of
embedding one query alone (as a served request is) in fp32 and in bf16, and their ratio: the
cost of keeping queries in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from retriever.io.formats import load_dataset
from retriever.modeling.device import cpu_has_native_bf16
from retriever.modeling.encoder import Encoder
from retriever.evaluation.retrieval import score_run
from retriever.index.exact import ExactSearcher

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
DTYPES = ("float32", "bfloat16")


def passage_rows(args, dataset, passages: list[str], queries: dict) -> dict:
    """Per passage dtype: (docs/s, NDCG@10, vectors), queries in ``args.query_dtype``."""
    rows = {}
    for dtype in DTYPES:
        encoder = Encoder(model=args.model, dtype=dtype, query_dtype=args.query_dtype)
        encoder.encode_passages(passages[:64])  # warm-up
        started = time.perf_counter()
        vectors = encoder.encode_passages(passages)
        seconds = time.perf_counter() - started
        query_vectors = encoder.encode_queries(list(queries.values()))
        ids = dataset.corpus.ids[:len(passages)]
        hits = ExactSearcher(vectors, ids).search(query_vectors, 1000)
        ndcg = score_run(dataset, dict(zip(queries, hits)))["ndcg@10"]
        rows[dtype] = (len(passages) / seconds, ndcg, vectors)
        print(f"passages {dtype:>9} (queries {args.query_dtype}): "
              f"{rows[dtype][0]:8.1f} docs/s  ndcg@10 {ndcg:.4f}")
    return rows


def query_latency(args, texts: list[str]) -> dict:
    """Per query dtype: the median seconds to embed one query alone."""
    latency = {}
    for dtype in DTYPES:
        encoder = Encoder(model=args.model, query_dtype=dtype)
        encoder.encode_queries(texts[:8])  # warm-up
        times = []
        for text in texts:
            started = time.perf_counter()
            encoder.encode_queries([text])
            times.append(time.perf_counter() - started)
        latency[dtype] = statistics.median(times)
        print(f"one query {dtype:>9}: median {latency[dtype] * 1e3:.2f} ms "
              f"over {len(texts)} queries")
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DEFAULT))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--docs", type=int, default=0, help="limit the corpus (0 = all)")
    parser.add_argument("--query-dtype", default="float32", choices=DTYPES,
                        help="the queries' precision in both passage rows")
    parser.add_argument("--latency-queries", type=int, default=100,
                        help="queries timed one by one per dtype")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset)
    passages = dataset.corpus.passages()
    if args.docs:
        passages = passages[:args.docs]
    queries = dataset.judged_queries()
    print(f"CPU native bf16: {cpu_has_native_bf16()}; {len(passages)} docs, "
          f"{len(queries)} queries, model {args.model} (a shared machine: timings are noisy)")
    rows = passage_rows(args, dataset, passages, queries)
    cosine = (rows["float32"][2] * rows["bfloat16"][2]).sum(1)
    print(f"passages bf16/fp32 speed ratio: {rows['bfloat16'][0] / rows['float32'][0]:.2f}x; "
          f"cosine min {cosine.min():.6f}, mean {cosine.mean():.6f}; "
          f"ndcg@10 delta {rows['bfloat16'][1] - rows['float32'][1]:+.4f}")
    latency = query_latency(args, list(queries.values())[:args.latency_queries])
    print(f"one query fp32/bf16 latency ratio: {latency['float32'] / latency['bfloat16']:.2f}x")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
