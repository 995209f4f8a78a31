"""Encode a corpus into embedding shards: ``retriever encode --corpus URL --model M [--out URL]``.

Runs on Ray Data (see ``retriever.pipelines.encode``): the corpus (BEIR folder, JSONL or parquet; any
fsspec URL) is streamed in shards of ``--docs-per-shard`` input rows, tokenized, encoded by an
actor pool holding the model, and written as ``part-NNNNN.parquet`` (``doc_id``, ``embedding``)
plus a per-shard record; ``manifest.json`` comes last, once every shard is done. Re-running
with the same inputs skips finished shards. Default output:
``<store>/embeddings/<corpus name>/<model>/``. Bad input: ``--on-bad-input error`` (stop,
naming file and line) or ``skip`` (drop and count; counts in the manifest).
Also runs as ``ray job submit -- python -m jobs.encode ...``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.io import store


@dataclass
class EncodeConfig:
    """Encode a corpus with one model into an embedding folder."""

    corpus: str = field(metadata={"help": "BEIR folder, .jsonl[.gz] or .parquet file or folder; "
                                          "local path or fsspec URL"})
    model: str = field(default="minilm", metadata={"help": "packaged name or model/adapter dir"})
    out: str | None = field(default=None, metadata={"help": "output folder URL"})
    embedding_dtype: str = field(default="float16", metadata={
        "help": "stored vector type", "choices": ["float16", "float32"]})
    docs_per_shard: int = field(default=1000, metadata={"help": "input rows per shard"})
    on_bad_input: str = field(default="error", metadata={
        "help": "error: stop naming file and line; skip: drop and count",
        "choices": ["error", "skip"]})
    max_shards: int = field(default=0, metadata={
        "help": "encode at most this many shards, then stop (0: all)"})
    actors: int = field(default=0, metadata={"help": "encoder actors (0: per GPU or CPU)"})
    cpus_per_actor: float = field(default=0.0, metadata={"help": "0: auto (fractional on CPU)"})
    threads_per_actor: int = field(default=0, metadata={"help": "torch threads (0: auto)"})
    tokenizer_actors: int = field(default=1, metadata={"help": "tokenizer actors (CPU)"})
    verify_existing: bool = field(default=False, metadata={
        "help": "re-hash finished shards before skipping them"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    device: str = "auto"
    prompt: str = field(default="none", metadata={"help": "none | one-word",
                                                  "choices": ["none", "one-word"]})
    pooling: str | None = field(default=None, metadata={"help": "mean | cls | last"})
    passage_prefix: str | None = None
    passage_max_length: int | None = None
    normalize: bool | None = None
    batch_size: int = field(default=64, metadata={"help": "max texts per forward pass"})
    max_tokens_per_batch: int = field(default=16384, metadata={
        "help": "token budget per forward pass (texts x longest)"})


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").rsplit("/", 1)[-1]) or "model"


def run(config: EncodeConfig):
    """Encode; returns the :class:`retriever.pipelines.encode.EncodeResult`."""
    import ray

    from retriever.pipelines import encode as encoding
    from retriever.io.corpus import CorpusSource
    from retriever.modeling.encoder import EncoderConfig

    source = CorpusSource.open(config.corpus)
    encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    encoder_config = EncoderConfig(**{k: v for k, v in dataclasses.asdict(config).items()
                                      if k in encoder_fields})
    options = encoding.EncodeOptions(
        encoder=encoder_config, embedding_dtype=config.embedding_dtype,
        docs_per_shard=config.docs_per_shard, on_bad_input=config.on_bad_input,
        max_shards=config.max_shards, actors=config.actors, cpus_per_actor=config.cpus_per_actor,
        threads_per_actor=config.threads_per_actor, tokenizer_actors=config.tokenizer_actors,
        verify_existing=config.verify_existing)
    out = config.out or store.join(store.default_root(), "embeddings", source.name,
                                   slug(config.model))
    out = out if store.has_scheme(out) else os.path.abspath(out)  # workers have another cwd
    key = encoding.run_key(encoding.PassageTokenizer(encoder_config, device="cpu").settings(),
                           options)

    if not ray.is_initialized():
        ray.init()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    for name, url in (("--corpus", source.url), ("--out", out)):
        if nodes > 1 and store.is_local(url):
            print(f"retriever encode: warning: {name} {url} is a local path on a {nodes}-node "
                  "cluster; every node must see it (shared filesystem), else use s3://...",
                  file=sys.stderr)
    resources = encoding.plan_resources(options)
    done = encoding.finished_shards(out, key, verify=options.verify_existing)
    encoding.remove(out, ["manifest.json"])  # the folder is incomplete until we finish
    started = time.perf_counter()
    rows = encoding.execute(encoding.build_pipeline(source, out, options, resources, key, done))
    return encoding.finish(out, source, rows, done, key, options,
                           time.perf_counter() - started, resources)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(EncodeConfig, argv, prog="retriever encode")
    result = run(config)
    print(result.summary())
    print(f"{'wrote' if result.complete else 'partial output in'} {result.folder}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["encode", *sys.argv[1:]]))
