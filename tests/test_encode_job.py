"""The encode job (Ray Data) end to end: equality with the in-process Encoder, every doc id
exactly once on SciFact (also with an encoder actor killed mid-run, and across an
interrupted run and its re-run), S3 and the local default store, and the bad-input policy.

The id-completeness runs encode the real SciFact corpus (5,183 docs) with MiniLM truncated
to 32 tokens: which ids come out does not depend on the length, and it keeps this file within
a few minutes on 2 cores. Equality is checked at the default 256 tokens on a slice.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retriever.io import embeddings, store
from retriever.io.corpus import CorpusSource, iter_shards
from retriever.io.formats import DataFormatError, load_corpus
from retriever.pipelines.encode import AUX_CPUS, EncodeOptions, plan_resources
from retriever.modeling.encoder import EncoderConfig
from retriever.errors import InputError
from tests.helpers import REPO, dataset

SCIFACT_DOCS = 5183
SHORT = {"passage_max_length": 32}  # for id-completeness runs (see the module docstring)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray (2 CPUs, dashboard on loopback for the state API)."""
    import ray

    ray.shutdown()
    context = ray.init(address="local", num_cpus=2, include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=_free_port(),
                       object_store_memory=512 * 2**20, log_to_driver=False)
    yield f"http://{context.dashboard_url}"  # state API address (other Rays may run here)
    ray.shutdown()


def _encode(corpus, out, **overrides):
    from jobs.encode import EncodeConfig, run
    from retriever import config as cfg

    return run(cfg.build(EncodeConfig, {"corpus": str(corpus), "out": str(out), **overrides}))


def _scifact():
    return load_corpus(str(Path(dataset("scifact")) / "corpus.jsonl.gz"))


def _write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _docs(corpus, n):
    return [{"_id": corpus.ids[i], "title": corpus.titles[i], "text": corpus.texts[i]}
            for i in range(n)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _records(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("part-*.json"))


def _assert_every_id_once(folder, expected_ids):
    ids, vectors = embeddings.load(str(folder), verify=True)
    assert len(ids) == len(set(ids)) == len(expected_ids)
    assert set(ids) == set(expected_ids)
    assert vectors.shape == (len(expected_ids), 384) and np.isfinite(vectors).all()
    return ids, vectors


# ---------------------------------------------------------------------------- equality

def test_job_embeddings_equal_in_process_encoder(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retriever.modeling.encoder import Encoder

    corpus = _scifact().subset(range(150))
    corpus.ids.append("short-1"), corpus.titles.append(""), corpus.texts.append("a b")
    source = tmp_path / "slice.parquet"  # the parquet reader; S3 below covers BEIR jsonl.gz
    pq.write_table(pa.table({"_id": corpus.ids, "title": corpus.titles,
                             "text": corpus.texts}), source)
    result = _encode(source, tmp_path / "emb", docs_per_shard=60, actors=1)
    assert result.complete and result.shards_encoded == 3 and result.docs == len(corpus)

    ids, vectors = embeddings.load(str(tmp_path / "emb"), verify=True)
    assert ids == corpus.ids  # shard order = corpus order
    same = Encoder(EncoderConfig(model="minilm"))  # the job's defaults, in process
    fp32 = Encoder(EncoderConfig(model="minilm", dtype="float32"))
    assert _cosines(vectors, same.encode_passages(corpus.passages())).min() >= 0.9999
    assert _cosines(vectors, fp32.encode_passages(corpus.passages())).min() >= 0.9999

    manifest = embeddings.read_manifest(str(tmp_path / "emb"))
    assert manifest["encoder"] == same.settings()  # model id + hash, pooling, prefixes, ...
    assert manifest["dtype"] == "float16" and manifest["dim"] == 384
    assert manifest["rows"] == len(corpus) and len(manifest["parts"]) == 3
    for part in manifest["parts"]:
        assert embeddings.sha256_of(str(tmp_path / "emb" / part["file"])) == part["sha256"]
    assert manifest["code_version"] and manifest["created"]
    assert manifest["source"]["input_rows"] == len(corpus)
    assert 0 <= manifest["encode"]["padding_fraction"] < 0.5
    table = pq.read_table(tmp_path / "emb" / "part-00000.parquet")
    assert table.schema.field("doc_id").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 384)


# ---------------------------------------------------------------------------- SciFact ids

def _encoder_actors(address: str):
    from ray.util.state import list_actors

    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                   detail=True, limit=1000)
            if "EncodeShards" in (a.repr_name or "")]


def test_scifact_every_id_once_with_an_actor_killed_mid_run(ray_local, tmp_path):
    out = tmp_path / "emb"
    killed: dict = {}
    errors: list = []

    def killer():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = _records(out) if out.exists() else []
            if done:  # at least one shard written: the actors are at work on the others
                try:
                    actors = _encoder_actors(ray_local)
                except Exception as err:  # noqa: BLE001 -- the state API may lag; retry
                    errors.append(repr(err))
                    actors = []
                for actor in actors:
                    try:
                        os.kill(actor.pid, signal.SIGKILL)
                    except ProcessLookupError:  # gone meanwhile (pool scaled down)
                        continue
                    killed.update(pid=actor.pid, actor_id=actor.actor_id,
                                  records_before=len(done))
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = _encode(dataset("scifact"), out, docs_per_shard=250, actors=2, **SHORT)
    thread.join(timeout=5)

    assert killed, f"no encoder actor was found to kill ({errors[-3:]})"
    assert killed["records_before"] < 21  # killed while shards were still to do
    assert result.complete and result.shards_total == 21
    _assert_every_id_once(out, _scifact().ids)
    assert embeddings.read_manifest(str(out))["rows"] == SCIFACT_DOCS
    from ray.util.state import get_actor

    restarted = get_actor(killed["actor_id"], address=ray_local)
    assert restarted.num_restarts >= 1 and restarted.pid != killed["pid"]


def test_interrupted_run_resumes_skipping_finished_shards(ray_local, tmp_path):
    """On Cranfield (1398 documents, 6 shards of 250): the test above covers SciFact."""
    out, corpus = tmp_path / "emb", dataset("cranfield")
    ids = load_corpus(str(Path(corpus) / "corpus.jsonl.gz")).ids
    first = _encode(corpus, out, docs_per_shard=250, max_shards=2, **SHORT)
    assert not first.complete and first.shards_encoded == 2
    assert not (out / "manifest.json").exists()  # incomplete: no manifest
    with pytest.raises(InputError, match="no manifest.json"):
        embeddings.read_manifest(str(out))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert sorted(kept) == [f"part-0000{i}.{ext}" for i in range(2) for ext in ("json",
                                                                                 "parquet")]

    second = _encode(corpus, out, docs_per_shard=250, **SHORT)
    assert second.complete and second.shards_reused == 2 and second.shards_encoded == 4
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # not rewritten
    _assert_every_id_once(out, ids)
    manifest = embeddings.read_manifest(str(out))
    assert manifest["rows"] == len(ids) == 1398 and len(manifest["parts"]) == 6

    third = _encode(corpus, out, docs_per_shard=250, **SHORT)  # idempotent
    assert third.complete and third.shards_encoded == 0 and third.shards_reused == 6
    assert embeddings.read_manifest(str(out))["parts"] == manifest["parts"]


# ---------------------------------------------------------------------------- stores

@pytest.mark.s3
def test_s3_end_to_end_through_the_command_line(s3_env, tmp_path):
    from retriever.modeling.encoder import Encoder

    corpus = _scifact().subset(range(120))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in _docs(corpus, 120)).encode())
    folder = f"{s3_env}/scifact-slice"
    store.write_bytes(f"{folder}/corpus.jsonl.gz", buffer.getvalue())
    out = f"{s3_env}/embeddings/slice/minilm"

    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local Ray; AWS_* from s3_env
    proc = subprocess.run([sys.executable, "-m", "jobs.encode", "--corpus", folder, "--out", out,
                           "--docs-per-shard", "50", "--actors", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "docs/s" in proc.stdout and "complete: 120 embeddings in 3 shards" in proc.stdout

    ids, vectors = embeddings.load(out, verify=True)
    assert ids == corpus.ids
    reference = Encoder(EncoderConfig(model="minilm")).encode_passages(corpus.passages())
    assert _cosines(vectors, reference).min() >= 0.9999
    manifest = embeddings.read_manifest(out)
    assert manifest["source"]["url"] == folder
    assert manifest["source"]["files"] == [f"{folder}/corpus.jsonl.gz"]
    assert store.exists(f"{out}/part-00002.json")


def test_local_default_store_via_retriever_command(ray_local, tmp_path, monkeypatch, capsys):
    from jobs.cli import main

    corpus = _scifact()
    _write_jsonl(tmp_path / "data" / "tiny" / "corpus.jsonl.gz", _docs(corpus, 80), gz=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RETRIEVER_STORE", raising=False)
    assert main(["encode", "--corpus", "data/tiny", "--docs-per-shard", "40",
                 "--passage-max-length", "32", "--actors", "1"]) == 0
    out = tmp_path / ".retriever" / "embeddings" / "tiny" / "minilm"
    ids, _ = _assert_every_id_once(out, corpus.ids[:80])
    assert ids == corpus.ids[:80]
    printed = capsys.readouterr().out
    for word in ("docs/s", "tokens/s", "padding", "GPU util", "complete: 80 embeddings"):
        assert word in printed


# ---------------------------------------------------------------------------- bad input

BAD_LINES = [
    (b'{"_id": "d1", "text": "fine"}', None),
    (b'{"text": "no id"}', "missing_id"),
    (b'{"_id": "d3", "title": "", "text": "   "}', "empty_text"),
    (b'{"_id": "d4", "text": "caf\xe9 latin-1"}', "invalid_utf8"),
    (b'{"_id": "d1", "text": "again"}', "duplicate_id"),
    (b'{"_id": "d6"}', "missing_text"),
    (b'{"_id": "d7", "text": "broken"', "bad_json"),
    (b'{"_id": "d8", "text": "last one is fine"}', None),
]
MESSAGES = {"missing_id": "missing '_id'", "empty_text": "has empty title and text",
            "invalid_utf8": "invalid UTF-8", "duplicate_id": "duplicate id 'd1' (first at line 1)",
            "missing_text": "missing 'text'", "bad_json": "bad JSON"}


def _bad_corpus(tmp_path: Path, kind: str | None = None) -> Path:
    """Good lines plus the bad line of ``kind`` (all bad lines when None)."""
    lines = [line for line, k in BAD_LINES if k is None or kind is None or k == kind]
    path = tmp_path / f"bad-{kind or 'all'}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_reader_error_names_file_line_and_problem(tmp_path, kind):
    path = _bad_corpus(tmp_path, kind)
    with pytest.raises(DataFormatError) as info:
        list(iter_shards(CorpusSource.open(str(path)).files, docs_per_shard=2))
    assert str(info.value).startswith(f"{path}, line 2: ")
    assert MESSAGES[kind] in str(info.value) and info.value.kind == kind


def test_reader_skip_policy_counts_every_problem(tmp_path):
    shards = list(iter_shards([str(_bad_corpus(tmp_path))], docs_per_shard=3,
                              on_bad_input="skip"))
    assert [s.doc_ids for s in shards] == [["d1"], [], ["d8"]]
    counts: dict = {}
    for shard in shards:
        for k, n in shard.skipped.items():
            counts[k] = counts.get(k, 0) + n
    assert counts == {k: 1 for k in MESSAGES}
    assert [s.input_rows for s in shards] == [3, 3, 2] and shards[-1].last


def test_reader_parquet_and_damaged_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ["a", "b", "a", "c"], "title": ["T", None, None, ""],
                             "text": ["x", "y", "z", None]}), tmp_path / "part-1.parquet")
    files = CorpusSource.open(str(tmp_path)).files
    with pytest.raises(DataFormatError,
                       match=r"part-1.parquet, row 3: duplicate id 'a' \(first at row 1\)"):
        list(iter_shards(files, 10))
    shard, = iter_shards(files, 10, on_bad_input="skip")
    assert shard.doc_ids == ["a", "b"] and shard.texts == ["T x", "y"]
    assert shard.skipped == {"duplicate_id": 1, "missing_text": 1}

    good = gzip.compress(b'{"_id": "1", "text": "one"}\n' * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(DataFormatError, match="cut.jsonl.gz: cannot read past line"):
        list(iter_shards([str(tmp_path / "cut.jsonl.gz")], 10, on_bad_input="skip"))
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    with pytest.raises(DataFormatError, match="empty.jsonl: file is empty"):
        list(iter_shards([str(tmp_path / "empty.jsonl")], 10, on_bad_input="skip"))


def test_shard_plan_depends_only_on_the_corpus(tmp_path):
    files = CorpusSource.open(dataset("scifact")).files
    first = [(s.index, s.first_row, s.input_sha256, s.doc_ids) for s in iter_shards(files, 700)]
    again = [(s.index, s.first_row, s.input_sha256, s.doc_ids) for s in iter_shards(files, 700)]
    assert first == again and len(first) == 8 and first[-1][1] == 4900
    assert sum(len(s[3]) for s in first) == SCIFACT_DOCS

    # A plain copy has the same plan; an edit changes only the hash of the shard it is in.
    lines = gzip.decompress(Path(files[0]).read_bytes()).splitlines(keepends=True)
    obj = json.loads(lines[1500])
    obj["text"] += " (edited)"
    lines[1500] = (json.dumps(obj) + "\n").encode()
    edited = tmp_path / "corpus.jsonl"
    edited.write_bytes(b"".join(lines))
    hashes = [s.input_sha256 for s in iter_shards([str(edited)], 700)]
    assert [i for i, (a, b) in enumerate(zip(hashes, (f[2] for f in first))) if a != b] == [2]

    done = {0: first[0][2], 1: "stale", 3: first[3][2]}
    marked = list(iter_shards(files, 700, done=done, max_shards=2))
    assert [(s.index, s.done) for s in marked] == [(0, True), (1, False), (2, False)]
    assert marked[0].record()["texts"] == []


def test_bad_input_stops_with_the_file_and_line_and_keeps_nothing_half_done(ray_local, tmp_path,
                                                                            capsys):
    from jobs.cli import main

    corpus = _scifact()
    rows = [json.dumps(r).encode() for r in _docs(corpus, 30)]
    rows.insert(24, b'{"_id": "x", "text": "\xff\xfe"}')
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    out = tmp_path / "emb"
    assert main(["encode", "--corpus", str(path), "--out", str(out),
                 "--docs-per-shard", "10", "--passage-max-length", "32", "--actors", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 25: invalid UTF-8" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()
    for record in out.glob("part-*.json") if out.exists() else []:  # any shard written is whole
        entry = json.loads(record.read_text())
        assert embeddings.sha256_of(str(out / entry["file"])) == entry["sha256"]


def test_skip_policy_end_to_end_counts_in_manifest(ray_local, tmp_path):
    out = tmp_path / "emb"
    result = _encode(_bad_corpus(tmp_path), out, docs_per_shard=3, on_bad_input="skip",
                     actors=1, **SHORT)
    assert result.complete
    ids, _ = embeddings.load(str(out), verify=True)
    assert ids == ["d1", "d8"]
    manifest = embeddings.read_manifest(str(out))
    assert manifest["skipped"] == {k: 1 for k in MESSAGES}
    assert [p["rows"] for p in manifest["parts"]] == [1, 0, 1]  # an all-bad shard: 0 rows
    assert any("line 5: duplicate id 'd1'" in e for e in manifest["skipped_examples"])


# ---------------------------------------------------------------------------- resources

def test_cpu_actors_leave_room_for_the_read_stage():
    options = EncodeOptions(encoder=EncoderConfig())
    plan = plan_resources(options, {"CPU": 2.0})
    assert plan.device == "cpu" and plan.actors == 2 and plan.threads == 1
    assert plan.num_cpus < 1  # fractional: with whole CPUs the read could never run
    assert plan.actors * plan.num_cpus + 4 * AUX_CPUS <= 2.0
    gpu = plan_resources(options, {"CPU": 8.0, "GPU": 2.0})
    assert (gpu.device, gpu.actors, gpu.num_gpus) == ("cuda", 2, 1.0)
    with pytest.raises(InputError, match="no GPUs"):
        plan_resources(EncodeOptions(encoder=EncoderConfig(device="cuda")), {"CPU": 2.0})



def test_cpu_plan_tokenizes_in_the_encoder_actors_and_both_paths_agree():
    """On CPU the encoder actors tokenize their own shards (no tokenizer actor, one shard in
    flight, one writer actor); with GPUs a tokenizer actor feeds them. Both paths give the same
    rows: TokenizeShards -> EncodeShards equals EncodeShards on the texts (no Ray needed)."""
    import pyarrow as pa

    from retriever.io.corpus import SHARD_SCHEMA
    from retriever.pipelines.encode import EncodeShards, TokenizeShards

    cpu = plan_resources(EncodeOptions(encoder=EncoderConfig()), {"CPU": 2.0})
    assert (cpu.tokenizers, cpu.in_flight, cpu.writers) == (0, 1, 1)
    gpu = plan_resources(EncodeOptions(encoder=EncoderConfig()), {"CPU": 8.0, "GPU": 2.0})
    assert (gpu.tokenizers, gpu.in_flight) == (1, 2)
    with pytest.raises(ValueError, match="tokenizer_actors must be >= 0"):
        EncodeOptions(tokenizer_actors=-1)

    corpus = _scifact().subset(range(12))
    shard = pa.Table.from_pylist([{
        "shard": 0, "first_row": 0, "input_rows": 12, "input_sha256": "x",
        "doc_ids": corpus.ids, "texts": corpus.passages(), "skipped": "{}", "done": False,
        "last": True, "read_node": "n"}], schema=SHARD_SCHEMA)
    config = EncoderConfig(model="minilm")
    encode = EncodeShards(config, threads=1)
    fused = encode(shard).to_pylist()[0]
    staged = encode(TokenizeShards(config)(shard)).to_pylist()[0]
    assert fused["vectors"] == staged["vectors"] and fused["tokens"] == staged["tokens"] > 0
    assert fused["doc_ids"] == corpus.ids and fused["dim"] == 384
