"""``retriever plan``: a capacity plan for encoding and serving a corpus at scale.

    retriever plan --docs 1e9 --model qwen2.5-7b --dims 3584 --index ivfpq --pq-m 64 \\
        --node-type r7i.16xlarge --gpu a100

prints encode GPU-hours and cost, embedding bytes, index bytes per shard, the number of shards
that fit the chosen node's memory, the search fan-out and the serving cost, each with its
formula and the numbers substituted. ``--json`` prints the same as JSON. The arithmetic and the
sources of every default number live in :mod:`retriever.ops.capacity`.
"""

from __future__ import annotations

import argparse
import json
import sys

from retriever.ops import capacity as cap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retriever plan",
        description="Capacity plan: encode GPU-hours, embedding/index bytes, shards, fan-out, cost.",
        epilog=("Known models: " + ", ".join(cap.MODELS) + ". GPUs: " + ", ".join(cap.GPUS)
                + ". Node types: " + ", ".join(cap.NODE_TYPES)
                + ". Sources of every default: retriever/ops/capacity.py."),
    )
    p.add_argument("--docs", required=True, type=cap.parse_count,
                   help="number of documents (1e9, 8.8M, 500k)")
    p.add_argument("--avg-tokens", type=float, default=cap.DEFAULT_AVG_TOKENS,
                   help="mean tokens per document after truncation (default %(default)s)")
    p.add_argument("--model", default="qwen2.5-7b",
                   help="backbone from the table (default %(default)s); 'none' with --params/--dims")
    p.add_argument("--params", type=cap.parse_count, default=None,
                   help="non-embedding parameter count (overrides the model's), e.g. 6.53e9")
    p.add_argument("--dims", type=int, default=None, help="embedding dimension (default: hidden size)")
    p.add_argument("--dtype", default="fp16", choices=sorted(cap.DTYPE_BYTES),
                   help="embedding storage dtype (default %(default)s)")
    p.add_argument("--index", default="ivfpq", choices=cap.INDEX_TYPES)
    p.add_argument("--pq-m", type=int, default=64, help="IVF-PQ bytes per code (default %(default)s)")
    p.add_argument("--pq-nbits", type=int, default=8)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default next_pow2(4 sqrt N))")
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--node-type", default="r7i.16xlarge",
                   help="node type holding index shards (default %(default)s)")
    p.add_argument("--node-memory-gib", type=float, default=None, help="override node memory")
    p.add_argument("--node-price", type=float, default=None, help="override node USD/hour")
    p.add_argument("--memory-fraction", type=float, default=cap.DEFAULT_MEMORY_FRACTION,
                   help="share of node RAM for the index (default %(default)s)")
    p.add_argument("--gpu", default="a100", help="encode GPU (default %(default)s)")
    p.add_argument("--gpu-price", type=float, default=None, help="USD per GPU-hour override")
    p.add_argument("--mfu", type=float, default=cap.DEFAULT_MFU,
                   help="model FLOPs utilisation for the FLOPs estimate (default %(default)s)")
    p.add_argument("--docs-per-second", type=float, default=None,
                   help="measured encode throughput per GPU; replaces the FLOPs estimate")
    p.add_argument("--encode-gpus", type=int, default=8, help="GPUs encoding in parallel")
    p.add_argument("--replicas", type=int, default=1, help="replicas of each index shard")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> cap.PlanConfig:
    model = None if str(args.model).lower() in ("none", "custom", "") else args.model.lower()
    return cap.PlanConfig(
        docs=args.docs, model=model, params=args.params, dims=args.dims,
        avg_tokens=args.avg_tokens, dtype=args.dtype, index=args.index, pq_m=args.pq_m,
        pq_nbits=args.pq_nbits, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
        node_type=args.node_type, node_memory_gib=args.node_memory_gib,
        node_price=args.node_price, memory_fraction=args.memory_fraction, gpu=args.gpu.lower(),
        gpu_price=args.gpu_price, mfu=args.mfu, docs_per_second=args.docs_per_second,
        encode_gpus=args.encode_gpus, replicas=args.replicas,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = cap.plan(config_from_args(args))
    except ValueError as exc:
        print(f"retriever plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(cap.format_plan(result))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["plan", *sys.argv[1:]]))
