"""Corpus encoding on Ray Data: tokenize, encode in an actor pool, write embedding shards.

A shard of :mod:`retriever.io.corpus` is the unit of work, of retry and of output::

    plan (retriever.io.corpus: scan + duplicate-id passes, Ray tasks spread over the nodes)
      -> read (one task per file piece)
      -> TokenizeShards (actor: Encoder.tokenize, no weights; with GPUs only -- on CPU each
         encoder actor tokenizes its own shard, with the same Encoder.tokenize)
      -> EncodeShards (actor pool holding the model: length-sorted, token-budget batches)
      -> WriteShards (writer actor: part-NNNNN.parquet, then its record part-NNNNN.json)

Every stage takes one shard per call (one-row blocks, ``batch_size=1``), so a shard is never
split or merged. A shard is *finished* when its record names the same input hash and settings
key and its parquet has the recorded size; a re-run passes it through without work. A killed
actor is restarted and its shard retried (Ray Data's actor pools default to
``max_restarts=-1``, ``max_task_retries=-1``); each file is written atomically, so a retried
shard just writes the same bytes again. The manifest is written last, only when every shard
of the plan is finished.

Resources: with GPUs, one GPU per actor and the Encoder's GPU dtype (bf16, else fp16). On CPU,
a fractional ``num_cpus`` per actor (0.75 for each of 2 actors on 2 CPUs) so the read,
tokenize and write stages (0.1 CPU each) always get scheduled -- whole CPUs per actor on a
2-CPU node would leave the read unschedulable and deadlock -- and torch threads per actor from
``device.cpu_threads_per_actor`` (one thread an actor on small nodes). Every stage after the
read runs in long-lived actors, so torch and the model are loaded once per process, at start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from retriever import provenance
from retriever.config import flat
from retriever.io import embeddings, store
from retriever.io.corpus import (READ_BYTES, SHARD_SCHEMA, CorpusPlan, CorpusSource,
                                 plan_corpus, ray_map, read_corpus)
from retriever.modeling.device import cpu_threads_per_actor
from retriever.modeling.encoder import (Encoder, EncoderConfig, WeightlessEncoder,
                                        token_budget_batches)
from retriever.ops import autoscale, local_ray
from retriever.errors import InputError

AUX_CPUS = 0.1  # read, tokenize and each write task
AUX_RESERVE = 0.5  # CPU left to those stages when sizing the encoder actors
RECORD_RE = re.compile(r"^part-(\d{5,})\.json$")
SCRATCH = "_scan"  # the corpus plan's id lists, inside the output folder while it runs

TOKENS_SCHEMA = pa.schema([f for f in SHARD_SCHEMA if f.name != "texts"] +
                          [pa.field("input_ids", pa.list_(pa.list_(pa.int32())))])
ENCODED_SCHEMA = pa.schema([f for f in SHARD_SCHEMA if f.name != "texts"] + [
    pa.field("vectors", pa.large_binary()), pa.field("dim", pa.int32()),
    pa.field("tokens", pa.int64()), pa.field("padded_tokens", pa.int64()),
    pa.field("seconds", pa.float64()), pa.field("gpu_util", pa.float64()),
    pa.field("gpu_memory_gb", pa.float64()),
    pa.field("settings", pa.string())])
SUMMARY_SCHEMA = pa.schema([("shard", pa.int64()), ("status", pa.string()),
                            ("last", pa.bool_()), ("record", pa.string())])


def record_name(index: int) -> str:
    return f"part-{index:05d}.json"


@dataclass
class EncodeOptions:
    """What the pipeline needs besides the corpus and the output folder."""

    encoder: EncoderConfig = flat(EncoderConfig)
    embedding_dtype: str = field(default="float16", metadata={
        "help": "stored vector type", "choices": list(embeddings.DTYPES)})
    docs_per_shard: int = field(default=1000, metadata={"help": "input rows per shard"})
    on_bad_input: str = field(default="error", metadata={
        "help": "error: stop naming file and line; skip: drop and count",
        "choices": ["error", "skip"]})
    read_bytes: int = field(default=READ_BYTES, metadata={
        "help": "bytes of an uncompressed JSONL file one read task reads (part of the shard "
                "plan: shards never cross a range)"})
    max_shards: int = field(default=0, metadata={
        "help": "encode at most this many shards, then stop (0: all; the run stays incomplete)"})
    actors: int = field(default=0, metadata={"help": "encoder actors (0: per GPU or CPU)"})
    cpus_per_actor: float = field(default=0.0, metadata={"help": "0: auto (fractional on CPU)"})
    threads_per_actor: int = field(default=0, metadata={"help": "torch threads (0: auto)"})
    tokenizer_actors: int = field(default=0, metadata={
        "help": "tokenizer actors (0: auto -- inside the encoder actors on CPU, 1 with GPUs)"})
    actor_resources: dict[str, float] | None = field(default=None, metadata={
        "help": "custom Ray resources per encoder actor, as JSON (e.g. {\"gpu_a10g\": 1}: the "
                "node group's own resource, which the autoscaler launches nodes for)"})
    verify_existing: bool = field(default=False, metadata={
        "help": "re-hash finished shards before skipping them"})

    def __post_init__(self):
        if self.embedding_dtype not in embeddings.DTYPES:
            raise ValueError(f"embedding_dtype {self.embedding_dtype!r}: expected one of "
                             f"{', '.join(embeddings.DTYPES)}")
        for name in ("docs_per_shard", "read_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_shards", "actors", "cpus_per_actor", "threads_per_actor",
                     "tokenizer_actors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


PassageTokenizer = WeightlessEncoder  # the tokenize stage's Encoder: no weights


def shard_key(settings: dict, options: EncodeOptions) -> str:
    """What a finished shard must match to be reused: everything that decides its vectors
    and its rows, with the dtype as requested (the one used depends on the hardware; the
    queries' precision decides no passage vector)."""
    data = {k: v for k, v in settings.items() if k not in ("dtype", "query_dtype")}
    data.update(requested_dtype=options.encoder.dtype, requested_device=options.encoder.device,
                embedding_dtype=options.embedding_dtype, docs_per_shard=options.docs_per_shard,
                on_bad_input=options.on_bad_input, format=embeddings.FORMAT,
                read_bytes=options.read_bytes)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- resources

@dataclass
class Resources:
    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    device: str  # "cuda" or "cpu"
    tokenizers: int = 0  # tokenizer actors; 0: each encoder actor tokenizes its own shards
    in_flight: int = 1  # shards queued per encoder actor (2 on GPU: the next one is at hand)
    writers: int = 1  # writer actors

    def describe(self) -> str:
        what = (f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU")
        tokenize = (f"{self.tokenizers} tokenizer actor(s)" if self.tokenizers
                    else "tokenized in the encoder actors")
        return f"{self.actors} actor(s) x ({what}, {self.threads} thread(s)), {tokenize}"


def plan_resources(options: EncodeOptions, cluster: dict | None = None) -> Resources:
    """Actor count and per-actor resources for the cluster (``ray.cluster_resources()``)."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
    device = options.encoder.device
    if device.startswith("cuda") and gpus < 1:
        raise InputError(f"device {device!r} requested but the Ray cluster has no GPUs")
    if gpus >= 1 and (device == "auto" or device.startswith("cuda")):
        actors = options.actors or int(gpus)
        num_cpus = options.cpus_per_actor or max(AUX_CPUS, min(1.0, (cpus - AUX_RESERVE)
                                                                / actors))
        # Tokenizing apart keeps a GPU fed; on CPU it would be another process importing
        # torch and transformers at start-up and a hand-off per shard, for ~3% of the work.
        return Resources(actors, num_cpus, 1.0, options.threads_per_actor or 1, "cuda",
                         tokenizers=options.tokenizer_actors or 1, in_flight=2, writers=2)
    threads = options.threads_per_actor or cpu_threads_per_actor(cpus)
    actors = options.actors or max(1, int(cpus // threads))
    num_cpus = options.cpus_per_actor or max(AUX_CPUS, min(float(threads),
                                                           (cpus - AUX_RESERVE) / actors))
    return Resources(actors, round(num_cpus, 3), 0.0, threads, "cpu",
                     tokenizers=options.tokenizer_actors)


# ---------------------------------------------------------------------------- stage UDFs

class TokenizeShards:
    """Ray Data UDF: a shard's texts -> token id lists (prefix, template, truncation, EOS)."""

    def __init__(self, encoder_config: EncoderConfig):
        self.tokenizer = PassageTokenizer(dataclasses.replace(encoder_config, device="cpu"))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            texts = row.pop("texts")
            row["input_ids"] = self.tokenizer.tokenize(texts, "passage") if texts else []
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=TOKENS_SCHEMA)


class _GpuSampler:
    """Samples ``torch.cuda.utilization()`` twice a second (NVML, from the ``gpu`` extra's
    nvidia-ml-py; without it nothing), and reads torch's peak GPU memory per shard."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        import torch

        while not self._stop.wait(0.5):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 -- no NVML: report nothing
                return

    def take(self) -> float | None:
        samples, self.samples = self.samples, []
        return sum(samples) / len(samples) if samples else None

    @staticmethod
    def peak_memory_gb() -> float:
        """GiB held by tensors at the peak since the last call (torch's counter, no NVML)."""
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return peak


class EncodeShards:
    """Ray Data UDF held by each actor of the pool: the model, one shard per call."""

    def __init__(self, encoder_config: EncoderConfig, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.encoder = Encoder(encoder_config)
        self.settings = json.dumps(self.encoder.settings(), sort_keys=True)
        self.gpu = _GpuSampler() if self.encoder.placement.device.type == "cuda" else None

    def _token_ids(self, row: dict) -> list[list[int]]:
        """The shard's token ids: from the tokenize stage, or (no tokenizer actors) tokenized
        here by the same Encoder.tokenize the tokenize stage runs."""
        if "input_ids" in row:
            return row.pop("input_ids")
        texts = row.pop("texts")
        return self.encoder.tokenize(texts, "passage") if texts and not row["done"] else []

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        config = self.encoder.config
        for row in batch.to_pylist():
            ids = self._token_ids(row)
            vectors = np.zeros((0, self.encoder.dim), np.float32)
            stats = {"tokens": 0, "padded_tokens": 0, "seconds": 0.0, "gpu_util": None,
                     "gpu_memory_gb": None}
            if not row["done"] and ids:
                if self.gpu:
                    self.gpu.take()  # from here on: this shard's samples and peak only
                    self.gpu.peak_memory_gb()
                started = time.perf_counter()
                vectors = self.encoder.encode_ids(ids)
                stats["seconds"] = time.perf_counter() - started
                stats["tokens"], stats["padded_tokens"] = padding(
                    [len(r) for r in ids], config.batch_size, config.max_tokens_per_batch)
                stats["gpu_util"] = self.gpu.take() if self.gpu else None
                stats["gpu_memory_gb"] = self.gpu.peak_memory_gb() if self.gpu else None
            row.update(vectors=vectors.astype(np.float32).tobytes(), dim=self.encoder.dim,
                       settings=self.settings, **stats)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


def padding(lengths: list[int], batch_size: int, max_tokens: int | None) -> tuple[int, int]:
    """(real tokens, padded tokens) under the Encoder's own token-budget batching."""
    padded = sum(len(b) * max(lengths[i] for i in b)
                 for b in token_budget_batches(lengths, batch_size, max_tokens))
    return sum(lengths), padded


class WriteShards:
    """Ray Data UDF held by the long-lived writer actor(s): :func:`write_shards` per shard.

    A task a shard would start a fresh worker process for most shards (Ray keeps few idle
    workers), and each would import this module -- torch and transformers -- again: seconds
    of CPU a shard taken from the encoder actors on a small node."""

    def __init__(self, folder: str, embedding_dtype: str, key: str):
        self.args = {"folder": folder, "embedding_dtype": embedding_dtype, "key": key}

    def __call__(self, batch: pa.Table) -> pa.Table:
        return write_shards(batch, **self.args)


def write_shards(batch: pa.Table, folder: str, embedding_dtype: str, key: str) -> pa.Table:
    """Ray Data UDF: write each shard's parquet, then its record (the shard's completion)."""
    rows = []
    for row in batch.to_pylist():
        if row["done"]:
            rows.append({"shard": row["shard"], "status": "done", "last": row["last"],
                         "record": ""})
            continue
        vectors = np.frombuffer(row["vectors"], np.float32).reshape(-1, row["dim"])
        entry = embeddings.write_part(folder, row["shard"], row["doc_ids"], vectors,
                                      embedding_dtype)
        record = {**entry, "shard": row["shard"], "settings_key": key,
                  "first_row": row["first_row"], "input_rows": row["input_rows"],
                  "input_sha256": row["input_sha256"], "last": row["last"],
                  "skipped": json.loads(row["skipped"]), "tokens": row["tokens"],
                  "padded_tokens": row["padded_tokens"], "seconds": row["seconds"],
                  "gpu_util": row["gpu_util"], "gpu_memory_gb": row["gpu_memory_gb"],
                  "encoder": json.loads(row["settings"]), "read_node": row["read_node"],
                  "created": provenance.now()}
        store.write_json(store.join(folder, record_name(row["shard"])), record)
        rows.append({"shard": row["shard"], "status": "encoded", "last": row["last"],
                     "record": json.dumps(record)})
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


# ---------------------------------------------------------------------------- output state

def finished_shards(folder: str, key: str, verify: bool = False) -> dict[int, dict]:
    """Records of the shards already finished in ``folder`` for this settings key."""
    fs, path = store.filesystem(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size")
             for entry in fs.ls(path, detail=True)}
    names = [n for n in sizes if RECORD_RE.match(n)]

    def check(name: str) -> dict | None:
        try:
            record = store.read_json(store.join(folder, name))
        except (OSError, ValueError):
            return None
        if record.get("settings_key") != key or sizes.get(record.get("file")) != \
                record.get("bytes"):
            return None
        if verify and embeddings.sha256_of(store.join(folder, record["file"])) != \
                record.get("sha256"):
            return None
        return compact(record)

    with ThreadPoolExecutor(max_workers=16) as pool:
        records = [r for r in pool.map(check, names) if r]
    return {int(r["shard"]): r for r in records}


PART_KEYS = ("file", "rows", "sha256", "bytes")


def compact(record: dict) -> dict:
    """What the run's tally and the manifest need of a shard record (the whole record stays
    in its part-NNNNN.json): the driver holds one of these per shard, not the records."""
    out = {k: record[k] for k in PART_KEYS + ("shard", "input_sha256", "input_rows", "tokens",
                                              "padded_tokens", "skipped")}
    out.update(gpu_util=record.get("gpu_util"), gpu_memory_gb=record.get("gpu_memory_gb"),
               read_node=record.get("read_node", ""),
               encoder=sys.intern(json.dumps(record["encoder"], sort_keys=True)))
    return out


def remove(folder: str, names: list[str]) -> None:
    fs, path = store.filesystem(folder)
    for name in names:
        target = f"{path.rstrip('/')}/{name}"
        if fs.exists(target):
            fs.rm(target)


def stale_parts(folder: str, last: int) -> list[str]:
    """Part files and records numbered beyond the plan's last shard (a shrunken corpus)."""
    out = []
    for name in store.listdir(folder):
        match = re.match(r"^part-(\d{5,})\.(parquet|json)$", name)
        if match and int(match.group(1)) > last:
            out.append(name)
    return out


# ---------------------------------------------------------------------------- pipeline

def build_pipeline(plan: CorpusPlan, folder: str, options: EncodeOptions,
                   resources: Resources, key: str, done: dict[int, dict]):
    """The Ray Dataset of the whole job; it yields one :data:`SUMMARY_SCHEMA` row a shard."""
    from ray.data import DataContext

    # Every block must hold exactly one shard: Ray Data's output buffers would otherwise merge
    # the read's one-row tables into blocks of up to 128 MiB (the whole corpus here, read to
    # its end before anything moves on, then encoded as one task on one actor). A dataset
    # keeps the context it was built with, so the setting stays with this pipeline.
    context = DataContext.get_current()
    saved = context.target_max_block_size
    context.target_max_block_size = 1
    try:
        return _build(plan, folder, options, resources, key, done)
    finally:
        context.target_max_block_size = saved


def _build(plan, folder, options, resources, key, done):
    from ray.data import ActorPoolStrategy

    ds = read_corpus(plan, {k: r["input_sha256"] for k, r in done.items()},
                     options.max_shards or None, num_cpus=AUX_CPUS)
    # Fixed-size pools: the autoscaler would drop a loaded model whenever the pool is briefly
    # under half busy (e.g. while the tokenizer starts) and pay its load time again later.
    if resources.tokenizers:
        ds = ds.map_batches(TokenizeShards, batch_size=1, batch_format="pyarrow",
                            fn_constructor_kwargs={"encoder_config": options.encoder},
                            num_cpus=AUX_CPUS, compute=ActorPoolStrategy(size=resources.tokenizers))
    # One shard in flight per CPU actor: a shard queued behind a busy actor while another
    # actor idles would stretch the job's tail by up to a shard's encode time.
    ds = ds.map_batches(
        EncodeShards, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs={"encoder_config": options.encoder, "threads": resources.threads},
        compute=ActorPoolStrategy(size=resources.actors,
                                  max_tasks_in_flight_per_actor=resources.in_flight),
        num_cpus=resources.num_cpus, num_gpus=resources.num_gpus or None,
        resources=options.actor_resources or None)
    return ds.map_batches(WriteShards, batch_size=1, batch_format="pyarrow", num_cpus=AUX_CPUS,
                          compute=ActorPoolStrategy(size=resources.writers),
                          fn_constructor_kwargs={"folder": folder, "key": key,
                                                 "embedding_dtype": options.embedding_dtype})


def input_error(err: BaseException) -> InputError | None:
    """The bad-input error behind a failure raised through Ray, if there is one."""
    from ray.exceptions import RayError

    stack, seen = [err], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, InputError) and not isinstance(current, RayError):
            return current
        stack += [current.__context__, current.__cause__, getattr(current, "cause", None)]
    return None


def execute(ds) -> dict[int, dict | None]:
    """Run the pipeline to the end: shard -> its :func:`compact` record (None: finished in
    an earlier run). Bad input surfaces as its own :class:`InputError`."""
    from retriever import console

    seen: dict[int, dict | None] = {}
    progress, docs = console.Progress("encode", unit="shards"), 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                record = compact(json.loads(row["record"])) if row["record"] else None
                seen[int(row["shard"])] = record
                docs += record["rows"] if record else 0
            rate = docs / max(time.time() - progress.started, 1e-9)
            progress.update(len(seen), f"encode: {len(seen)} shards, {docs} docs encoded "
                                       f"({rate:.1f} docs/s)")
    except Exception as err:  # noqa: BLE001 -- re-raised unless it hides bad input
        found = input_error(err)
        if found is None:
            raise
        raise InputError(str(found)) from None
    finally:
        progress.close()
    return seen


# ---------------------------------------------------------------------------- result

@dataclass
class EncodeResult:
    """What one run did, and the manifest when the folder is complete."""

    folder: str
    shards_encoded: int
    shards_reused: int
    docs: int  # embedded in this run
    seconds: float
    tokens: int
    padded_tokens: int
    complete: bool
    shards_total: int | None
    rows_total: int | None
    skipped: dict[str, int]
    gpu_util: float | None
    resources: str
    gpu_memory_gb: float | None = None  # the largest per-actor peak
    manifest: dict | None = None
    stale_removed: list[str] = field(default_factory=list)

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def summary(self) -> str:
        gpu = f"GPU util {self.gpu_util:.0f}%" if self.gpu_util is not None else "GPU util n/a"
        if self.gpu_memory_gb is not None:
            gpu += f", GPU memory peak {self.gpu_memory_gb:.1f} GiB"
        state = (f"complete: {self.rows_total} embeddings in {self.shards_total} shards"
                 if self.complete else "INCOMPLETE (no manifest yet): re-run to finish")
        bad = sum(self.skipped.values())
        return (f"encode: {self.docs} docs in {self.seconds:.1f}s = {self.docs_per_s:.1f} docs/s, "
                f"{self.tokens_per_s:.0f} tokens/s, padding {100 * self.padding_fraction:.1f}%, "
                f"{gpu} | shards: {self.shards_encoded} encoded, {self.shards_reused} already "
                f"done | bad rows skipped: {bad} | {self.resources} | {state}")


def finish(folder: str, source: CorpusSource, plan: CorpusPlan, seen: dict[int, dict | None],
           done: dict[int, dict], key: str, options: EncodeOptions, seconds: float,
           resources: Resources) -> EncodeResult:
    """Tally the run; when every shard of the plan is finished, write the manifest (last)."""
    encoded = {k: r for k, r in seen.items() if r is not None}
    complete = len(seen) == plan.shards
    new = list(encoded.values())
    utils = [r["gpu_util"] for r in new if r.get("gpu_util") is not None]
    peaks = [r["gpu_memory_gb"] for r in new if r.get("gpu_memory_gb") is not None]
    result = EncodeResult(
        folder=folder, shards_encoded=len(encoded), shards_reused=len(seen) - len(encoded),
        docs=sum(r["rows"] for r in new), seconds=seconds, tokens=sum(r["tokens"] for r in new),
        padded_tokens=sum(r["padded_tokens"] for r in new), complete=complete,
        shards_total=plan.shards if complete else None, rows_total=None, skipped={},
        gpu_util=sum(utils) / len(utils) if utils else None, resources=resources.describe(),
        gpu_memory_gb=max(peaks) if peaks else None)
    if not complete:
        for r in new:
            _add_counts(result.skipped, r["skipped"]["counts"])
        return result
    result.stale_removed = stale_parts(folder, plan.shards - 1)
    remove(folder, result.stale_removed)
    records = {**done, **encoded}
    result.manifest = _write_manifest(folder, source, plan, [records[k] for k in
                                                             range(plan.shards)],
                                      key, options, result)
    result.rows_total = result.manifest["rows"]
    result.shards_total = plan.shards
    result.skipped = result.manifest["skipped"]
    return result


def _write_manifest(folder: str, source: CorpusSource, plan: CorpusPlan, records: list[dict],
                    key: str, options: EncodeOptions, result: EncodeResult) -> dict:
    """The manifest of a complete folder from the shards' compact records, in plan order."""
    skipped: dict[str, int] = {}
    examples: list[str] = []
    fingerprint = hashlib.sha256()
    for r in records:
        _add_counts(skipped, r["skipped"]["counts"])
        examples += r["skipped"]["examples"][: max(0, 20 - len(examples))]
        fingerprint.update(r["input_sha256"].encode())
    variants = [json.loads(v) for v in dict.fromkeys(r["encoder"] for r in records)]
    tokens = sum(r["tokens"] for r in records)
    padded = sum(r["padded_tokens"] for r in records)
    return embeddings.write_manifest(
        folder, encoder=variants[0], dtype=options.embedding_dtype,
        parts=[{k: r[k] for k in PART_KEYS} for r in records],
        source={"url": source.url, "files": source.files,
                "input_rows": sum(r["input_rows"] for r in records),
                "fingerprint": fingerprint.hexdigest()},
        skipped=skipped, skipped_examples=examples,
        encode={"settings_key": key, "docs_per_shard": options.docs_per_shard,
                "on_bad_input": options.on_bad_input, "shards": len(records), "tokens": tokens,
                "padded_tokens": padded,
                "padding_fraction": round(1 - tokens / padded, 6) if padded else 0.0,
                "encoder_variants": variants if len(variants) > 1 else [],
                "read": {"read_bytes": options.read_bytes, "pieces": len(plan.pieces),
                         "duplicate_ids": plan.duplicate_count, "scan_nodes": plan.nodes,
                         "read_nodes": sorted({r["read_node"] for r in records})},
                "last_run": {"seconds": round(result.seconds, 3),
                             "shards_encoded": result.shards_encoded,
                             "shards_reused": result.shards_reused, "docs": result.docs,
                             "docs_per_s": round(result.docs_per_s, 3),
                             "resources": result.resources}})


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        total[kind] = total.get(kind, 0) + int(n)


# ---------------------------------------------------------------------------- entry point

def default_folder(source: CorpusSource, model: str) -> str:
    """``<store>/embeddings/<corpus name>/<model slug>``."""
    return store.join(store.default_root(), "embeddings", source.name,
                      store.slug(model, "model"))


def _warn_local_paths(urls: dict[str, str]) -> None:
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    for name, url in urls.items():
        if nodes > 1 and store.is_local(url):
            print(f"retriever encode: warning: {name} {url} is a local path on a {nodes}-node "
                  "cluster; every node must see it (shared filesystem), else use s3://...",
                  file=sys.stderr)


def encode_corpus(corpus: str, options: EncodeOptions, out: str | None = None) -> EncodeResult:
    """Encode ``corpus`` (BEIR folder, JSONL or parquet; any URL) into ``out`` (default
    :func:`default_folder`) on Ray Data, reusing finished shards; joins or starts Ray."""
    source = CorpusSource.open(corpus)
    out = out or default_folder(source, options.encoder.model)
    out = out if store.has_scheme(out) else os.path.abspath(out)  # workers have another cwd
    key = shard_key(PassageTokenizer(options.encoder, device="cpu").settings(), options)
    local_ray.init()  # $RAY_ADDRESS under `ray job submit`, else a local Ray on loopback
    _warn_local_paths({"--corpus": source.url, "--out": out})
    resources = plan_resources(options)
    autoscale.check_request({"CPU": resources.num_cpus, "GPU": resources.num_gpus,
                             **(options.actor_resources or {})}, resources.actors, "encode")
    done = finished_shards(out, key, verify=options.verify_existing)
    remove(out, ["manifest.json"])  # the folder is incomplete until we finish
    started = time.perf_counter()
    scratch = store.join(out, SCRATCH)
    try:
        plan = plan_corpus(source.files, options.docs_per_shard, options.on_bad_input,
                           options.read_bytes, scratch, ray_map)
        seen = execute(build_pipeline(plan, out, options, resources, key, done))
    finally:
        fs, path = store.filesystem(scratch)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return finish(out, source, plan, seen, done, key, options, time.perf_counter() - started,
                  resources)
