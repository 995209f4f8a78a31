"""The encode job's read side at scale: byte-range pieces, duplicate ids found by hash buckets,
and read tasks on every node of a real 2-node cluster (also when one is killed mid-run).

Unit tests read in this process (``corpus.iter_shards``: the same plan without Ray); the job
tests share ONE local 2-node cluster (``retriever.ops.cluster``, one CPU a node) and run the
job as a user does (``python -m jobs.encode`` with ``RAY_ADDRESS`` at the head), with a tiny
random BERT (mechanics, not quality).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retriever.io import embeddings
from retriever.io.corpus import iter_shards, plan_corpus, plan_pieces
from retriever.io.formats import DataFormatError
from tests.helpers import REPO


def _doc(i: int, text: str = "") -> bytes:
    return json.dumps({"_id": f"d{i}", "text": text or f"words of doc {i} " * (1 + i % 7)}).encode()


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ---------------------------------------------------------------------------- in process

def test_byte_ranges_give_every_row_once_with_absolute_line_numbers(tmp_path):
    lines = []
    for i in range(400):
        lines.append(_doc(i))
        if i % 50 == 7:
            lines.append(b"   ")  # blank lines count as lines, not rows
    bad_line = 301
    lines.insert(bad_line - 1, b'{"_id": "broken", "text": ')
    path = _jsonl(tmp_path / "big.jsonl", lines)
    whole = [(s.index, s.doc_ids) for s in iter_shards([str(path)], 25, "skip")]
    for read_bytes in (97, 1000, 4096):
        assert len(plan_pieces([str(path)], read_bytes)) > 1
        shards = list(iter_shards([str(path)], 25, "skip", read_bytes=read_bytes))
        ids = [d for s in shards for d in s.doc_ids]
        assert ids == [f"d{i}" for i in range(400)]  # every row once, in file order
        assert sum(s.input_rows for s in shards) == 401
        examples = [e for s in shards for e in s.examples]
        assert examples == [f"{path}, line {bad_line}: bad JSON (Expecting value at column 27)"]
        with pytest.raises(DataFormatError, match=f"big.jsonl, line {bad_line}: bad JSON"):
            list(iter_shards([str(path)], 25, read_bytes=read_bytes))
        again = [(s.index, s.doc_ids) for s in iter_shards([str(path)], 25, "skip",
                                                           read_bytes=read_bytes)]
        assert again == [(s.index, s.doc_ids) for s in shards]  # the plan is deterministic
    assert len(whole) == 17  # one piece: 401 rows in shards of 25


def test_duplicates_across_files_and_ranges_in_process(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [_doc(i) for i in range(60)])
    b = _jsonl(tmp_path / "b.jsonl", [_doc(100), _doc(200), _doc(17, "a later copy"),
                                      _doc(201), _doc(40, "again")])
    files = [str(a), str(b)]
    with pytest.raises(DataFormatError) as info:
        list(iter_shards(files, 10, read_bytes=200))
    assert str(info.value) == (f"{b}, line 3: duplicate id 'd17' (first at {a}, line 18)")
    shards = list(iter_shards(files, 10, "skip", read_bytes=200))
    ids = [d for s in shards for d in s.doc_ids]
    assert len(ids) == len(set(ids)) == 63 and ids[:60] == [f"d{i}" for i in range(60)]
    assert sum(s.skipped.get("duplicate_id", 0) for s in shards) == 2
    plan = plan_corpus(files, 10, "skip", read_bytes=200)
    assert plan.duplicate_count == 2 and len(plan.pieces) > 2


# ---------------------------------------------------------------------------- 2-node cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local 2-node cluster (head + worker_0, one CPU each) for the module's jobs."""
    from retriever.ops import cluster as lc

    state = tmp_path_factory.mktemp("cluster") / "state.json"
    running = lc.up(lc.LocalClusterConfig(workers=1, head_cpus=1, worker_cpus=1,
                                          object_store_memory=150 * 2**20,
                                          state_path=str(state), timeout_s=240))
    try:
        yield running
    finally:
        lc.down(str(state), grace_s=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from tests.train_fixtures import tiny_bert

    return str(tiny_bert(tmp_path_factory.mktemp("model") / "tiny-bert"))


def _encode(cluster, corpus: Path, out: Path, model: str,
            *flags: str) -> subprocess.CompletedProcess:
    """``python -m jobs.encode`` against the cluster, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS=cluster.gcs_address, RAY_AUTH_MODE=cluster.auth,
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "jobs.encode", "--corpus", str(corpus), "--out", str(out),
            "--model", model, "--passage-max-length", "16", "--docs-per-shard", "20",
            "--actors", "2", *flags]
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def _two_files(folder: Path, n: int = 400) -> tuple[Path, list[str]]:
    """Two JSONL files of ``n / 2`` docs each; the second repeats d5 as its last line."""
    half = n // 2
    _jsonl(folder / "part-0.jsonl", [_doc(i) for i in range(half)])
    _jsonl(folder / "part-1.jsonl", [_doc(i) for i in range(half, n)] + [_doc(5, "copy")])
    return folder, [f"d{i}" for i in range(n)]


def test_duplicates_across_read_tasks_on_both_nodes(cluster, model, tmp_path):
    corpus, ids = _two_files(tmp_path / "corpus")
    refused = _encode(cluster, corpus, tmp_path / "refused", model, "--read-bytes", "4096")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"{corpus}/part-1.jsonl, line 201: duplicate id 'd5' (first at "
            f"{corpus}/part-0.jsonl, line 6)") in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "refused" / "manifest.json").exists()

    out = tmp_path / "emb"
    done = _encode(cluster, corpus, out, model, "--read-bytes", "4096", "--on-bad-input",
                   "skip")
    assert done.returncode == 0, done.stderr[-3000:]
    written, _ = embeddings.load(str(out), verify=True)
    assert sorted(written) == sorted(ids)  # every id exactly once
    manifest = embeddings.read_manifest(str(out))
    assert manifest["skipped"] == {"duplicate_id": 1}
    read = manifest["encode"]["read"]
    assert read["pieces"] > 4 and read["duplicate_ids"] == 1
    assert len(read["read_nodes"]) == 2 and len(read["scan_nodes"]) == 2  # both nodes read
    assert not (out / "_scan").exists()


class ReadTaskKiller(threading.Thread):
    """SIGKILLs the first Ray worker OF THIS CLUSTER seen running a read task (its process
    title names ``ReadCorpusShards``); other Rays on the machine are left alone. Polls the
    raylets' children every millisecond: a read task of a small piece lives ~0.1 s."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.killed, self.stop = cluster, [], threading.Event()

    def run(self) -> None:
        import psutil

        from retriever.ops import cluster as lc

        ours = lc._stragglers(self.cluster.temp_dir, self.cluster.ports.get("gcs"))
        raylets = [p for p in ours if psutil.Process(p).name() == "raylet"]
        while not self.stop.is_set() and not self.killed:
            for pid in self._workers(raylets):  # a raylet's children: its Ray workers
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if title.startswith(b"ray::") and b"ReadCorpusShards" in title:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    return
            time.sleep(0.001)

    @staticmethod
    def _workers(raylets: list[int]) -> list[int]:
        pids = []
        for raylet in raylets:
            for task in Path(f"/proc/{raylet}/task").glob("*/children"):
                try:
                    pids += [int(p) for p in task.read_text().split()]
                except OSError:
                    continue
        return pids


def test_every_id_once_after_an_interrupted_run_and_a_killed_read_task(cluster, model,
                                                                       tmp_path):
    corpus, ids = _two_files(tmp_path / "corpus", 1200)
    out = tmp_path / "emb"
    flags = ("--read-bytes", "4096", "--on-bad-input", "skip")
    first = _encode(cluster, corpus, out, model, *flags, "--max-shards", "4")
    assert first.returncode == 0 and "INCOMPLETE" in first.stdout, first.stderr[-3000:]
    assert len(list(out.glob("part-*.json"))) == 4

    killer = ReadTaskKiller(cluster)
    killer.start()
    try:
        second = _encode(cluster, corpus, out, model, *flags)
    finally:
        killer.stop.set()
        killer.join(5)
    assert killer.killed, "no read task was found running to kill"
    assert second.returncode == 0, second.stderr[-3000:]
    shards = plan_corpus([str(corpus / "part-0.jsonl"), str(corpus / "part-1.jsonl")], 20,
                         "skip", 4096).shards
    assert "4 already done" in second.stdout
    assert f"complete: 1200 embeddings in {shards} shards" in second.stdout
    written, vectors = embeddings.load(str(out), verify=True)
    assert len(written) == len(set(written)) == len(ids) and set(written) == set(ids)
    assert vectors.shape[0] == len(ids)
