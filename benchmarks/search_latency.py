"""Search latency through the HTTP API (Ray Serve) next to in-process FAISS on the same shards.

    python benchmarks/search_latency.py                      # synthetic 20,000 x 384 vectors
    python benchmarks/search_latency.py --embeddings URL     # a real embedding folder
    python benchmarks/search_latency.py --requests 1000 --shard-counts 1,2,4,8
    python benchmarks/search_latency.py --shard-counts 4 --cpus 0,1 --peer none

For each shard count, builds flat shards of the same embeddings, then measures with the same
query vectors (``top_k`` 10):

- in-process: ``retriever.index.shards.search_all`` over the loaded shards (one FAISS thread, as a
  replica with < 2 CPUs has), one query at a time; at concurrency 16 from 16 threads;
- HTTP: ``POST /search {"vector": ...}`` to the Serve app (Router -> ShardSearcher x G) on
  127.0.0.1 from 1 and from 16 clients, each with its own keep-alive connection; request
  bodies are serialised before the clock starts. Two layouts of the same shards: one
  ShardSearcher per shard (``shards_per_searcher`` 1, the app's default) and all shards in
  one ShardSearcher (``shards_per_searcher`` N, the single-machine layout).

At concurrency 1 the two are interleaved query by query (in-process, then HTTP), so both
see the same moments of a shared machine whose load swings; at 16 they run one after the
other.

Prints p50 / p99 latency (ms) and QPS for each, the added p50 (HTTP - in-process) in ms and
the ratio HTTP / in-process, measured in the same run. The bar on the 2-core development
machine is <= 15 ms added p50 at 4 shards and concurrency 1; the goal is <= 5 ms.

A second peer, measured in the same run and cluster: Ray Serve's own floor, i.e. an ingress
deployment answering at once (proxy + one replica), one that first awaits one handle call
to a second deployment (the least any fan-out app pays) and one that first reads the search
request's body the ordinary way (Starlette's ``request.body()``: the replica calls the proxy
back for it; the app's Router takes it from the scope, ``serve/proxy.py``), at concurrency 1
(interleaved with the app) and at the main concurrency (right after the app's run); the
search app's p50 is also broken into the Router's own time (``took_ms``: parse, fan-out,
merge) and the rest (proxy, HTTP). Printed at the main shard count: ``app QPS / floor QPS`` at concurrency 16
(target >= 0.6) and ``app p50 - floor p50`` at concurrency 1 (target <= 5 ms).

A third peer, for the embedding endpoint: ``infinity-emb`` (a production embedding server, in
its own venv, ``scripts/setup-infinity.sh``, run by this benchmark when the venv is missing)
serving the same MiniLM directory (the packaged model's cache copy, which carries the
sentence-transformers layout: ``retriever.modeling.st_layout``) on the same CPUs, torch
engine, at the precision the app's encoder picks on this CPU (bf16 with AMX, else fp32).
The app runs again with its QueryEncoder given every pinned CPU, so both use as many torch
threads. One text per request (query-like synthetic sentences): ``POST /v1/embeddings`` vs
infinity's ``POST /embeddings``, requests/s and p50 at concurrency 1 (interleaved text by
text) and 16, side by side with the ratio, and the least cosine between their vectors (the
same model: ~1). ``--peer none`` skips it.

Everything runs pinned to ``--cpus`` (default: every CPU this process may use), loopback only.
The machine's load average is printed, since on a shared 2-core machine it decides most of
these numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.io import embeddings

from retriever.index import shards as sh  # noqa: E402

BAR_MS, GOAL_MS = 15.0, 5.0


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def synthetic(folder: str, rows: int, dim: int, seed: int) -> None:
    from tests.index_fixtures import write_embeddings

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embeddings(folder, [f"doc{i}" for i in range(rows)], vectors,
                     {"model": "minilm", "pooling": "mean", "normalize": True},
                     rows_per_part=50_000)


def query_vectors(folder: str, count: int, seed: int) -> np.ndarray:
    """Queries near sampled documents (a document plus noise, renormalised)."""
    manifest = embeddings.read_manifest(folder)
    _, docs = embeddings.sample_rows(folder, manifest, count, seed)
    noisy = docs + 0.3 * np.random.default_rng(seed).standard_normal(docs.shape).astype(
        np.float32) / np.sqrt(docs.shape[1])
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def run_clients(call, items: list, concurrency: int) -> tuple[list[float], float]:
    """Latency of every call and overall QPS; ``call(worker_state, item)``."""
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [items[i::concurrency] for i in range(concurrency)]

    def worker(chunk):
        state: dict = {}
        mine = []
        for item in chunk:
            started = time.perf_counter()
            call(state, item)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
        closer = state.get("close")
        if closer:
            closer()

    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, chunks))
    return latencies, len(items) / (time.perf_counter() - started)


def in_process(loaded, queries: np.ndarray, k: int, concurrency: int):
    def call(_state, q):
        sh.search_all(loaded, q[None], k)

    return run_clients(call, list(queries), concurrency)


def paired(loaded, port: int, queries: np.ndarray, bodies: list[bytes], k: int,
           floor: bool) -> dict[str, list[float]]:
    """Concurrency 1, interleaved: for each query in-process, then HTTP (then the floor
    apps), so that every kind sees the same moments of a machine whose load swings."""
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("RETRIEVER_API_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out: dict[str, list[float]] = {"local": [], "http": [], "took": [], "empty": [], "hop": []}

    def post(path: str, body: bytes) -> bytes:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or b'"partial": true' in data:
            raise RuntimeError(f"{path}: HTTP {response.status}: {data[:200]!r}")
        return data

    for q, body in zip(queries, bodies):
        started = time.perf_counter()
        sh.search_all(loaded, q[None], k)
        out["local"].append(time.perf_counter() - started)
        started = time.perf_counter()
        data = post("/search", body)
        out["http"].append(time.perf_counter() - started)
        out["took"].append(json.loads(data)["took_ms"] / 1000)
        if floor:
            for name, sent in (("empty", b"{}"), ("hop", b"{}"), ("body", body)):
                started = time.perf_counter()
                post(f"/floor/{name}", sent)
                out.setdefault(name, []).append(time.perf_counter() - started)
    conn.close()
    return out


def auth_headers() -> dict:
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("RETRIEVER_API_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def over_http(port: int, bodies: list[bytes], concurrency: int, took: list | None = None,
              path: str = "/search", headers: dict | None = None):
    """POST each body to ``path`` from ``concurrency`` clients with keep-alive connections;
    a /search answer's ``took_ms`` goes to ``took``."""
    headers = auth_headers() if headers is None else headers

    def call(state, body):
        if "conn" not in state:
            state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            state["close"] = state["conn"].close
        conn = state["conn"]
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or b'"partial": true' in data:
            raise RuntimeError(f"{path}: HTTP {response.status}: {data[:200]!r}")
        if took is not None:
            took.append(json.loads(data)["took_ms"] / 1000)

    return run_clients(call, bodies, concurrency)


def floor_app():
    """An ingress answering at once (``/floor/empty``), after one handle call (``/floor/hop``)
    or after reading the request's body the ordinary way (``/floor/body``)."""
    from fastapi import FastAPI
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    api = FastAPI()
    quiet = {"logging_config": {"enable_access_log": False},
             "ray_actor_options": {"num_cpus": 0.1}}

    @serve.deployment(name="FloorLeaf", **quiet)
    class FloorLeaf:
        async def __call__(self, x):
            return x

    @serve.deployment(name="FloorIngress", **quiet)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, leaf):
            self.leaf = leaf

        @api.post("/empty")
        async def empty(self):
            return Response(b"{}", media_type="application/json")

        @api.post("/hop")
        async def hop(self):
            await self.leaf.remote(1)
            return Response(b"{}", media_type="application/json")

        async def body(self, request):
            await request.body()
            return Response(b"{}", media_type="application/json")

        # the class object, not the string this module's annotations would be: the replica
        # unpickles this function without the module's globals
        body.__annotations__ = {"request": Request}
        body = api.post("/body")(body)

    return FloorIngress.bind(FloorLeaf.bind())


def over_http_path(port: int, path: str, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        conn.request("POST", path, b"{}", {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}")
    conn.close()
    return latencies


# ---------------------------------------------------------------- the embedding endpoint's peer

PEER_VENV = Path(__file__).resolve().parents[1] / ".retriever" / "peers" / "infinity-venv"
PEER_SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup-infinity.sh"
VOCABULARY = ("heat transfer boundary layer pressure gradient shock wave flutter panel jet "
              "nozzle laminar turbulent flow cylinder cone vortex drag lift wing supersonic "
              "protein gene cell expression receptor binding mutation tumour patient trial "
              "dose therapy risk cohort library retrieval index query document ranking").split()


def sentences(count: int, seed: int) -> list[str]:
    """Deterministic query-like texts of 6 to 14 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(VOCABULARY, size=int(rng.integers(6, 15))))
            for _ in range(count)]


def pin_cpus(spec: str | None) -> list[int]:
    """Pin this process, and so Ray and the peer server it starts, to the CPUs ``spec``
    names ("0,1", "0-3"); default: every CPU it may use now."""
    if spec:
        cpus = sorted({c for part in spec.split(",") for c in (
            range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part
            else [int(part)])})
        os.sched_setaffinity(0, cpus)
    return sorted(os.sched_getaffinity(0))


def peer_binary(venv: Path) -> Path:
    """infinity-emb's CLI in its own venv, installed by scripts/setup-infinity.sh if missing."""
    binary = venv / "bin" / "infinity_emb"
    if not binary.exists():
        print(f"infinity-emb is not installed in {venv}: running {PEER_SETUP} (minutes)")
        subprocess.run([str(PEER_SETUP), str(venv)], check=True)
    return binary


def wait_ready(port: int, path: str, process: subprocess.Popen | None, timeout: float,
               log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the peer server exited ({process.returncode}):\n{tail}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the peer server did not answer GET {path} within {timeout:.0f} s "
                       f"(log: {log_path})")


@contextlib.contextmanager
def infinity_server(binary: Path, model_dir: str, name: str, dtype: str, cpus: list[int],
                    log_path: str):
    """infinity-emb serving ``model_dir`` (sentence-transformers layout) on 127.0.0.1,
    pinned to ``cpus``, torch engine, ``dtype``; yields its port."""
    port = free_port()
    env = {**os.environ, "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(binary), "v2", "--model-id", model_dir, "--served-model-name", name,
               "--engine", "torch", "--device", "cpu", "--dtype", dtype, "--batch-size", "32",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--no-bettertransformer"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=lambda: os.sched_setaffinity(0, cpus),
                                   start_new_session=True)
    try:
        wait_ready(port, "/health", process, 900, log_path)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def embed_once(conn: http.client.HTTPConnection, path: str, body: bytes,
               headers: dict) -> bytes:
    conn.request("POST", path, body, headers)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {data[:200]!r}")
    return data


def embedding_rows(ours: tuple[int, str], peer: tuple[int, str], texts: list[str],
                   model: str, concurrency: int) -> tuple[list[tuple], float]:
    """Requests/s and p50 of one text per request to ours and to the peer, at concurrency 1
    (interleaved text by text) and ``concurrency``; and the least cosine of their vectors."""
    headers = auth_headers()
    bodies = [json.dumps({"model": model, "input": text}).encode() for text in texts]
    for (port, path), head in ((ours, headers), (peer, {"Content-Type": "application/json"})):
        over_http(port, bodies[:32], 4, path=path, headers=head)  # warm up
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for port, _ in (ours, peer)]
    single: list[list[float]] = [[], []]
    cosines = []
    for body in bodies:
        vectors = []
        for side, ((_, path), conn, head) in enumerate(zip((ours, peer), conns, (
                headers, {"Content-Type": "application/json"}))):
            started = time.perf_counter()
            data = embed_once(conn, path, body, head)
            single[side].append(time.perf_counter() - started)
            vectors.append(np.asarray(json.loads(data)["data"][0]["embedding"]))
        cosines.append(float(vectors[0] @ vectors[1] / np.linalg.norm(vectors[0])
                             / np.linalg.norm(vectors[1])))
    for conn in conns:
        conn.close()
    rows = [(1, percentiles(single[0])[0], 1 / np.mean(single[0]),
             percentiles(single[1])[0], 1 / np.mean(single[1]))]
    many = [over_http(port, bodies, concurrency, path=path, headers=head)
            for (port, path), head in ((ours, headers),
                                       (peer, {"Content-Type": "application/json"}))]
    rows.append((concurrency, percentiles(many[0][0])[0], many[0][1],
                 percentiles(many[1][0])[0], many[1][1]))
    return rows, min(cosines)


def print_embedding_rows(rows: list[tuple], cosine: float, dtype: str, cpus: list[int],
                         requests: int) -> None:
    print(f"\nPOST /v1/embeddings (this app's QueryEncoder) vs infinity-emb POST /embeddings: "
          f"MiniLM from the same model directory, one text per request, {requests} requests, "
          f"both pinned to CPUs {cpus}, {dtype}, torch threads {len(cpus)} each; vectors "
          f"agree to cosine >= {cosine:.5f}")
    print(f"{'conc':>4} | {'ours req/s':>10} {'p50':>9} | {'infinity req/s':>14} {'p50':>9} | "
          f"{'req/s ours/peer':>15} {'p50 ours/peer':>13}")
    for c, op50, oqps, pp50, pqps in rows:
        print(f"{c:>4} | {oqps:>10.1f} {op50:>6.2f} ms | {pqps:>14.1f} {pp50:>6.2f} ms | "
              f"{oqps / pqps:>14.2f}x {op50 / pp50:>12.2f}x")


def embedding_phase(args, port: int, index: str, cpus: list[int], work: str
                    ) -> tuple[str, tuple[list, float]]:
    """The app again, its QueryEncoder given every pinned CPU (torch threads = CPUs, as the
    peer's torch uses), then infinity-emb on the same MiniLM directory (its cache copy, which
    carries the sentence-transformers layout) and the same CPUs at the same precision."""
    import torch
    from ray import serve

    from retriever.modeling.device import pick_query_dtype
    from retriever.modeling.registry import resolve_model
    from serve.app import build_app

    binary = peer_binary(Path(args.peer_venv))
    dtype = str(pick_query_dtype(torch.device("cpu"))).replace("torch.", "")  # app's queries
    serve.run(build_app({"index": index, "timeout_s": 30.0, "deployments": [
        {"name": "QueryEncoder", "ray_actor_options": {"num_cpus": len(cpus)}}]}),
        name="search", route_prefix="/", blocking=False)
    texts = sentences(args.embed_requests, args.seed + 2)
    log_path = os.path.join(work, "infinity.log")
    with infinity_server(binary, resolve_model("minilm").path, "minilm", dtype, cpus,
                         log_path) as peer_port:
        return dtype, embedding_rows((port, "/v1/embeddings"), (peer_port, "/embeddings"),
                                     texts, "minilm", args.concurrency)


ROUTER = 0  # the "router" layout: no ShardSearcher, the Router holds the shards (0 searchers)


def placed(searchers: int) -> str:
    return f"{searchers} searcher(s)" if searchers else "the Router (no searcher hop)"


def print_floor_ratios(main_rows: dict, floor: dict, floor_many: tuple | None,
                       concurrency: int) -> None:
    """The app next to Serve's floor app (an ingress answering at once), same run."""
    for (per, c), row in sorted(main_rows.items()):
        n, g, _, _, _, _, hp50, _, hqps = row
        if c == 1:
            added = hp50 - floor["empty"]
            print(f"    {n} shards in {placed(g)}: app p50 - floor p50 at c1: {added:.2f} ms "
                  f"(app {hp50:.2f} ms, floor {floor['empty']:.2f} ms; target <= 5 ms: "
                  f"{'met' if added <= 5 else 'NOT met'})")
        elif floor_many:
            ratio = hqps / floor_many[1]
            print(f"    {n} shards in {placed(g)}: app QPS / floor QPS at c{c}: {ratio:.2f} "
                  f"(app {hqps:.0f} QPS, floor {floor_many[1]:.0f} QPS, floor p50 "
                  f"{floor_many[0]:.2f} ms; target >= 0.6: {'met' if ratio >= 0.6 else 'NOT met'})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", help="embedding folder URL (default: synthetic)")
    parser.add_argument("--docs", type=int, default=20_000, help="synthetic rows")
    parser.add_argument("--dim", type=int, default=384, help="synthetic dimension")
    parser.add_argument("--requests", type=int, default=600, help="requests per measurement")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--shard-counts", default="1,2,4,8")
    parser.add_argument("--main-shards", type=int, default=4,
                        help="shard count of the concurrency 1 vs 16 comparison")
    parser.add_argument("--layouts", default="1,all,router",
                        help="shards per searcher to measure: numbers, 'all' and/or 'router' "
                             "(shards_in_router: the Router searches every shard itself)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", help="CPUs for everything here, the app and the peer alike "
                                       "(\"0,1\", \"0-3\"; default: all this process may use)")
    parser.add_argument("--peer", default="infinity", choices=["infinity", "none"],
                        help="the embedding endpoint's peer (infinity-emb), or none")
    parser.add_argument("--peer-venv", default=str(PEER_VENV),
                        help="infinity-emb's own venv (made by scripts/setup-infinity.sh)")
    parser.add_argument("--embed-requests", type=int, default=300,
                        help="requests per embedding measurement")
    args = parser.parse_args(argv)
    cpus = pin_cpus(args.cpus)
    counts = sorted({int(c) for c in args.shard_counts.split(",")} | {args.main_shards})

    def layouts(n: int) -> list[int]:  # shards per searcher, each at most once
        named = {"all": n, "router": ROUTER}
        items = [item.strip() for item in args.layouts.split(",")]
        chosen = [named[item] if item in named else int(item) for item in items]
        return sorted({min(p, n) for p in chosen})

    import faiss
    import ray
    from ray import serve

    from serve.app import build_app

    faiss.omp_set_num_threads(1)  # what a ShardSearcher replica with < 2 CPUs uses
    work = tempfile.mkdtemp(prefix="search-latency-")
    folder = args.embeddings
    if not folder:
        folder = os.path.join(work, "embeddings")
        synthetic(folder, args.docs, args.dim, args.seed)
    manifest = embeddings.read_manifest(folder)
    queries = query_vectors(folder, args.requests, args.seed + 1)
    bodies = [json.dumps({"vector": q.tolist(), "top_k": args.top_k}).encode() for q in queries]
    indexes = {}
    for n in counts:
        indexes[n] = os.path.join(work, f"flat-{n}")
        sh.build(folder, indexes[n], n, sh.IndexSpec("flat"))
    print(f"{manifest['rows']} docs x {manifest['dim']} dims, flat shards, top_k {args.top_k}, "
          f"{args.requests} requests per measurement, CPUs {cpus} of {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (a shared machine: other work runs too)")

    from serve.app import LOW_LATENCY_ENV

    from retriever.ops import local_ray

    os.environ.update(LOW_LATENCY_ENV)  # as `retriever serve` does for a local cluster
    local_ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                   include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    main_rows: dict[tuple[int, int], tuple] = {}
    floor: dict[str, float] = {}
    floor_many: tuple[float, float] | None = None  # (p50, QPS) at the main concurrency
    router_took: dict[int, float] = {}
    embedding: tuple[list, float] | None = None
    dtype = "auto"
    try:
        serve.run(floor_app(), name="floor", route_prefix="/floor", blocking=False)
        for n, per in [(n, per) for n in counts for per in layouts(n)]:
            placement = ({"shards_in_router": True} if per == ROUTER
                         else {"shards_per_searcher": per})
            serve.run(build_app({"index": indexes[n], "timeout_s": 30.0, **placement}),
                      name="search",
                      route_prefix="/", blocking=False)
            loaded = sh.load_all(indexes[n], gpu="no")
            over_http(port, bodies[:50], 4)  # warm up connections, handles, replicas
            in_process(loaded, queries[:50], args.top_k, 1)
            main = n == args.main_shards
            for c in [1, args.concurrency] if main else [1]:
                if c == 1:
                    with_floor = main and not floor
                    if with_floor:
                        for name in ("hop", "body"):
                            over_http_path(port, f"/floor/{name}", 30)  # warm up
                    lat = paired(loaded, port, queries, bodies, args.top_k, with_floor)
                    local_lat, http_lat = lat["local"], lat["http"]
                    local_qps, http_qps = 1 / np.mean(local_lat), 1 / np.mean(http_lat)
                    if with_floor:
                        floor = {name: percentiles(lat[name])[0]
                                 for name in ("empty", "hop", "body")}
                    if main:
                        router_took[per] = percentiles(lat["took"])[0]
                else:
                    local_lat, local_qps = in_process(loaded, queries, args.top_k, c)
                    http_lat, http_qps = over_http(port, bodies, c)
                    if floor_many is None:  # Serve's floor at this concurrency, right after
                        lat_floor, qps_floor = over_http(port, [b"{}"] * len(bodies), c,
                                                         path="/floor/empty")
                        floor_many = (percentiles(lat_floor)[0], qps_floor)
                lp50, lp99 = percentiles(local_lat)
                hp50, hp99 = percentiles(http_lat)
                row = (n, -(-n // per) if per != ROUTER else 0, c, lp50, lp99, local_qps, hp50, hp99, http_qps)
                rows.append(row)
                if main:
                    main_rows[per, c] = row
        if args.peer == "infinity":
            dtype, embedding = embedding_phase(args, port, indexes[args.main_shards], cpus,
                                               work)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'shards':>6} {'searchers':>9} {'conc':>4} | {'in-process p50':>14} {'p99':>8} "
          f"{'QPS':>8} | {'HTTP p50':>9} {'p99':>8} {'QPS':>7} | {'added p50':>9} {'ratio':>6}")
    for n, g, c, lp50, lp99, lqps, hp50, hp99, hqps in rows:
        print(f"{n:>6} {g:>9} {c:>4} | {lp50:>11.2f} ms {lp99:>5.2f} ms {lqps:>8.0f} | "
              f"{hp50:>6.2f} ms {hp99:>5.2f} ms {hqps:>7.0f} | {hp50 - lp50:>6.2f} ms "
              f"{hp50 / lp50:>5.1f}x")
    print()
    for (per, c), row in sorted(main_rows.items()):
        if c != 1:
            continue
        n, g, _, lp50, _, _, hp50, _, _ = row
        added = hp50 - lp50
        verdict = ("meets the goal" if added <= GOAL_MS else
                   "meets the bar, not the goal" if added <= BAR_MS else "MISSES the bar")
        print(f"added p50 through HTTP at {n} shards in {placed(g)}, concurrency 1: "
              f"{added:.2f} ms (HTTP {hp50:.2f} ms vs in-process {lp50:.2f} ms, "
              f"{hp50 / lp50:.1f}x; of it the Router's took_ms: parse, searcher calls, merge "
              f"{router_took[per]:.2f} ms); bar <= {BAR_MS:g} ms, goal <= {GOAL_MS:g} ms: "
              f"{verdict}")
        if (per, args.concurrency) in main_rows:
            lqps, hqps = main_rows[per, args.concurrency][5], main_rows[per, args.concurrency][8]
            print(f"    throughput at concurrency {args.concurrency}: HTTP {hqps:.0f} QPS vs "
                  f"in-process {lqps:.0f} QPS ({hqps / lqps:.2f}x)")
    if floor:
        print(f"Ray Serve's floor here, same run: an ingress answering at once p50 "
              f"{floor['empty']:.2f} ms; after one handle call p50 {floor['hop']:.2f} ms; "
              f"after reading the search body the ordinary way (a call back to the proxy, "
              f"which the app's Router skips) p50 {floor['body']:.2f} ms")
        print_floor_ratios(main_rows, floor, floor_many, args.concurrency)
    if embedding:
        print_embedding_rows(*embedding, dtype, cpus, args.embed_requests)
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
