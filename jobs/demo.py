"""The README's main job on the embedded default (local Ray, local store, packaged MiniLM, a real
collection): the whole pipeline, each stage one of the project's jobs.

1. split   Cranfield's judged queries into train / held-out test (by a hash of their ids)
2. mine    hard negatives for the train queries (BM25 + dense MiniLM, false negatives filtered)
3. train   MiniLM + LoRA, InfoNCE, DeepSpeed ZeRO-3 on 2 Ray Train workers
4. evaluate  BM25, zero-shot MiniLM and the fine-tuned model on the held-out queries: each dense
           model encoded by the Ray Data encode job into a sharded FAISS index, searched in-cluster
5. serve   the fine-tuned index behind the Ray Serve app; prints the search page and a curl

Every stage writes to the store and is reused (or resumed) on a second run. Ends with the
comparison table (NDCG@10, with a paired t-test against zero-shot MiniLM).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from retriever import config as cfg
from retriever.io import store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SERVE_MODES = ("auto", "block", "check", "off")


@dataclass
class DemoConfig:
    """Split, mine, fine-tune (ZeRO-3 + LoRA), encode, index, evaluate and serve on Cranfield."""

    dataset: str = field(default=str(SHARED_DATASETS / "cranfield"),
                         metadata={"help": "BEIR folder (local path or fsspec URL)"})
    store: str | None = field(default=None, metadata={"help": "store root (default ./.retriever)"})
    test_fraction: float = field(default=1 / 3, metadata={"help": "share of queries held out"})
    seed: int = 0
    model: str = field(default="minilm", metadata={"help": "backbone to fine-tune"})
    train_config: str | None = field(default=None, metadata={
        "help": "training settings (YAML/JSON, as for `retriever train --config`) over the "
                "demo's own; train_data and model are set by the demo"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    strategy: str = field(default="zero3", metadata={"help": "zero3 | zero2 | ddp"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the mined examples"})
    shards: int = field(default=2, metadata={"help": "index shards"})
    index_type: str = field(default="flat", metadata={"help": "flat | ivfpq | hnsw"})
    serve: str = field(default="auto", metadata={
        "help": "auto: keep serving until Ctrl-C when run from a terminal, else check and stop; "
                "block; check: deploy, answer one query, stop; off", "choices": list(SERVE_MODES)})
    port: int = field(default=8000, metadata={"help": "HTTP port of the search app (127.0.0.1)"})


def _finished(folder: str, **expected) -> dict | None:
    """The manifest of an earlier run of a stage into ``folder`` if it was made with the
    ``expected`` manifest values, else None (the stage runs again and overwrites it)."""
    url = store.join(folder, "manifest.json")
    if not store.exists(url):
        return None
    manifest = store.read_json(url)
    return manifest if all(manifest.get(k) == v for k, v in expected.items()) else None


def _stage(number: int, title: str) -> float:
    print(f"\n[{number}/5] {title}", flush=True)
    return time.time()


def _done(started: float, what: str) -> None:
    print(f"      {what} ({time.time() - started:.0f} s)", flush=True)


def training_config(config: DemoConfig, train_data: str, out: str):
    """The demo's fine-tuning recipe (see configs/train/minilm-cranfield.yaml), file settings
    over it, then the demo's flags."""
    from retriever.training.config import TrainConfig

    settings = dict(
        model=config.model, train_data=train_data, out=out, strategy=config.strategy,
        num_workers=config.num_workers, per_device_batch_size=16, group_size=2,
        per_positive=True, epochs=config.epochs, learning_rate=3e-4, warmup_ratio=0.1,
        schedule="linear", temperature=0.05, lora_r=16, lora_alpha=32, lora_dropout=0.05,
        gradient_checkpointing=False, passage_max_length=160, export_passage_max_length=256,
        checkpoint_every=10, seed=config.seed)
    if config.train_config:
        settings.update(cfg.load_file(config.train_config))
    settings.update(model=config.model, train_data=train_data, out=out)
    return TrainConfig(**settings)


def _post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def _serve(config: DemoConfig, index: str, docs: str, example: str) -> None:
    from jobs.serve import ServeConfig, start

    url = start(ServeConfig(index=index, docs=docs, port=config.port))
    answer = _post_json(f"{url}/search", {"query": example, "top_k": 3})
    print(f"      search page: {url}/", flush=True)
    print(f"      try:  curl -s {url}/search -H 'Content-Type: application/json' "
          f"-d '{json.dumps({'query': example, 'top_k': 3})}'")
    for hit in answer["hits"]:
        title = (hit.get("title") or hit.get("text") or "")[:70]
        print(f"      {hit['rank']}. {hit['doc_id']:>6}  {hit['score']:.3f}  {title}")
    mode = config.serve
    if mode == "auto":
        mode = "block" if sys.stdin.isatty() and sys.stdout.isatty() else "check"
    if mode == "block":
        import signal
        import threading

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("      serving; Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
    from ray import serve

    serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(DemoConfig, argv, prog="retriever demo")
    if not store.has_scheme(config.dataset) and not os.path.isdir(config.dataset):
        print(f"retriever demo: dataset folder {config.dataset} not found.\n"
              "Point it at a BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], "
              "qrels/test.tsv):\n  retriever demo --dataset /path/to/beir/cranfield",
              file=sys.stderr)
        return 2
    if config.store:
        os.environ["RETRIEVER_STORE"] = config.store
    import ray

    from jobs import evaluate, mine, split
    from retriever.training.run import print_step, train

    root = store.default_root()
    name = config.dataset.rstrip("/").rsplit("/", 1)[-1]
    began = time.time()
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)

    t = _stage(1, f"split {name}'s judged queries (test fraction {config.test_fraction:.2f}, "
                  f"seed {config.seed})")
    split_out = store.join(root, "datasets", f"{name}-split-s{config.seed}")
    split_config = split.SplitConfig(dataset=config.dataset, seed=config.seed,
                                     test_fraction=config.test_fraction, out=split_out)
    manifest = _finished(split_out, settings=cfg.to_dict(split_config)) or \
        split.run(split_config)
    counts = {k: v["queries"] for k, v in manifest["counts"].items()}
    _done(t, f"{counts} queries -> {split_out}")

    t = _stage(2, "mine hard negatives for the train queries (BM25 + dense MiniLM)")
    mined_out = store.join(root, "mined", f"{name}-split-s{config.seed}-train-minilm")
    mined = _finished(mined_out, dataset=split_out) or mine.run(
        mine.MineConfig(dataset=split_out, split="train", out=mined_out, seed=config.seed))
    _done(t, f"{mined['count']} examples -> {mined_out}")

    t = _stage(3, f"fine-tune {config.model} + LoRA ({config.strategy}, {config.num_workers} "
                  "Ray Train workers)")
    train_config = training_config(config, mined_out, out=None)
    train_config.out = store.join(root, "runs", f"demo-{name}-{config.model}-"
                                                f"{train_config.fingerprint()}", "train")
    trained = _finished(train_config.out, fingerprint=train_config.fingerprint())
    if trained:
        print(f"      reusing the finished run {train_config.out}", flush=True)
    else:
        result = train(train_config, progress=print_step)
        if result.error or not result.manifest:
            print(f"retriever demo: training failed: {result.error}", file=sys.stderr)
            return 1
        trained = result.manifest
    merged = trained.get("merged") or trained["adapter"]
    _done(t, f"{trained.get('steps')} steps -> {merged}")

    t = _stage(4, f"evaluate on the {counts['test']} held-out queries (encode with Ray Data, "
                  f"{config.shards}-shard {config.index_type} index, in-cluster search)")
    finetuned = f"{config.model}-lora"
    matrix = evaluate.MatrixConfig(
        matrix_id=f"demo-{name}-s{config.seed}", baseline=config.model,
        models=["bm25", config.model, {"name": finetuned, "model": merged}],
        datasets=[{"name": f"{name}-heldout", "path": split_out, "split": "test"}],
        shards=config.shards, index_type=config.index_type)
    records, markdown = evaluate.run(matrix)
    ft_record = next(r for r in records if r.model == finetuned)
    index = store.read_json(store.join(ft_record.folder, "provenance.json"))["index"]
    _done(t, f"report: {os.path.dirname(ft_record.folder.rstrip('/')).rsplit('/', 1)[0]}"
             "/report.html")

    if config.serve != "off":
        t = _stage(5, "serve the fine-tuned index (Ray Serve: query encoder, shard searchers, "
                      "router)")
        from retriever.io.formats import load_dataset

        held_out = load_dataset(split_out, "test").judged_queries()
        _serve(config, index, split_out, min(held_out.values(), key=len))
        _done(t, "served")

    print(f"\n{markdown.split('## MRR@10')[0].strip()}\n")
    print(f"demo finished in {(time.time() - began) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["demo", *sys.argv[1:]]))
