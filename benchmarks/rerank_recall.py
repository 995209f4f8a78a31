"""Recall@10 of IVF-PQ with each re-rank store on the scale benchmark's clustered vectors.

Why ``benchmarks/scale.py`` builds its shards with ``--refine SQfp16``: on the Gaussian mixture
(``retriever.io.synthetic``) a blob's points are nearly equidistant, so the gap between a
query's 10th and 11th exact scores is below SQ8's rounding, and an SQ8 re-rank caps recall@10
whatever nprobe and k_factor. Builds each factory with the project's own ``new_index`` /
``set_search_params`` (FAISS, in process) and prints recall@10 against exact inner-product
search (the peer, ``IndexFlatIP``) on 1,000 held-out queries, plus the median score gap. ::

    python benchmarks/rerank_recall.py              # 2e5 vectors, ~2 min on 2 cores
    python benchmarks/rerank_recall.py --vectors 1e6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STORES = ("SQ8", "SQfp16", "Flat")


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def main(argv=None) -> int:
    import faiss

    from retriever.index.types import new_index, set_search_params
    from retriever.io import synthetic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=float, default=2e5)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--k-factor", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args(argv)
    dim = 128
    # Stored as the scale benchmark stores them (float16 embedding parts).
    vectors = synthetic.clustered_vectors(int(args.vectors), dim).astype(np.float16)
    vectors = vectors.astype(np.float32)
    queries = synthetic.clustered_queries(1000, dim)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    scores, truth = exact.search(queries, 11)
    print(f"{len(vectors):,} clustered vectors, d={dim}, 1,000 held-out queries; median gap "
          f"between the 10th and 11th exact scores {np.median(scores[:, 9] - scores[:, 10]):.2g}")
    truth = truth[:, :10]
    print(f"{'factory':<36} {'nprobe':>6} {'k_factor':>8} {'recall@10 vs exact':>19}")
    for store in STORES:
        factory = f"IVF{args.nlist},PQ16x8np,Refine({store})"
        index = new_index(factory, dim)
        index.train(vectors[:50_000])
        index.add(vectors)
        for nprobe in args.nprobe:
            for k_factor in args.k_factor:
                set_search_params(index, {"nprobe": nprobe, "k_factor": k_factor})
                _, found = index.search(queries, 10)
                print(f"{factory:<36} {nprobe:>6} {k_factor:>8} {recall(found, truth):>19.3f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
