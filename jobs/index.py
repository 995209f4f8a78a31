"""Build a sharded FAISS index: ``retriever index --embeddings URL --shards N --type T --out URL``.

Reads an embedding folder (``retriever.io.embeddings``), trains IVF quantisers once on a sample,
builds the N shards (in this process, or as Ray tasks with ``--workers W``), measures recall@10
against exact search for IVF-PQ / HNSW and picks ``nprobe`` / ``efSearch``, and writes
``shard-*.faiss``, ``shard-*.ids.parquet`` and ``manifest.json`` (last) under ``--out``
(with ``--sparse true`` also BM25 shards ``shard-*.bm25.npz`` of the same documents)
(default ``<store>/indexes/<corpus>/<model>/<type>-<N>`` when the embeddings sit at
``<store>/embeddings/<corpus>/<model>``). See ``retriever/index/build.py``.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.index.build import IndexBuildConfig as IndexConfig
from retriever.index.build import build_index


def run(config: IndexConfig) -> dict:
    """Build the index (see :func:`retriever.index.build.build_index`)."""
    return build_index(config)


def describe(manifest: dict) -> str:
    """What was built, in a few lines."""
    rows = [s["rows"] for s in manifest["shards"]]
    lines = [f"{manifest['type']} index ({manifest['factory']}, {manifest['metric']}): "
             f"{manifest['rows']} rows x {manifest['dim']} dims in {len(rows)} shards {rows}, "
             f"{manifest['seconds']:.1f} s"]
    size = manifest.get("bytes_per_vector")
    if size:  # the shard files over their rows, next to the capacity plan's figure
        planned = f", planned {size['planned']:.1f}" if size.get("planned") else ""
        lines.append(f"bytes per vector: {size['measured']:.1f} (shard files){planned}")
    recall = manifest.get("recall")
    if recall:
        curve = ", ".join(f"{v}: {r:.3f}" for v, r in recall["per_value"].items())
        lines.append(f"recall@{recall['at']} vs exact ({recall['queries']} queries from "
                     f"{recall['queries_from']}): {recall['value']:.4f} at {recall['param']}="
                     f"{recall['chosen']} (target {recall['target']}); {recall['param']} -> "
                     f"recall: {curve}")
        if not recall.get("reached", True):
            lift = ("more candidates (--k-factor) or finer codes (--refine, --pq-m)"
                    if recall["param"] == "nprobe" else "finer codes (--refine)")
            lines.append(f"target recall {recall['target']} not reached: recall stops at "
                         f"{recall['value']:.4f} whatever {recall['param']}, so the smallest "
                         f"value on that plateau is used; {lift} lift it")
    sparse = manifest.get("sparse")
    if sparse:
        stats = sparse["stats"]
        lines.append(f"BM25 shards {[s['rows'] for s in sparse['shards']]} "
                     f"({'reused' if sparse.get('reused') else 'built'}): {stats['docs']} docs, "
                     f"{stats['terms']} terms, average length {stats['avg_len']:.1f}")
    lines.append(f"{'reused' if manifest.get('reused') else 'wrote'} {manifest['out']}"
                 "/manifest.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    print(describe(run(cfg.parse(IndexConfig, argv, prog="retriever index"))))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["index", *sys.argv[1:]]))
