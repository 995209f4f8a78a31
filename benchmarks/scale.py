"""Scale benchmark (issue 11): how the encode and index jobs grow with the corpus. Not a test.

Prints one table:

* **encode**: the Ray Data job on a local 2-node cluster (``retriever.ops.cluster``, the same
  as ``retriever cluster up --local``: a head and one worker, one CPU each) over synthetic
  corpora (``retriever.io.synthetic``: SciFact's lengths, Zipfian words) of two sizes 10x
  apart (default 1e5 and 1e6 docs; ``--quick``: 1e4 and 1e5), with a tiny randomly
  initialised BERT and 32 tokens (this measures mechanics, not a model). Per size: docs/s (the
  job's own clock: plan, read, tokenize, encode, write) and the peak RSS of each kind of
  process: the job's driver, and the cluster's Ray workers by what they run (their process
  title ``ray::<task or actor>``, sampled with psutil every 0.2 s): ``plan`` (scan and
  duplicate-id tasks), ``read``, ``tokenize``, ``encode``, ``write``. Then ``docs/s ratio (10x
  docs)`` and ``peak RSS growth (10x docs)``: the largest ratio over the process kinds (also
  of RSS less shared memory: Ray's object-store pages a worker touched count in its RSS).
  Both sizes read pieces of the same size (``--read-bytes``: the smaller corpus' largest
  file), so a read task's memory is compared like for like.
* **index** (``--vectors``, default 1e7; ``--quick``: 1e6; 0 skips): clustered vectors
  (d=128, ``synthetic.clustered_vectors``) written as an embeddings folder, built by the index
  job into 8 IVF-PQ shards with an fp16 re-rank store of 64 x k candidates (nprobe chosen on
  1,000 held-out tuning queries; SQ8's rounding exceeds the gaps between a blob's neighbours,
  and at 1e7 vectors 4 x k PQ candidates miss them): build time, peak RSS
  of the build tasks, bytes per vector on disk next to the planner's figure (``planner
  error``), recall@10 against exact search on 1,000 other held-out queries.
* **serve**: the 8 shards through the Ray Serve app without and with mmap: p50/p99 and QPS at
  concurrency 16, each searcher's RSS, anonymous memory and resident shard-file pages (the
  ``.faiss`` file and, with mmap, its id map's Arrow copy), then one summary line per mode:
  the mean searcher's RSS over its shard's bytes, and the anonymous memory the shard itself
  holds (measured in a probe process that loads shard 0 the same way and searches the same
  queries one at a time: its RssAnon growth, after a first shard took the one-time set-up).
  Last, shard 0 in such a probe under a memory limit of half the shard's bytes (a memory
  cgroup, ``tests/memory_cgroup.py``, charging all it allocates, reads or maps after
  start-up), with and without mmap: whether it answers as unlimited, its peak charge and RSS
  growth; without mmap it must be killed by the limit (needs root; else the line says
  skipped).

Everything generated goes under ``--work`` (default: a temporary folder, removed at the end
unless ``--keep``). The machine may be shared: every figure says so, and only the ratios
between sizes measured in the same run are meant to be compared.

    python benchmarks/scale.py --quick
    python benchmarks/scale.py --docs 1e5 1e6 --vectors 1e7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = {  # process kind -> what its Ray worker's title contains
    "plan": ("scan_piece", "find_duplicates"),
    "read": ("ReadCorpusShards",),
    "tokenize": ("TokenizeShards",),
    "encode": ("EncodeShards",),
    "write": ("write_shards", "WriteShards"),
    "build": ("build_shard", "_build_shard", "IndexShard", "shard_task"),
}


class RssSampler:
    """Peak RSS (bytes) per process kind, sampled every ``period`` s: ``driver`` is the pid
    given; the rest are the cluster's processes, classified by their title."""

    def __init__(self, cluster, driver_pid: int | None = None, period: float = 0.2):
        self.cluster, self.driver_pid, self.period = cluster, driver_pid, period
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _note(self, kind: str, rss: int) -> None:
        self.peaks[kind] = max(self.peaks.get(kind, 0), rss)

    def _run(self) -> None:
        nodes = raylets(self.cluster)
        while not self._stop.wait(self.period):
            if self.driver_pid:
                self._sample("driver", self.driver_pid)
            for raylet in nodes:  # a node's Ray workers are its raylet's children
                try:
                    workers = raylet.children()
                except psutil.Error:
                    continue
                for proc in workers:
                    try:
                        title = " ".join(proc.cmdline())
                    except psutil.Error:
                        continue
                    for kind, marks in KINDS.items():
                        if title.startswith("ray::") and any(m in title for m in marks):
                            self._sample(kind, proc.pid)

    def _sample(self, kind: str, pid: int) -> None:
        # RSS less its shared-memory part (RssShmem): chiefly Ray's object store in /dev/shm,
        # whose pages a worker touched stay counted in its RSS while the store (bounded by
        # Ray's object-store size) holds them.
        memory = memory_status(pid)
        if memory:
            self._note(kind, memory["VmRSS"])
            self._note(f"{kind} private", memory["VmRSS"] - memory.get("RssShmem", 0))


def memory_status(pid: int) -> dict[str, int] | None:
    """A process's memory fields from /proc/<pid>/status in bytes (VmRSS, RssAnon, RssFile,
    RssShmem, ...), None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = (line.split(":", 1) for line in status.splitlines() if line.endswith(" kB"))
    return {key: int(value.split()[0]) * 1024 for key, value in fields}


def raylets(cluster) -> list:
    """The cluster's raylets (psutil processes): one a node, Ray workers are their children."""
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "raylet" and cluster.temp_dir in " ".join(p.info["cmdline"] or [])]


def _env(cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": cluster.auth,
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    return env


def run_job(cluster, args: list[str], log: Path) -> tuple[int, dict[str, int], float]:
    """``python -m jobs.<...>`` against the cluster: exit code, peak RSS by kind, seconds."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], env=_env(cluster), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
        with RssSampler(cluster, proc.pid) as sampler:
            rc = proc.wait()
    if rc != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return rc, sampler.peaks, time.perf_counter() - started


# ---------------------------------------------------------------------------- encode

def generate_corpus(work: Path, docs: int, seed: int) -> Path:
    """The synthetic corpus of ``docs`` documents in 8 JSONL files (kept across runs)."""
    from retriever.io import synthetic

    corpus = work / f"corpus-{docs}"
    if not (corpus / "done").exists():
        started = time.perf_counter()
        synthetic.write_corpus(str(corpus), docs, files=8, seed=seed)
        (corpus / "done").write_text("")
        print(f"  generated {docs:,} docs in {time.perf_counter() - started:.0f}s", flush=True)
    return corpus


def piece_bytes(corpus: Path) -> int:
    """``--read-bytes`` for every size: the smaller corpus' largest file, so each of its files
    is one full piece and the larger corpus' files are cut into pieces of the same size (a
    read task's memory is compared like for like)."""
    return max(f.stat().st_size for f in corpus.glob("part-*.jsonl"))


def encode_size(cluster, work: Path, model: str, corpus: Path, docs: int,
                read_bytes: int) -> dict:
    from retriever.io import embeddings

    out = work / f"emb-{docs}"
    shutil.rmtree(out, ignore_errors=True)
    rc, peaks, _ = run_job(cluster, ["jobs.encode", "--corpus", str(corpus), "--out", str(out),
                                     "--model", model, "--passage-max-length", "32",
                                     "--docs-per-shard", "1000", "--read-bytes",
                                     str(read_bytes)], work / f"encode-{docs}.log")
    if rc != 0:
        raise SystemExit(f"encode of {docs} docs failed (log: {work}/encode-{docs}.log)")
    manifest = embeddings.read_manifest(str(out))
    assert manifest["rows"] == docs, manifest["rows"]
    run = manifest["encode"]["last_run"]
    return {"docs": docs, "docs_per_s": run["docs_per_s"], "seconds": run["seconds"],
            "peaks": peaks, "pieces": manifest["encode"]["read"]["pieces"],
            "nodes": len(manifest["encode"]["read"]["read_nodes"]), "read_bytes": read_bytes}


def encode_section(cluster, work: Path, model: str, args) -> list[str]:
    corpora = [generate_corpus(work, docs, args.seed) for docs in args.docs]
    read_bytes = args.read_bytes or piece_bytes(corpora[0])
    rows = []
    for docs, corpus in zip(args.docs, corpora):
        print(f"encode {docs:,} docs ...", flush=True)
        rows.append(encode_size(cluster, work, model, corpus, docs, read_bytes))
    return encode_table(rows)


def encode_table(rows: list[dict]) -> list[str]:
    kinds = ["driver", "plan", "read", "tokenize", "encode", "write"]
    mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"  # noqa: E731
    cell = lambda peaks, k: f"{mib(peaks.get(k))}/{mib(peaks.get(k + ' private'))}"  # noqa: E731
    lines = ["encode (local 2-node cluster, 1 CPU a node; tiny BERT, 32 tokens; machine "
             "shared and busy)",
             f"  pieces of {rows[0]['read_bytes'] / 2**20:.2f} MiB at every size (--read-bytes "
             "= the smaller corpus' largest file: full pieces at both sizes); peak RSS / RSS "
             "less shared memory (Ray's object store pages), MiB",
             f"  {'docs':>10} {'docs/s':>8} {'pieces':>6} {'nodes':>5} " +
             " ".join(f"{k:>11}" for k in kinds)]
    for r in rows:
        lines.append(f"  {r['docs']:>10,} {r['docs_per_s']:>8.1f} {r['pieces']:>6} "
                     f"{r['nodes']:>5} " + " ".join(f"{cell(r['peaks'], k):>11}" for k in kinds))
    if len(rows) == 2:
        small, big = rows
        times = big["docs"] // small["docs"]
        lines.append(f"  docs/s ratio ({times}x docs): "
                     f"{big['docs_per_s'] / small['docs_per_s']:.2f}")
        for label, suffix in (("peak RSS growth", ""), ("peak RSS less shared growth",
                                                         " private")):
            growth = {k: big["peaks"][k + suffix] / small["peaks"][k + suffix] for k in kinds
                      if small["peaks"].get(k + suffix) and big["peaks"].get(k + suffix)}
            worst = max(growth, key=growth.get)
            lines.append(f"  {label} ({times}x docs): {growth[worst]:.2f} ({worst}; " +
                         ", ".join(f"{k} {v:.2f}" for k, v in growth.items()) + ")")
    return lines


# ---------------------------------------------------------------------------- index

def write_vectors(folder: Path, n: int, dim: int, seed: int, rows_per_part: int = 500_000,
                  stream: int = 0):
    """``n`` clustered vectors as an embeddings folder (float16 parts + manifest); ``stream``
    0 is the data, others held-out points of the same mixture."""
    from retriever.io import embeddings, synthetic

    parts = []
    chunks = synthetic.clustered_vector_chunks(n, dim, seed=seed, chunk=rows_per_part,
                                               stream=stream)
    for i, chunk in enumerate(chunks):
        start = i * rows_per_part
        ids = [f"v{start + j}" for j in range(len(chunk))]
        parts.append(embeddings.write_part(str(folder), i, ids, chunk, "float16"))
    # Served with {"vector": ...} queries; the app still builds a query encoder, so the
    # manifest names a real one (MiniLM; dims differ: served as an asymmetric encoder).
    encoder = {"model": "minilm", "pooling": "mean", "normalize": True, "dim": dim}
    embeddings.write_manifest(str(folder), encoder=encoder, dtype="float16", parts=parts,
                              source={"url": "synthetic",
                                      "fingerprint": f"{n}-{dim}-{seed}-{stream}"})


def exact_top10(folder: Path, queries: np.ndarray) -> np.ndarray:
    """Row numbers of the exact inner-product top 10, streamed part by part."""
    import faiss

    from retriever.io import embeddings

    best_scores = np.full((len(queries), 10), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 10), np.int64)
    offset = 0
    for _, vectors in embeddings.iter_parts(str(folder)):
        vectors = np.asarray(vectors, np.float32)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        scores, ids = flat.search(queries, 10)
        scores = np.concatenate([best_scores, scores], 1)
        ids = np.concatenate([best_ids, ids + offset], 1)
        order = np.argsort(-scores, 1)[:, :10]
        best_scores = np.take_along_axis(scores, order, 1)
        best_ids = np.take_along_axis(ids, order, 1)
        offset += len(vectors)
    return best_ids


# ---------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1e4/1e5 docs, 1e6 vectors")
    parser.add_argument("--docs", type=float, nargs=2, default=None)
    parser.add_argument("--vectors", type=float, default=None, help="0: no index section")
    parser.add_argument("--no-encode", action="store_true", help="skip the encode section")
    parser.add_argument("--work", default=None, help="folder for generated data")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--read-bytes", type=int, default=0,
                        help="piece size (0: the smaller corpus' largest file: full pieces "
                             "at both sizes)")
    args = parser.parse_args(argv)
    args.docs = [int(d) for d in (args.docs or ((1e4, 1e5) if args.quick else (1e5, 1e6)))]
    args.vectors = int(args.vectors if args.vectors is not None else
                       (1e6 if args.quick else 1e7))
    return args


def main(argv=None) -> int:
    from retriever.ops import cluster as lc
    from tests.train_fixtures import tiny_bert

    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(tiny_bert(work / "tiny-bert"))
    state = work / "cluster.json"
    lines: list[str] = []
    started = time.perf_counter()
    # Ray reads its auth mode once a process, at its first token check (``up`` makes one):
    # set it first, as the nodes get it (token unless opted out), or the serve section's
    # ray.init would be refused ("Authentication token is missing or incorrect").
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # The mapped searchers' id map copies (``shards.cached_ids``) go under --work, not ~/.cache:
    # the nodes, and so the searchers, inherit this environment.
    os.environ.setdefault("RETRIEVER_SHARD_CACHE", str(work / "shard-cache"))
    cluster = lc.up(lc.LocalClusterConfig(workers=1, head_cpus=1, worker_cpus=1,
                                          state_path=str(state), timeout_s=300))
    try:
        if not args.no_encode:
            lines += encode_section(cluster, work, model, args)
            print("\n".join(lines), flush=True)  # now: the index section may take long
        if args.vectors:
            print(f"index {args.vectors:,} vectors ...", flush=True)
            lines += index_section(cluster, work, args.vectors, args.seed)
    finally:
        lc.down(str(state), grace_s=5)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines + [f"(total {time.perf_counter() - started:.0f}s; load average "
                             f"{os.getloadavg()[0]:.0f} on {os.cpu_count()} CPUs)"]))
    return 0


def index_section(cluster, work: Path, n: int, seed: int) -> list[str]:
    """Build ``n`` clustered vectors into 8 IVF-PQ shards with the index job; measure."""
    from retriever.io import synthetic
    from retriever.index import shards as sh

    vectors = work / f"vectors-{n}"
    # The job picks nprobe on held-out queries of the mixture (stream 2), not on sampled
    # documents; recall is then measured on other held-out ones (stream 1). The re-rank store
    # is fp16, not the default SQ8: a blob's points are nearly equidistant (median gap between
    # a query's 10th and 11th scores 7.7e-4 at 2e5 vectors), below SQ8's rounding, so an SQ8
    # re-rank caps recall@10 whatever nprobe and k_factor (0.963 at 2e5 vectors, 0.948 at
    # 1e6 through the job); SQfp16 reaches 1.0 at 2e5 (benchmarks/rerank_recall.py). And 64
    # candidates a hit (``--k-factor``; default 4): at 1e7 vectors a blob's points are so close
    # that PQ16's order keeps too few true neighbours in 4 x 10 candidates, and recall@10
    # stopped at 0.754 for every nprobe (the index job's nprobe table, index-10000000.log).
    tuning = work / "tuning-queries"
    for folder, rows, stream in ((vectors, n, 0), (tuning, 1000, 2)):
        if not (folder / "manifest.json").exists():
            write_vectors(folder, rows, 128, seed, stream=stream)
    out = work / f"index-{n}"  # under --work: reused if same vectors and settings, else rebuilt
    rc, peaks, seconds = run_job(cluster, ["jobs.index", "--embeddings", str(vectors),
                                           "--out", str(out), "--type", "ivfpq",
                                           "--shards", "8", "--workers", "2",
                                           "--refine", "SQfp16", "--k-factor", "64",
                                           "--queries", str(tuning), "--replace"],
                                 work / f"index-{n}.log")
    if rc != 0:
        return [f"index: the index job failed (log: {work}/index-{n}.log)"]
    manifest = json.loads((out / "manifest.json").read_text())
    reused = (out / "manifest.json").stat().st_mtime < time.time() - seconds
    on_disk = sum(f.stat().st_size for f in out.glob("shard-*.faiss"))
    planned = manifest["bytes_per_vector"]["planned"]
    queries = synthetic.clustered_queries(1000, 128, seed=seed)
    truth = exact_top10(vectors, queries)
    found = sh.search_all(sh.load_all(str(out), gpu=False, mmap=True), queries, 10)
    recall = recall_at_10(found, truth)
    del found
    lines = [f"index ({n:,} clustered vectors, d=128, 8 IVF-PQ shards; fp16 re-rank of 64 x k "
             "candidates)",
             f"  build time {seconds:.0f}s{' (REUSED: not built in this run)' if reused else ''}, peak RSS of build tasks "
             f"{peaks.get('build', 0) / 2**20:,.0f} MiB, "
             f"driver {peaks.get('driver', 0) / 2**20:,.0f} MiB",
             f"  bytes per vector on disk {on_disk / n:.1f}, planner {planned:.1f} "
             f"(planner error: {100 * (planned - on_disk / n) / (on_disk / n):+.1f}%)",
             f"  recall@10 vs exact (1,000 held-out queries): {recall:.3f}"]
    try:
        lines += serve_section(cluster, out, queries, manifest)
    except Exception as err:  # noqa: BLE001 -- the table still prints what was measured
        lines.append(f"serve: failed ({type(err).__name__}: {err})")
    return lines


# ---------------------------------------------------------------------------- serve

SHARD_FILES = (".faiss", ".ids.arrow")  # a mapped shard: its FAISS file, its id map's copy


def mapped_rss(pid: int, suffix: str | tuple[str, ...]) -> int:
    """Resident bytes of the process's file mappings whose path ends with ``suffix`` (the
    memory-mapped shard's pages this process has touched, from /proc/<pid>/smaps)."""
    total, inside = 0, False
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split()
        if head and not head[0].endswith(":"):  # a mapping's header: address range ... path
            inside = head[-1].endswith(suffix)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def searcher_rss(cluster) -> dict[int, dict[str, int]]:
    """ShardSearcher-N replica -> its memory (bytes): ``rss``; ``anon`` (RssAnon: what the
    process itself allocated); ``mapped`` (the shard files' resident pages, page cache the
    kernel can drop)."""
    out = {}
    for raylet in raylets(cluster):
        for proc in raylet.children():
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            memory = memory_status(proc.pid)
            if memory and "ShardSearcher-" in title and title.startswith("ray::"):
                number = int(title.split("ShardSearcher-")[1].split()[0].split(".")[0])
                out[number] = {"rss": memory["VmRSS"], "anon": memory.get("RssAnon", 0),
                               "mapped": mapped_rss(proc.pid, SHARD_FILES)}
    return out


def serve_section(cluster, index: Path, queries: np.ndarray, manifest: dict) -> list[str]:
    """The 8 shards served through the Ray Serve app (one searcher a shard), without and
    with mmap: p50/p99 and QPS at concurrency 16, each searcher's RSS next to its shard."""
    import ray
    from ray import serve

    from benchmarks.search_latency import free_port, over_http, percentiles
    from serve.app import build_app

    os.environ.update(RAY_ADDRESS=cluster.gcs_address, RAY_AUTH_MODE=cluster.auth)
    ray.init(address=cluster.gcs_address, log_to_driver=False)
    port = free_port()
    bodies = [json.dumps({"vector": q.tolist(), "top_k": 10}).encode() for q in queries]
    sizes = {n: entry["bytes"] for n, entry in enumerate(manifest["shards"])}
    lines = [f"serve (8 shards, one ShardSearcher each, concurrency 16, {len(bodies)} requests; "
             "machine shared and busy)"]
    memory: dict[bool, dict] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mmap in (False, True):
            serve.run(build_app({"index": str(index), "mmap": mmap, "timeout_s": 60.0,
                                 "shards_per_searcher": 1, "gpu": "no",
                                 "allow_asymmetric_encoder": True}),
                      name="search", route_prefix="/", blocking=False)
            over_http(port, bodies[:64], 4)  # warm up
            latencies, qps = over_http(port, bodies, 16)
            p50, p99 = percentiles(latencies)
            memory[mmap] = searcher_rss(cluster)
            lines.append(f"  mmap={str(mmap):5} p50 {p50:.1f} ms, p99 {p99:.1f} ms, {qps:.0f} QPS")
            serve.delete("search")
            _wait_gone(cluster)
    finally:
        serve.shutdown()
        ray.shutdown()
    probe = {mmap: shard_anon(index, queries, mmap) for mmap in (False, True)}
    return (lines + searcher_lines(memory, sizes, probe) +
            limited_lines(index, queries, sizes[0]))


SHARD_ANON_PROBE = r"""
import sys
import numpy as np
from retriever.index import shards as sh

def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("RssAnon:"))

folder, mmap, queries = sys.argv[1], sys.argv[2] == "mmap", np.load(sys.argv[3])
manifest = sh.read_manifest(folder)
warm = sh.IndexShard.load(folder, 1, manifest, gpu="no", mmap=mmap)  # imports, first calls
for query in queries[:64]:
    warm.search(query[None], 10)
before = anon()
shard = sh.IndexShard.load(folder, 0, manifest, gpu="no", mmap=mmap)
for query in queries:
    shard.search(query[None], 10)
print(anon() - before)
"""


def shard_anon(index: Path, queries: np.ndarray, mmap: bool) -> int:
    """RssAnon growth (bytes) of a fresh process loading shard 0 of ``index`` as a searcher
    does (``IndexShard.load``, with or without mmap) and answering ``queries`` one at a time."""
    path = index.parent / "probe-queries.npy"
    np.save(path, queries)
    proc = subprocess.run([sys.executable, "-c", SHARD_ANON_PROBE, str(index),
                           "mmap" if mmap else "read", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=True)
    return int(proc.stdout.split()[-1])


LIMITED_PROBE = r"""
import hashlib, json, sys
import numpy as np
from retriever.index import shards as sh
from tests import memory_cgroup

folder, mmap, queries = sys.argv[1], sys.argv[2] == "mmap", np.load(sys.argv[3])
cgroup, limit = sys.argv[4], int(sys.argv[5])
manifest = sh.read_manifest(folder)
warm = sh.IndexShard.load(folder, 1, manifest, gpu="no", mmap=mmap)  # imports, first calls
for query in queries[:64]:
    warm.search(query[None], 10)
del warm

def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith("VmRSS:"))

if cgroup != "-":  # from here on, what this process allocates or maps counts
    memory_cgroup.join(cgroup, limit)
before = rss()
shard = sh.IndexShard.load(folder, 0, manifest, gpu="no", mmap=mmap)
digest = hashlib.sha256()
for query in queries:
    for doc_id, _ in shard.search(query[None], 10)[0]:
        digest.update(doc_id.encode() + b"\0")
print(json.dumps({"digest": digest.hexdigest(), "rss_growth": rss() - before,
                  "peak": memory_cgroup.peak(cgroup) if cgroup != "-" else None}))
"""


def limited_probe(index: Path, queries: Path, mmap: bool, limit: int | None = None) -> dict:
    """Shard 0 loaded and searched (as :func:`shard_anon`) in a fresh process whose memory
    after start-up (anonymous and page cache, mapped shard pages included) is limited to
    ``limit`` bytes by a memory cgroup (``tests/memory_cgroup.py``; None: no limit): its
    answers' digest, peak charge and RSS growth, or ``killed`` when the limit's OOM killer
    ended it."""
    from tests import memory_cgroup

    def run(cgroup: str = "-") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LIMITED_PROBE, str(index),
                               "mmap" if mmap else "read", str(queries), cgroup,
                               str(limit or 0)],
                              capture_output=True, text=True, cwd=REPO, timeout=900)

    if limit is None:
        proc = run()
    else:
        with memory_cgroup.limited_cgroup(f"retriever-scale-{int(mmap)}") as cgroup:
            memory_cgroup.drop_cached_pages([index, Path(os.environ["RETRIEVER_SHARD_CACHE"])])
            proc = run(cgroup)
    if proc.returncode != 0:
        return {"killed": proc.returncode == -9, "error": proc.stderr[-300:]}
    return json.loads(proc.stdout.splitlines()[-1])


def limited_lines(index: Path, queries: np.ndarray, shard_bytes: int) -> list[str]:
    """Shard 0 served under a memory limit of half its bytes, with and without mmap: the
    mapped searcher must answer as it does unlimited, and the read one must not fit."""
    from tests import memory_cgroup

    head = ("  searcher under a memory limit of 0.5x its shard (a cgroup, on all it allocates "
            "or maps after start-up)")
    if memory_cgroup.writable_root() is None:
        return [f"{head}: skipped (needs root and a memory cgroup controller)"]
    path = index.parent / "probe-queries.npy"
    unlimited = limited_probe(index, path, True)["digest"]
    lines = [f"{head}, {len(queries):,} queries one at a time"]
    for mmap in (True, False):
        got = limited_probe(index, path, mmap, shard_bytes // 2)
        if "digest" in got:
            lines.append(
                f"    mmap={str(mmap):5} answered; same answers as unlimited: "
                f"{got['digest'] == unlimited}; peak charge "
                f"{got['peak'] / shard_bytes:.2f}x shard, RSS growth "
                f"{got['rss_growth'] / shard_bytes:.2f}x shard")
        else:
            lines.append(f"    mmap={str(mmap):5} " + ("killed by the limit (out of memory)"
                         if got["killed"] else f"failed: {got['error']!r}"))
    return lines


def _wait_gone(cluster, timeout_s: float = 60.0) -> None:
    """Until no searcher replica process is left (the next app's must not be mixed in)."""
    deadline = time.monotonic() + timeout_s
    while searcher_rss(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)


def searcher_lines(memory: dict[bool, dict], sizes: dict[int, int],
                   probe: dict[bool, int]) -> list[str]:
    """Each searcher's memory without and with mmap next to its shard file's bytes, then
    :func:`summary_lines`.

    A replica's RSS includes its process (Python, Ray, FAISS: ~200-250 MiB before any shard),
    so at small shards the RSS ratio says little; the shard files' resident pages are page
    cache (the kernel drops them under pressure)."""
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["  searcher memory, MiB: RSS (anon, shard files' pages resident) without | with "
             "mmap; shard = its .faiss file"]
    for n in sorted(set(memory.get(False, {})) & set(memory.get(True, {}))):
        plain, mapped, size = memory[False][n], memory[True][n], sizes[n]
        lines.append(
            f"    searcher {n}: {mib(plain['rss'])} ({mib(plain['anon'])}, "
            f"{mib(plain['mapped'])}) | {mib(mapped['rss'])} ({mib(mapped['anon'])}, "
            f"{mib(mapped['mapped'])}); shard {mib(size)}; RSS with mmap = "
            f"{mapped['rss'] / size:.2f}x shard, shard files' pages resident "
            f"{mapped['mapped'] / size:.2f}x")
    return lines + summary_lines(memory, sizes, probe)


def summary_lines(memory: dict[bool, dict], sizes: dict[int, int],
                  probe: dict[bool, int]) -> list[str]:
    """One line per mode over the searchers measured in both: the mean RSS over the mean shard
    (.faiss bytes); the anonymous memory held for the shard from the probe process
    (:func:`shard_anon`, shard 0 over its bytes); the rest is the process itself."""
    both = sorted(set(memory.get(False, {})) & set(memory.get(True, {})))
    if not both:
        return []
    mean = lambda mode, key: sum(memory[mode][n][key] for n in both) / len(both)  # noqa: E731
    size = sum(sizes[n] for n in both) / len(both)
    return [f"  searcher RSS without mmap: {mean(False, 'rss') / size:.2f}x shard (anonymous "
            f"held for the shard: {probe[False] / sizes[0]:.2f}x; the rest: the process)",
            f"  searcher RSS with mmap: {mean(True, 'rss') / size:.2f}x shard (anonymous held "
            f"for the shard: {probe[True] / sizes[0]:.2f}x; the rest: shard pages in the page "
            f"cache, reclaimable, {mean(True, 'mapped') / size:.2f}x, and the process)"]


def recall_at_10(found, truth: np.ndarray) -> float:
    """Share of the exact top 10 (row numbers) among the hits' ids (``v<row>``)."""
    hits = 0
    for row, expected in zip(found, truth):
        got = {int(doc_id[1:]) for doc_id, _ in row[:10]}
        hits += len(got & set(expected.tolist()))
    return hits / truth.size


if __name__ == "__main__":
    sys.exit(main())
