"""The README's main job on the embedded default (local Ray, local store, packaged MiniLM, a real
collection): the whole pipeline in five stages, each one of the project's jobs.

1. split     the judged queries into train / held-out test (by a hash of their ids)
2. mine      hard negatives for the train queries (BM25 + dense MiniLM, false negatives filtered)
3. fine-tune MiniLM + LoRA, InfoNCE, DeepSpeed ZeRO-3 on 2 Ray Train workers
4. evaluate  BM25, zero-shot MiniLM and the fine-tuned model on the held-out queries: each dense
             model encoded on Ray Data into a sharded FAISS index, searched in-cluster
5. serve     the fine-tuned index behind the Ray Serve app; one query answered over HTTP

In: a :class:`DemoConfig` and the Serve app's start and wait (:class:`Serving`, passed in by
``jobs/demo.py``: the library does not import ``serve``). Out: every stage's artefacts in the
store (reused or resumed on a second run), a header and a timed footer per stage on the console
(``retriever.console``), and the NDCG@10 table with a paired t-test against zero-shot MiniLM.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from retriever import config as cfg
from retriever import console
from retriever.pipelines.evaluate import MatrixConfig, run_matrix
from retriever.io import store

SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
SERVE_MODES = ("auto", "block", "check", "off")
STAGES = 5


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
    verbose: bool = field(default=False, metadata={
        "help": "also show Ray's, Ray Data's and Ray Train's own logs and warnings"})


@dataclass
class Serving:
    """The Serve app, passed in by ``jobs/demo.py``: ``start(index=, docs=, port=)`` deploys
    it (not blocking) and returns its base URL; ``until_stopped()`` blocks until Ctrl-C, then
    shuts Serve and Ray down."""

    start: Callable[..., str]
    until_stopped: Callable[[], None]


class StageFailed(RuntimeError):
    """A stage ended without its output (the message says which and why)."""


def finished(folder: str, **expected) -> dict | None:
    """The manifest of an earlier run of a stage into ``folder`` if it was made with the
    ``expected`` manifest values, else None (the stage runs again and overwrites it)."""
    url = store.join(folder, "manifest.json")
    if not store.exists(url):
        return None
    manifest = store.read_json(url)
    return manifest if all(manifest.get(k) == v for k, v in expected.items()) else None


def training_config(config: DemoConfig, train_data: str, out: str | None):
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
    return TrainConfig.from_dict(settings)


def dataset_name(config: DemoConfig) -> str:
    return config.dataset.rstrip("/").rsplit("/", 1)[-1]


def split_stage(config: DemoConfig) -> tuple[str, dict]:
    """Stage 1: the split folder and its query counts per split."""
    from retriever.pipelines.split import SplitConfig, split_dataset

    name = dataset_name(config)
    stage = console.Stage(1, STAGES, "split", f"{name}'s judged queries (test fraction "
                                              f"{config.test_fraction:.2f}, seed {config.seed})")
    out = store.join(store.default_root(), "datasets", f"{name}-split-s{config.seed}")
    split_config = SplitConfig(dataset=config.dataset, seed=config.seed,
                               test_fraction=config.test_fraction, out=out)
    manifest = finished(out, settings=cfg.to_dict(split_config)) or split_dataset(split_config)
    counts = {k: v["queries"] for k, v in manifest["counts"].items()}
    stage.done(f"{counts} queries -> {out}")
    return out, counts


def mine_stage(config: DemoConfig, split_out: str) -> str:
    """Stage 2: the folder of mined training examples."""
    from retriever.pipelines.mine import MineConfig, mine_split
    from retriever.training.mining import MiningConfig

    stage = console.Stage(2, STAGES, "mine", "hard negatives for the train queries "
                                             "(BM25 + dense MiniLM)")
    out = store.join(store.default_root(), "mined",
                     f"{dataset_name(config)}-split-s{config.seed}-train-minilm")
    mined = finished(out, dataset=split_out) or mine_split(MineConfig(
        dataset=split_out, split="train", out=out, mining=MiningConfig(seed=config.seed)))
    stage.done(f"{mined['count']} examples -> {out}")
    return out


def train_stage(config: DemoConfig, mined_out: str) -> str:
    """Stage 3: the fine-tuned model folder (merged, else the adapter)."""
    from retriever.training.run import print_step, train

    stage = console.Stage(3, STAGES, "fine-tune", f"{config.model} + LoRA ({config.strategy}, "
                                                  f"{config.num_workers} Ray Train workers)")
    train_config = training_config(config, mined_out, out=None)
    train_config.out = store.join(store.default_root(), "runs",
                                  f"demo-{dataset_name(config)}-{config.model}-"
                                  f"{train_config.fingerprint()}", "train")
    trained = finished(train_config.out, fingerprint=train_config.fingerprint())
    if trained:
        stage.note(f"reusing the finished run {train_config.out}")
    else:
        result = train(train_config, progress=print_step)
        if result.error or not result.manifest:
            raise StageFailed(f"training failed: {result.error}")
        trained = result.manifest
    merged = trained.get("merged") or trained["adapter"]
    stage.done(f"{trained.get('steps')} steps -> {merged}")
    return merged


def evaluate_stage(config: DemoConfig, split_out: str, test_queries: int, model: str) -> tuple[str, str]:
    """Stage 4: (the fine-tuned model's index folder, the report's markdown)."""
    stage = console.Stage(4, STAGES, "evaluate", f"on the {test_queries} held-out queries "
                                                 f"(encode with Ray Data, {config.shards}-shard "
                                                 f"{config.index_type} index, in-cluster search)")
    name, finetuned = dataset_name(config), f"{config.model}-lora"
    matrix = MatrixConfig(
        matrix_id=f"demo-{name}-s{config.seed}", baseline=config.model,
        models=["bm25", config.model, {"name": finetuned, "model": model}],
        datasets=[{"name": f"{name}-heldout", "path": split_out, "split": "test"}],
        shards=config.shards, index_type=config.index_type)
    records, markdown = run_matrix(matrix)
    ft_record = next(r for r in records if r.model == finetuned)
    index = store.read_json(store.join(ft_record.folder, "provenance.json"))["index"]
    stage.done(f"report: {os.path.dirname(ft_record.folder.rstrip('/')).rsplit('/', 1)[0]}"
               "/report.html")
    return index, markdown


def serve_stage(config: DemoConfig, serving: Serving, index: str, split_out: str) -> None:
    """Stage 5: deploy, answer the shortest held-out query over HTTP, then stop (or block)."""
    import httpx
    from ray import serve

    from retriever.io.formats import load_dataset

    console.quiet()  # importing Ray Serve set its console logger back to INFO
    stage = console.Stage(5, STAGES, "serve", "the fine-tuned index (Ray Serve: query "
                                              "encoder, shard searchers, router)")
    example = min(load_dataset(split_out, "test").judged_queries().values(), key=len)
    url = serving.start(index=index, docs=split_out, port=config.port)
    body = {"query": example, "top_k": 3}
    answer = httpx.post(f"{url}/search", json=body, timeout=60.0).raise_for_status().json()
    stage.note(f"search page: {url}/")
    stage.note(f"try:  curl -s {url}/search -H 'Content-Type: application/json' "
               f"-d '{json.dumps(body)}'")
    for hit in answer["hits"]:
        title = (hit.get("title") or hit.get("text") or "")[:70]
        stage.note(f"{hit['rank']}. {hit['doc_id']:>6}  {hit['score']:.3f}  {title}")
    mode = config.serve
    if mode == "auto":
        mode = "block" if sys.stdin.isatty() and sys.stdout.isatty() else "check"
    if mode == "block":
        stage.note("serving; Ctrl-C stops")
        serving.until_stopped()
    else:
        serve.shutdown()
    stage.done("served")


def run_demo(config: DemoConfig, serving: Serving) -> str:
    """All five stages (serve unless ``--serve off``); returns the NDCG@10 table."""
    if config.store:
        os.environ["RETRIEVER_STORE"] = config.store
    console.set_verbose(config.verbose)
    began = time.time()
    console.ray_init(include_dashboard=False)
    split_out, counts = split_stage(config)
    mined_out = mine_stage(config, split_out)
    model = train_stage(config, mined_out)
    index, markdown = evaluate_stage(config, split_out, counts["test"], model)
    if config.serve != "off":
        serve_stage(config, serving, index, split_out)
    table = markdown.split("## MRR@10")[0].strip()
    console.say(f"\n{table}\n")
    console.say(f"demo finished in {console.duration(time.time() - began)}")
    return table
