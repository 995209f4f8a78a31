"""Encode throughput: the Ray Data encode job against sentence-transformers and against the
in-process bf16 ceiling, in one run.

    python benchmarks/encode_throughput.py                  # SciFact, then the scaling sizes
    python benchmarks/encode_throughput.py --sizes npl      # SciFact and NPL only
    python benchmarks/encode_throughput.py --main scifact:1000 --sizes npl:2000   # quick

Three ways to embed the same passages (``title + " " + text``) with the same model and max
length (256):

- the job: ``encode_corpus`` on a local Ray (every CPU), timed end to end -- Ray Data's
  start-up, the actors' start (imports, model load) and the writes included; nothing is warmed
  up for it;
- the peer: ``SentenceTransformer(minilm dir).encode(texts, batch_size=32)`` in this process,
  fp32 (its default), every core; its model load excluded;
- the ceiling: the job's own ``Encoder`` (its default dtype: bf16 autocast on CPUs with native
  bf16) in this process, torch threads = every core, no Ray; its model load excluded;
- with ``--peer-bf16``, the peer once more under ``torch.autocast`` bf16: what bf16 alone gives
  on this CPU, which bounds job / peer (the job cannot beat its own in-process ceiling).

Printed per collection: docs/s of each, job / peer (targets: >= 2.5 on SciFact, >= 2.0 on
NPL), job / ceiling (target >= 0.8 on SciFact), the least cosine between job and peer vectors
(>= 0.9999) and, for whole collections, NDCG@10 of the job's vectors (queries by the in-process
Encoder, as the evaluation and the Serve app embed them) next to the peer's fp32 (within 0.002).

Ray starts its workers at nice 15; here they start at nice 0 (``RAY_worker_niceness``) so
that on a shared, busy machine the job and the in-process runs compete for the CPUs on the same
terms. Ray is shut down while the in-process runs go. Figures on a busy machine are noisy and
depressed: compare the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATASETS = REPO.parent / "shared" / "datasets"
TARGETS = {"scifact": 2.5, "npl": 2.0}  # job / peer
CEILING_TARGET = 0.8  # job / in-process bf16 ceiling, on SciFact


def corpus_file(name: str, limit: int | None, folder: Path) -> tuple[Path, list[str], list[str]]:
    """A JSONL corpus (the first ``limit`` docs of a shared collection), ids, passages."""
    from retriever.io.formats import load_corpus

    corpus = load_corpus(str(DATASETS / name / "corpus.jsonl.gz"))
    keep = range(len(corpus) if limit is None else min(limit, len(corpus)))
    corpus = corpus.subset(keep)
    path = folder / f"{name}-{len(corpus)}" / "corpus.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ({"_id": corpus.ids[i], "title": corpus.titles[i], "text": corpus.texts[i]}
            for i in range(len(corpus)))
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return path.parent, corpus.ids, corpus.passages()


def start_ray(cpus: int) -> None:
    """A local Ray with every CPU, workers at nice 0; retried (a busy machine can time out)."""
    import ray

    from retriever.ops import local_ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet it starts
    for attempt in range(3):
        try:
            local_ray.init("local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:  # noqa: BLE001
            print(f"ray.init failed ({err}); retrying", file=sys.stderr)
            ray.shutdown()
            if attempt == 2:
                raise


def run_job(corpus: Path, out: Path, args, dtype: str = "auto"):
    from retriever.modeling.encoder import EncoderConfig
    from retriever.pipelines.encode import EncodeOptions, encode_corpus

    started = time.perf_counter()
    options = EncodeOptions(encoder=EncoderConfig(model=args.model, dtype=dtype),
                            docs_per_shard=args.docs_per_shard, actors=args.actors,
                            threads_per_actor=args.threads_per_actor, embedding_dtype="float32")
    result = encode_corpus(str(corpus), options, str(out))
    wall = time.perf_counter() - started
    assert result.complete, result.summary()
    return result, wall


def run_peer(model_path: str, passages: list[str], cpus: int,
             bf16: bool = False) -> tuple[np.ndarray, float]:
    """sentence-transformers' ``encode``, every core (model load not timed): fp32 (its
    default), or under bf16 autocast (``bf16``: what autocast alone gives on this CPU)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(cpus)
    st = SentenceTransformer(model_path, device="cpu")
    st.max_seq_length = 256
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        vectors = st.encode(passages, batch_size=32, normalize_embeddings=True)
    return vectors, time.perf_counter() - started


def run_ceiling(model: str, passages: list[str], cpus: int):
    """The job's Encoder in this process, every core, no Ray (model load not timed)."""
    import torch

    from retriever.modeling.encoder import Encoder, EncoderConfig

    torch.set_num_threads(cpus)
    encoder = Encoder(EncoderConfig(model=model))
    started = time.perf_counter()
    vectors = encoder.encode_passages(passages)
    return encoder, vectors, time.perf_counter() - started


def ndcg_at_10(name: str, ids: list[str], vectors: np.ndarray, query_vectors: np.ndarray,
               query_ids: list[str]) -> float:
    from retriever.evaluation.retrieval import score_run
    from retriever.index.exact import ExactSearcher
    from retriever.io.formats import load_dataset

    hits = ExactSearcher(vectors, ids, use_gpu=False).search(query_vectors, 100)
    return score_run(load_dataset(str(DATASETS / name)), dict(zip(query_ids, hits)))["ndcg@10"]


def measure_in_process(row: dict, corpora: dict, model_path: str, args, cpus: int) -> None:
    """The peer and the ceiling on a row's corpus; cosine and (whole collections) NDCG@10."""
    from sentence_transformers import SentenceTransformer

    from retriever.io import embeddings
    from retriever.io.formats import load_dataset

    _, ids, passages = corpora[row["point"]]
    encoder, _, row["ceiling_s"] = run_ceiling(args.model, passages, cpus)
    peer_vectors, row["peer_s"] = run_peer(model_path, passages, cpus)
    if args.peer_bf16:
        row["peer_bf16_s"] = run_peer(model_path, passages, cpus, bf16=True)[1]
    job_ids, job_vectors = embeddings.load(str(row["folder"]))
    order = {d: i for i, d in enumerate(job_ids)}
    job_vectors = job_vectors[[order[d] for d in ids]]
    row["cosine_min"] = float((job_vectors * peer_vectors).sum(1).min())
    name, limit = row["point"]
    if limit is None:
        queries = load_dataset(str(DATASETS / name)).judged_queries()
        st = SentenceTransformer(model_path, device="cpu")
        row["ndcg_job"] = ndcg_at_10(name, ids, job_vectors,
                                     encoder.encode_queries(list(queries.values())), list(queries))
        row["ndcg_peer"] = ndcg_at_10(name, ids, peer_vectors,
                                      st.encode(list(queries.values()), normalize_embeddings=True),
                                      list(queries))
    print(f"in-process {row['label']:>14}: ceiling {row['docs'] / row['ceiling_s']:.1f} docs/s, "
          f"peer {row['docs'] / row['peer_s']:.1f} docs/s" +
          (f", peer under bf16 autocast {row['docs'] / row['peer_bf16_s']:.1f} docs/s "
           f"({row['peer_s'] / row['peer_bf16_s']:.2f}x fp32)" if "peer_bf16_s" in row else ""),
          flush=True)


def points_of(args) -> list[tuple[str, int | None]]:
    """(collection, doc limit) per row: ``N`` is a SciFact prefix, ``name`` a collection,
    ``name:N`` its first N docs."""
    points: list[tuple[str, int | None]] = []
    for item in filter(None, [args.main, *args.sizes.split(",")]):
        name, _, limit = item.rpartition(":") if ":" in item else ("", "", item)
        point = ((name or "scifact", int(limit)) if limit.isdigit() else (item, None))
        if point not in points:
            points.append(point)
    return points


def run_jobs(points, corpora, work: Path, args, cpus: int) -> tuple[list[dict], tuple | None]:
    import ray

    rows, fp32 = [], None
    start_ray(cpus)
    try:
        for point in points:
            folder, ids, _ = corpora[point]
            result, wall = run_job(folder, work / f"out-{folder.name}", args)
            label = point[0] + (f":{point[1]}" if point[1] else "")
            rows.append({"point": point, "label": label, "docs": len(ids), "job_s": wall,
                         "result": result, "folder": work / f"out-{folder.name}"})
            print(f"job {label:>14}: {len(ids)} docs in {wall:.1f}s ({len(ids) / wall:.1f} "
                  f"docs/s) | {result.summary()}", flush=True)
        if args.fp32:
            folder, ids, _ = corpora[points[0]]
            fp32 = run_job(folder, work / "out-fp32", args, dtype="float32")
    finally:
        ray.shutdown()
    return rows, fp32


def report(rows: list[dict], fp32, args, cpus: int) -> None:
    main = rows[0]
    print(f"\n== {args.model}, max length 256, {cpus} CPUs, job: {main['result'].resources}")
    print(f"{'corpus':>14} {'docs':>6} {'job s':>7} {'job d/s':>8} {'ceil d/s':>8} "
          f"{'peer d/s':>8} {'job/peer':>8} {'target':>6} {'job/ceil':>8} {'padding':>7} "
          f"{'cos min':>8} {'ndcg job':>8} {'ndcg fp32':>9}")
    for row in rows:
        rate = row["docs"] / row["job_s"]
        measured = "peer_s" in row
        ceiling = row["docs"] / row["ceiling_s"] if measured else float("nan")
        peer = row["docs"] / row["peer_s"] if measured else float("nan")
        target = TARGETS.get(row["point"][0], float("nan"))
        nan = float("nan")
        print(f"{row['label']:>14} {row['docs']:6d} {row['job_s']:7.1f} {rate:8.1f} "
              f"{ceiling:8.1f} {peer:8.1f} {rate / peer:8.2f} {target:6.1f} "
              f"{rate / ceiling:8.2f} {100 * row['result'].padding_fraction:6.1f}% "
              f"{row.get('cosine_min', nan):8.6f} {row.get('ndcg_job', nan):8.4f} "
              f"{row.get('ndcg_peer', nan):9.4f}")
    if "peer_s" in main:
        print(f"\njob / peer on {main['label']}: {main['peer_s'] / main['job_s']:.2f} "
              f"(target {TARGETS.get(main['point'][0], float('nan'))}); job / in-process bf16 "
              f"ceiling: {main['ceiling_s'] / main['job_s']:.2f} (target {CEILING_TARGET})")
    if fp32 is not None:
        print(f"job --dtype float32 on {main['label']}: {main['docs'] / fp32[1]:.1f} docs/s")
    print("(the job's time includes its start-up; the in-process runs exclude their model load)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--main", default="scifact",
                        help="the first row: a collection, or a doc count (SciFact prefix)")
    parser.add_argument("--sizes", default="1000,npl",
                        help="more rows: a doc count (SciFact prefix), a collection, or name:N")
    parser.add_argument("--docs-per-shard", type=int, default=500)
    parser.add_argument("--actors", type=int, default=0)
    parser.add_argument("--threads-per-actor", type=int, default=0)
    parser.add_argument("--fp32", action="store_true", help="also time the job in float32")
    parser.add_argument("--peer-bf16", action="store_true",
                        help="also time the peer under bf16 autocast (this CPU's bf16 speed-up)")
    parser.add_argument("--no-peer-at-sizes", action="store_true",
                        help="run the peer and the ceiling on the first row only")
    args = parser.parse_args()

    from retriever.modeling.registry import resolve_model

    model_path = str(resolve_model(args.model).path)
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    points = points_of(args)
    corpora = {p: corpus_file(p[0], p[1], work) for p in points}
    rows, fp32 = run_jobs(points, corpora, work, args, cpus)
    for row in rows if not args.no_peer_at_sizes else rows[:1]:
        measure_in_process(row, corpora, model_path, args, cpus)
    report(rows, fp32, args, cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
