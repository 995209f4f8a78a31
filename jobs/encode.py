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

import sys
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.pipelines.encode import EncodeOptions, EncodeResult, encode_corpus


@dataclass
class EncodeConfig:
    """Encode a corpus with one model into an embedding folder."""

    corpus: str = field(metadata={"help": "BEIR folder, .jsonl[.gz] or .parquet file or folder; "
                                          "local path or fsspec URL"})
    out: str | None = field(default=None, metadata={"help": "output folder URL"})
    options: EncodeOptions = cfg.flat(EncodeOptions)  # with the encoder's options


def run(config: EncodeConfig) -> EncodeResult:
    """Encode; returns the :class:`retriever.pipelines.encode.EncodeResult`."""
    return encode_corpus(config.corpus, config.options, config.out)


def main(argv: list[str] | None = None) -> int:
    result = run(cfg.parse(EncodeConfig, argv, prog="retriever encode"))
    print(result.summary())
    print(f"{'wrote' if result.complete else 'partial output in'} {result.folder}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["encode", *sys.argv[1:]]))
