"""Memory-mapped shards (issue 11): ``IndexShard.load(..., mmap=True)`` answers exactly like a
shard read into memory, holds a small part of the shard's bytes, and maps a remote shard from
a local cache copy named by its sha256 (retriever/index/shards.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.cli import main
from retriever.errors import InputError
from retriever.index import shards as sh
from retriever.io import store, synthetic
from tests.helpers import REPO
from tests.index_fixtures import write_embeddings

DIM = 128


def embed(folder, rows, centres, seed=0):
    vectors = synthetic.clustered_vectors(rows, dim=DIM, centres=centres, seed=seed)
    write_embeddings(str(folder), [f"d{i:06d}" for i in range(rows)], vectors,
                     {"model": "synthetic"}, rows_per_part=50_000)
    return vectors


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
from retriever.index import shards as sh

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


@pytest.mark.parametrize("kind, extra", [("flat", []),
                                         ("ivfpq", ["--nlist", "64", "--pq-m", "16",
                                                    "--pq-nbits", "4", "--refine", "Flat"])])
def test_a_mapped_shard_holds_a_small_part_of_its_bytes(tmp_path, kind, extra):
    embed(tmp_path / "emb", 100_000, centres=2000)  # one shard of ~51-54 MB
    out = str(tmp_path / kind)
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--type", kind,
                 "--recall-queries", "0", "--train-sample", "5000", "--out", out,
                 *extra]) == 0
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


def test_a_remote_shard_is_mapped_from_a_verified_cache_copy(tmp_path):
    vectors = embed(tmp_path / "emb", 2000, centres=50)
    remote = "memory://mmap-test/index"
    sh.build(str(tmp_path / "emb"), remote, 2, sh.IndexSpec("sq8"), recall_queries=50)
    manifest = sh.read_manifest(remote)
    cache = str(tmp_path / "cache")
    mapped = sh.load_all(remote, mmap=True, cache_dir=cache)
    assert sorted(os.listdir(cache)) == sorted(f"{s['sha256']}.faiss"
                                               for s in manifest["shards"])
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
