"""The ``retriever`` command: one sub-command per job module.

Each job module exposes ``main(argv: list[str] | None) -> int``; this file only dispatches, so
``retriever NAME ARGS`` and ``python -m jobs.NAME ARGS`` behave the same.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported lazily so `retriever --help` is fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("jobs.eval", "evaluate one model on one dataset (metrics.json + run.trec)"),
    "encode": ("jobs.encode", "encode a corpus on Ray Data into embedding shards + manifest"),
    "evaluate": ("jobs.evaluate", "models x datasets matrix on the cluster, with a report"),
    "demo": ("jobs.demo", "the README's main job on the embedded default"),
    "submit": ("jobs.submit", "run a job on a Ray cluster (Job Submission API), stream its logs"),
    "cluster": ("jobs.cluster", "local multi-node Ray cluster up/down/status (or ray up/down)"),
    "plan": ("jobs.plan", "capacity plan: GPU-hours, embedding/index bytes, shards, cost"),
    "split": ("jobs.split", "split a collection's queries into train/test BEIR folders by id hash"),
    "code-collection": ("jobs.code_collection", "build a code-retrieval collection (BEIR) from "
                                                "this Python's standard library"),
    "mine": ("jobs.mine", "mine hard negatives (BM25 + dense, false negatives filtered)"),
    "train": ("jobs.train", "LoRA fine-tuning on Ray Train (DeepSpeed ZeRO-3/ZeRO-2/DDP)"),
    "index": ("jobs.index", "build N FAISS shards (flat / IVF-PQ / HNSW) from embeddings"),
    "serve": ("jobs.serve", "serve an index over HTTP locally (Ray Serve: encoder, shards, router)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: retriever COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`retriever COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"retriever: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from retriever.errors import InputError

    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except InputError as err:
        print(f"retriever {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
