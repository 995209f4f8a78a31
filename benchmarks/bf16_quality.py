"""bf16 autocast vs fp32 on CPU: speed ratio, per-doc cosine, and NDCG@10 on a collection.

    python benchmarks/bf16_quality.py [--dataset ../shared/datasets/scifact] [--model minilm]

The device policy (retriever/modeling/device.py) picks bf16 autocast on CPUs with native bf16; this
prints the evidence: docs/s for both, their ratio, the minimum cosine between the two sets of
vectors and both NDCG@10 figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from retriever.io.formats import load_dataset
from retriever.modeling.device import cpu_has_native_bf16
from retriever.modeling.encoder import Encoder
from retriever.evaluation.retrieval import score_run
from retriever.index.exact import ExactSearcher

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(DEFAULT))
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--docs", type=int, default=0, help="limit the corpus (0 = all)")
    args = parser.parse_args()
    dataset = load_dataset(args.dataset)
    passages = dataset.corpus.passages()
    if args.docs:
        passages = passages[:args.docs]
    queries = dataset.judged_queries()
    print(f"CPU native bf16: {cpu_has_native_bf16()}; {len(passages)} docs, "
          f"{len(queries)} queries, model {args.model}")
    vectors, results = {}, {}
    for dtype in ("float32", "bfloat16"):
        encoder = Encoder(model=args.model, dtype=dtype)
        encoder.encode_passages(passages[:64])  # warm-up
        started = time.perf_counter()
        vectors[dtype] = encoder.encode_passages(passages)
        seconds = time.perf_counter() - started
        query_vectors = encoder.encode_queries(list(queries.values()))
        ids = dataset.corpus.ids[:len(passages)]
        hits = ExactSearcher(vectors[dtype], ids).search(query_vectors, 1000)
        metrics = score_run(dataset, dict(zip(queries, hits)))
        results[dtype] = (len(passages) / seconds, metrics["ndcg@10"])
        print(f"{dtype:>9}: {results[dtype][0]:8.1f} docs/s  ndcg@10 {results[dtype][1]:.4f}")
    cosine = (vectors["float32"] * vectors["bfloat16"]).sum(1)
    print(f"bf16/fp32 speed ratio: {results['bfloat16'][0] / results['float32'][0]:.2f}x; "
          f"cosine min {cosine.min():.6f}, mean {cosine.mean():.6f}; "
          f"ndcg@10 delta {results['bfloat16'][1] - results['float32'][1]:+.4f}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
