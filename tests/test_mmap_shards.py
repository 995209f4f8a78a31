"""Memory-mapped shards (issue 11): ``IndexShard.load(..., mmap=True)`` answers exactly like a
shard read into memory, holds a small part of the shard's bytes, is served under a memory
limit of half its bytes (where a memory cgroup can be made), and maps a remote shard from
a local cache copy named by its sha256 (retriever/index/shards.py). Id maps
(retriever/index/idmap.py) answer like lists of ids; mapped, they hold no anonymous memory, and
their cache copies are checked and made again when corrupt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from jobs.cli import main
from retriever.errors import InputError
from retriever.index import idmap
from retriever.index import shards as sh
from retriever.index.exact import search_index
from retriever.io import store, synthetic
from tests.helpers import REPO
from tests import memory_cgroup
from tests.index_fixtures import write_embeddings

DIM = 128


def embed(folder, rows, centres, seed=0):
    vectors = synthetic.clustered_vectors(rows, dim=DIM, centres=centres, seed=seed)
    write_embeddings(str(folder), [f"d{i:06d}" for i in range(rows)], vectors,
                     {"model": "synthetic"}, rows_per_part=50_000)
    return vectors


@pytest.fixture(autouse=True)
def shard_cache(tmp_path, monkeypatch):
    """Local mapped loads copy id maps into the shard cache: a throw-away one here."""
    monkeypatch.setenv("RETRIEVER_SHARD_CACHE", str(tmp_path / "shard-cache"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Every type, 2 shards of 3,000 clustered vectors."""
    root = tmp_path_factory.mktemp("mmap-small")
    embed(root / "emb", 6000, centres=100)
    return root


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw", "sq8", "binary"])
def test_mmap_shards_answer_like_shards_in_memory(small, kind):
    out = str(small / kind)
    spec = sh.IndexSpec(kind, hnsw_m=16, pq_nbits=4)  # 4-bit PQ: a quick training
    sh.build(str(small / "emb"), out, 2, spec, recall_queries=100)
    queries = synthetic.clustered_queries(50, dim=DIM, centres=100)
    in_memory = sh.load_all(out, gpu="no")
    mapped = sh.load_all(out, mmap=True)
    assert [s.search_params for s in mapped] == [s.search_params for s in in_memory]
    assert sh.search_all(mapped, queries, 20) == sh.search_all(in_memory, queries, 20)


RSS_PROBE = r"""
import json, sys
import numpy as np
import psutil
from retriever.index import idmap
from retriever.index import shards as sh
from retriever.index.exact import search_index

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

process = psutil.Process()
folder, mmap = sys.argv[1], sys.argv[2] == "mmap"
manifest = sh.read_manifest(folder)
queries = np.asarray(json.loads(sys.argv[3]), dtype=np.float32)
ids = sh._read_ids(sh.store.join(folder, manifest["shards"][0]["ids"]))  # not the shard's bytes
rss, anon = process.memory_info().rss, anon_kb()
index = sh.read_index(sh.store.join(folder, manifest["shards"][0]["index"]), mmap=mmap)
loaded = process.memory_info().rss - rss
shard = sh.IndexShard(index, ids, manifest["type"], search_params=manifest["search_params"])
hits = shard.search(queries, 10)
print(json.dumps({"load": loaded, "search_anon": (anon_kb() - anon) * 1024,
                  "hits": hits}))
"""


def rss_growth(folder: str, mmap: bool, queries) -> dict:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, folder, "mmap" if mmap else "read",
                           json.dumps(queries.tolist())], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


BIG_KINDS = {"flat": [], "ivfpq": ["--nlist", "64", "--pq-m", "16", "--pq-nbits", "4",
                                    "--refine", "Flat"]}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """One shard of ~51-54 MB per kind in BIG_KINDS, over the same 100,000 vectors."""
    root = tmp_path_factory.mktemp("mmap-big")
    embed(root / "emb", 100_000, centres=2000)
    for kind, extra in BIG_KINDS.items():
        assert main(["index", "--embeddings", str(root / "emb"), "--type", kind,
                     "--recall-queries", "0", "--train-sample", "5000",
                     "--out", str(root / kind), *extra]) == 0
    return root


@pytest.mark.parametrize("kind", BIG_KINDS)
def test_a_mapped_shard_holds_a_small_part_of_its_bytes(big, kind):
    out = str(big / kind)
    size = os.path.getsize(os.path.join(out, "shard-00000.faiss"))
    queries = synthetic.clustered_queries(20, dim=DIM, centres=2000)
    read, mapped = rss_growth(out, False, queries), rss_growth(out, True, queries)
    print(f"{kind} shard {size / 1e6:.1f} MB: RSS growth on load {read['load'] / 1e6:.1f} MB "
          f"read, {mapped['load'] / 1e6:.1f} MB mapped; anonymous memory after 20 queries "
          f"{read['search_anon'] / 1e6:.1f} vs {mapped['search_anon'] / 1e6:.1f} MB")
    assert size > 50e6
    assert read["load"] > 0.8 * size  # the measurement sees a shard read into memory
    assert mapped["load"] < 0.2 * size  # (a few MB: headers, page-fault read-around)
    assert mapped["search_anon"] < 0.1 * size  # touched pages are page cache, not the heap
    assert mapped["hits"] == read["hits"]


LIMITED_PROBE = r"""
import json, sys
from pathlib import Path
import numpy as np
from retriever.index import shards as sh
from tests import memory_cgroup

folder, mmap, cgroup, limit = sys.argv[1], sys.argv[2] == "mmap", sys.argv[3], int(sys.argv[4])
queries = np.asarray(json.loads(sys.argv[5]), dtype=np.float32)
warm = sh.IndexShard.load(folder, 0, gpu="no", mmap=True)  # the lazy imports, first calls
warm.search(queries[:1], 10)
del warm
memory_cgroup.drop_cached_pages([Path(folder)])  # read anew, under the limit
memory_cgroup.join(cgroup, limit)  # from here on the shard is what the limit holds
shard = sh.IndexShard.load(folder, 0, gpu="no", mmap=mmap)
hits = [shard.search(query[None], 10)[0] for query in queries]
print(json.dumps({"hits": hits, "peak": memory_cgroup.peak(cgroup)}))
"""


@pytest.mark.skipif(memory_cgroup.writable_root() is None,
                    reason="needs root and a memory cgroup controller")
@pytest.mark.parametrize("kind", BIG_KINDS)
def test_a_mapped_shard_is_served_in_half_its_bytes(big, kind):
    """Under a memory limit of half the shard's bytes (a cgroup charging every page the
    process allocates, reads or maps after its imports) a mapped shard answers as one read
    into memory; the read one is killed by the limit."""
    out = str(big / kind)
    size = os.path.getsize(os.path.join(out, "shard-00000.faiss"))
    queries = synthetic.clustered_queries(20, dim=DIM, centres=2000, seed=1)
    expected = [row[0] for row in [sh.IndexShard.load(out, 0, gpu="no").search(q[None], 10)
                                   for q in queries]]
    outcome = {}
    for mmap in (True, False):
        with memory_cgroup.limited_cgroup(f"retriever-test-{kind}") as cgroup:
            proc = subprocess.run([sys.executable, "-c", LIMITED_PROBE, out,
                                   "mmap" if mmap else "read", cgroup, str(size // 2),
                                   json.dumps(queries.tolist())],
                                  capture_output=True, text=True, cwd=REPO, timeout=300)
        outcome[mmap] = json.loads(proc.stdout) if proc.returncode == 0 else proc.returncode
    assert outcome[False] == -9, outcome[False]  # killed: the limit holds a read shard out
    assert outcome[True]["peak"] <= size // 2
    got = outcome[True]["hits"]
    # The same hits; scores to float32 rounding (this process and the child may sum in a
    # different SIMD order: one CI run differed in the 7th digit).
    assert [[doc for doc, _ in row] for row in got] == [[doc for doc, _ in row] for row in expected]
    assert np.allclose([s for row in got for _, s in row], [s for row in expected for _, s in row],
                       rtol=0, atol=1e-5)


def test_a_remote_shard_is_mapped_from_a_verified_cache_copy(tmp_path):
    vectors = embed(tmp_path / "emb", 2000, centres=50)
    remote = "memory://mmap-test/index"
    sh.build(str(tmp_path / "emb"), remote, 2, sh.IndexSpec("sq8"), recall_queries=50)
    manifest = sh.read_manifest(remote)
    cache = str(tmp_path / "cache")
    mapped = sh.load_all(remote, mmap=True, cache_dir=cache)
    assert sorted(os.listdir(cache)) == sorted(
        [f"{s['sha256']}.faiss" for s in manifest["shards"]]
        + [f"{s['ids_sha256']}.ids.arrow" for s in manifest["shards"]])
    in_memory = sh.load_all(remote)
    assert sh.search_all(mapped, vectors[:30], 10) == sh.search_all(in_memory, vectors[:30], 10)
    # the copy is reused: the remote shard file is not read again
    fs, path = store.filesystem(store.join(remote, manifest["shards"][0]["index"]))
    fs.rm_file(path)
    again = sh.IndexShard.load(remote, 0, manifest, mmap=True, cache_dir=cache)
    assert again.search(vectors[:5], 10) == mapped[0].search(vectors[:5], 10)
    # a remote file that is not the one the manifest names never enters the cache
    fs.pipe_file(path, b"not a shard")
    with pytest.raises(InputError, match="sha256 does not match the index manifest"):
        sh.IndexShard.load(remote, 0, manifest, mmap=True, cache_dir=str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == []


# --------------------------------------------------------------------------- id maps

def test_an_id_map_answers_like_a_list_of_ids(tmp_path):
    """search_index over an IdMap (in memory and mapped) = over the list of the same ids,
    ties broken by doc id and FAISS' -1 padding (nprobe 1 finds fewer than k) included."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors[2000:2010] = vectors[5]  # ties at the top of query 0
    ids = [f"doc-{(i * 7919) % 3000:05d}" for i in range(3000)]  # not sorted by row
    queries = np.vstack([vectors[5], rng.standard_normal((29, 16))]).astype(np.float32)
    ivf = sh.new_index("IVF64,Flat", 16)
    ivf.train(vectors)
    ivf.add(vectors)
    ivf.nprobe = 1
    mapped = idmap.write_mapped(idmap.IdMap.of(ids), str(tmp_path / "ids.arrow"), "x" * 64)
    flat = sh.new_index("Flat", 16)
    flat.add(vectors)
    for index in (ivf, flat):
        expected = search_index(index, ids, queries, 100)
        assert search_index(index, idmap.IdMap.of(ids), queries, 100) == expected
        assert search_index(index, mapped, queries, 100) == expected
    assert mapped.take(np.array([2, 0, 2])) == [ids[2], ids[0], ids[2]] and mapped[1] == ids[1]
    with pytest.raises(IndexError):
        mapped.take(np.array([3000]))


def test_an_id_map_that_is_not_strings_is_a_clear_error():
    with pytest.raises(InputError, match="ids.parquet: doc ids must be strings, got int64"):
        idmap.IdMap(pa.array([1, 2]), "ids.parquet")
    with pytest.raises(InputError, match="1 doc ids are null"):
        idmap.IdMap(pa.array(["a", None]))


ANON_PROBE = r"""
import json, sys
import numpy as np
from retriever.index import shards as sh

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

def load(url, sha256, cache, how, rows):
    if how == "list":  # the id map as it was held before issue 11
        ids = sh._read_ids(url, sha256).to_pylist()
        return ids, [ids[r] for r in rows.tolist()]
    ids = sh._read_ids(url, sha256) if how == "memory" else sh.cached_ids(url, sha256, cache)
    return ids, ids.take(rows)

url, sha256, warm_url, warm_sha256, cache, how = sys.argv[1:7]
load(warm_url, warm_sha256, cache, how, np.arange(10))  # imports and first-call set-up
rows = np.random.default_rng(0).integers(0, 300_000, 1000)
before = anon_kb()
ids, found = load(url, sha256, cache, how, rows)
print(json.dumps({"anon": (anon_kb() - before) * 1024, "ids": len(ids), "some": found[:3]}))
"""


def write_id_map(url: str, rows: int) -> str:
    store.write_parquet(pa.table({"doc_id": [f"doc-{i:012d}" for i in range(rows)]}), url)
    return sh.embeddings.sha256_of(url)


def anon_growth(folder, how: str) -> dict:
    """RssAnon growth of a fresh process loading the 300k-id map at ``folder`` (``list``: as a
    list of str, ``memory``: an in-memory IdMap, ``mmap``: mapped from the cache copy), after
    loading a 10-id one the same way (imports and first-call set-up are not the id map's)."""
    args = [str(folder / "ids.parquet"), (folder / "sha").read_text(),
            str(folder / "warm.parquet"), (folder / "warm-sha").read_text(),
            str(folder / "cache"), how]
    proc = subprocess.run([sys.executable, "-c", ANON_PROBE, *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_mapped_id_map_holds_no_anonymous_memory(tmp_path):
    (tmp_path / "sha").write_text(write_id_map(str(tmp_path / "ids.parquet"), 300_000))
    (tmp_path / "warm-sha").write_text(write_id_map(str(tmp_path / "warm.parquet"), 10))
    made = anon_growth(tmp_path, "mmap")  # makes the cache copy
    assert f"{(tmp_path / 'sha').read_text()}.ids.arrow" in os.listdir(tmp_path / "cache")
    mapped = anon_growth(tmp_path, "mmap")  # reuses it (content checked)
    listed = anon_growth(tmp_path, "list")
    compact = anon_growth(tmp_path, "memory")
    print(f"RssAnon growth for 300k ids: list {listed['anon'] / 2**20:.1f} MiB, "
          f"IdMap in memory {compact['anon'] / 2**20:.1f} MiB, mapped "
          f"{mapped['anon'] / 2**20:.1f} MiB (making the copy {made['anon'] / 2**20:.1f} MiB)")
    assert mapped["some"] == listed["some"] == compact["some"] == made["some"]
    assert listed["anon"] > 20 * 2**20  # the measurement sees ~70 bytes an id
    assert mapped["anon"] < 2 * 2**20
    assert compact["anon"] < listed["anon"] / 2


def _replace(path: str, data: bytes) -> None:
    """A new file under ``path`` (a new inode: rewriting a file in place under a live mapping
    would fault the loads that map it, here and in any searcher)."""
    with open(path + ".new", "wb") as handle:
        handle.write(data)
    os.replace(path + ".new", path)


def test_a_corrupt_or_foreign_id_map_copy_is_made_again(small):
    out, cache = str(small / "flat-ids"), str(small / "cache")
    sh.build(str(small / "emb"), out, 2, sh.IndexSpec("flat"))
    manifest = sh.read_manifest(out)
    queries = synthetic.clustered_queries(20, dim=DIM, centres=100)
    expected = sh.search_all(sh.load_all(out, gpu="no"), queries, 10)
    assert sh.search_all(sh.load_all(out, mmap=True, cache_dir=cache), queries, 10) == expected
    first, second = (os.path.join(cache, f"{s['ids_sha256']}.ids.arrow")
                     for s in manifest["shards"])
    pristine = open(first, "rb").read()
    assert pristine.count(b"d000123") == 1
    _replace(first, pristine.replace(b"d000123", b"d000124"))  # valid Arrow, one id changed
    assert idmap.open_mapped(first, manifest["shards"][0]["ids_sha256"]) is None
    shard = sh.IndexShard.load(out, 0, manifest, mmap=True, cache_dir=cache)
    assert open(first, "rb").read() == pristine
    _replace(first, pristine[:len(pristine) // 2])  # truncated
    sh.IndexShard.load(out, 0, manifest, mmap=True, cache_dir=cache)
    assert open(first, "rb").read() == pristine
    os.replace(second, first)  # another id map's copy under this one's name
    again = sh.load_all(out, mmap=True, cache_dir=cache)
    assert open(first, "rb").read() == pristine and os.path.exists(second)
    assert sh.search_all(again, queries, 10) == expected
    assert shard.ids.to_pylist() == again[0].ids.to_pylist()


def test_an_id_map_that_does_not_match_its_manifest_never_enters_the_cache(small):
    out, cache = str(small / "flat-changed"), str(small / "cache-changed")
    sh.build(str(small / "emb"), out, 2, sh.IndexSpec("flat"))
    manifest = sh.read_manifest(out)
    ids_url = os.path.join(out, manifest["shards"][0]["ids"])
    store.write_parquet(pa.table({"doc_id": [f"x{i}" for i in range(3000)]}), ids_url)
    with pytest.raises(InputError, match="sha256 does not match the index manifest"):
        sh.IndexShard.load(out, 0, manifest, mmap=True, cache_dir=cache)
    assert os.listdir(cache) == []


def test_a_shard_on_s3_maps_its_id_map_from_the_cache(s3_env, small):
    remote, cache = f"{s3_env}/index", str(small / "cache-s3")
    sh.build(str(small / "emb"), remote, 2, sh.IndexSpec("flat"))
    manifest = sh.read_manifest(remote)
    queries = synthetic.clustered_queries(20, dim=DIM, centres=100)
    mapped = sh.load_all(remote, mmap=True, cache_dir=cache)
    assert sorted(os.listdir(cache)) == sorted(
        [f"{s['sha256']}.faiss" for s in manifest["shards"]]
        + [f"{s['ids_sha256']}.ids.arrow" for s in manifest["shards"]])
    assert sh.search_all(mapped, queries, 10) == sh.search_all(sh.load_all(remote), queries, 10)
