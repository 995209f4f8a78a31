"""Build the Python standard library code-retrieval collection: ``retriever code-collection``.

Generates a BEIR folder (corpus of public functions without their docstrings, queries from the
docstrings' first paragraphs, ``qrels/{train,test}.tsv``, manifest) from the running
interpreter's standard library into the store (default
``<store>/datasets/python-stdlib-code-s<seed>``), split train/test by top-level package. It is
generated, never committed. A new collection from raw material is not a variant of ``split``
(which re-partitions an existing collection's judged queries), hence its own job. The work is
``retriever.pipelines.code_collection``.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.pipelines.code_collection import CodeCollectionConfig, build_code_collection


def run(config: CodeCollectionConfig) -> dict:
    """Build (see :func:`retriever.pipelines.code_collection.build_code_collection`)."""
    return build_code_collection(config)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(CodeCollectionConfig, argv, prog="retriever code-collection")
    manifest = run(config)
    sizes = ", ".join(f"{name} {c['queries']} queries from {len(c['packages'])} packages"
                      for name, c in manifest["counts"].items())
    print(f"python standard library code collection ({manifest['docs']} functions): {sizes}")
    print(f"wrote {manifest['out']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["code-collection", *sys.argv[1:]]))
