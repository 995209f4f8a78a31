"""The per-worker training loop that Ray Train runs on every worker.

One optimizer step: for each of ``gradient_accumulation_steps`` micro-steps, embed this worker's
queries and their passage groups, score every local query against the passages of all workers
(InfoNCE with in-batch, hard and cross-worker negatives), backward; then clip, step, schedule.
Metrics go to Ray Train every step (``ray.train.report``); every ``checkpoint_every`` steps and
at the end a checkpoint (see ``retriever.training.checkpoint``) goes with them, and a
restarted worker group continues from the latest one: ``ray.train.get_checkpoint()``.
At the end rank 0 exports the adapter and the merged model into the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from retriever.io import store
from retriever.training.losses import contrastive_loss, matryoshka_dims
from retriever.training.config import TrainConfig

log = logging.getLogger(__name__)


def _dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if config.dtype in ("float32", "fp32"):
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class MemoryPeak:
    """Peak memory of this worker since :meth:`start` (i.e. while training, not loading).

    GPU: CUDA's peak allocated bytes, reset at start. CPU: the process RSS, sampled every
    ``interval`` seconds by a daemon thread (the kernel's own high-water mark, ``ru_maxrss``,
    cannot be reset and would include the transient peak of loading the checkpoint).
    """

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.peak = 0
        self._stop = None

    def start(self) -> "MemoryPeak":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import threading

        import psutil

        process = psutil.Process()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                self._stop.wait(self.interval)

        threading.Thread(target=sample, name="memory-peak", daemon=True).start()
        return self

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.peak / 2**20

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


def _lifetime_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _comm_device() -> torch.device:
    """Where collective buffers must live: the GPU for nccl, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mean_across(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone().to(_comm_device())
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def export_defaults(texts, config: TrainConfig):
    """The embedding settings the exported model carries: the training ones, but for an
    explicit ``export_passage_max_length``."""
    defaults = texts.defaults()
    if config.export_passage_max_length:
        defaults = dataclasses.replace(defaults,
                                       passage_max_length=config.export_passage_max_length)
    return defaults


def query_keys(query_ids: list[str], device: torch.device) -> torch.Tensor:
    """A stable 63-bit integer per query id (the same on every worker), for the loss's mask."""
    import hashlib

    return torch.tensor([int.from_bytes(hashlib.blake2b(q.encode(), digest_size=8).digest(),
                                        "little") >> 1 for q in query_ids],
                        dtype=torch.long, device=device)


def _gather_ints(values: list[int]) -> list[list[int]]:
    return _gather(values, torch.long)


def _gather(values: list, dtype) -> list[list]:
    """``values`` of every rank, in rank order (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [list(values)]
    tensor = torch.tensor(values, dtype=dtype, device=_comm_device())
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return [t.cpu().tolist() for t in out]


def _workers() -> list[dict]:
    """Rank, node, host and pid of every worker (every rank gets the full list)."""
    import socket

    import ray

    me = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
          "host": socket.gethostname()}
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [{"rank": 0, **me}]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, me)
    return [{"rank": rank, **info} for rank, info in enumerate(out)]


def base_reference(model: str, resolved) -> str:
    """How exports name their base: a packaged name stays a name, anything else a path."""
    from retriever.modeling.registry import PACKAGED

    return model if model in PACKAGED else resolved.path


@dataclasses.dataclass
class WorkerState:
    """What one worker builds in setup and carries through resume, training and export."""

    config: TrainConfig
    out: str
    train_data: str
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    sampler: Any = None
    total: int = 0  # optimizer steps of the whole run
    texts: Any = None  # retriever.training.texts tokenizer, with .resolved and the defaults
    base_ref: str = ""
    ds_config: dict | None = None  # None: DDP
    backbone: Any = None
    peft_model: Any = None
    module: Any = None  # EmbeddingModel
    engine: Any = None
    start_step: int = 0
    history: list = dataclasses.field(default_factory=list)
    resumes: list = dataclasses.field(default_factory=list)
    partition: dict = dataclasses.field(default_factory=dict)
    workers: list = dataclasses.field(default_factory=list)

    @property
    def resolved(self):
        return self.texts.resolved


def train_loop_per_worker(payload: dict) -> None:
    worker = _start_worker(payload)
    _load_texts(worker)
    _configure_deepspeed(worker)
    _build_peft_model(worker)
    restored = _resume_state(worker)
    names = _build_engine(worker, restored)
    _describe_partition(worker, names)
    _train(worker)
    _finish(worker)


# ---------------------------------------------------------------------------- setup

def _start_worker(payload: dict) -> WorkerState:
    """This worker's rank, device and precision, seeded, with its sampler over the data."""
    import ray.train
    import ray.train.torch

    from retriever.io.formats import load_training_examples
    from retriever.training.batches import GroupSampler

    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    worker = WorkerState(config=config, out=payload["out"], train_data=payload["train_data"],
                         rank=context.get_world_rank(), world=context.get_world_size(),
                         device=device, dtype=_dtype(config, device))
    torch.manual_seed(config.seed)

    examples = load_training_examples(worker.train_data)
    worker.sampler = GroupSampler(examples, group_size=config.group_size,
                                  per_device=config.per_device_batch_size,
                                  world_size=worker.world,
                                  accumulation=config.gradient_accumulation_steps,
                                  seed=config.seed, per_positive=config.per_positive,
                                  source=worker.train_data)
    worker.total = worker.sampler.total_steps(config.epochs, config.max_steps)
    return worker


def _load_texts(worker: WorkerState) -> None:
    from retriever.training.texts import training_texts

    config = worker.config
    worker.texts = training_texts(config.encoder)
    worker.base_ref = base_reference(config.model, worker.resolved)


def _configure_deepspeed(worker: WorkerState) -> None:
    """For ZeRO-2/3: join DeepSpeed's comm layer and set ``worker.ds_config``; DDP: nothing."""
    config = worker.config
    if config.strategy == "ddp":
        return
    import deepspeed

    from retriever.training.engines import deepspeed_config
    from retriever.training.model import hidden_size

    # DeepSpeed's comm layer adopts the process group Ray Train set up (gloo / nccl).
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized()
                               else None)
    worker.ds_config = deepspeed_config(
        stage=int(config.strategy[-1]), micro_batch=config.per_device_batch_size,
        accumulation=config.gradient_accumulation_steps, world_size=worker.world,
        max_grad_norm=config.max_grad_norm, bf16=worker.dtype == torch.bfloat16,
        hidden_size=hidden_size(worker.resolved),
        persistence_threshold=config.zero3_persistence_threshold,
        max_live_parameters=config.zero3_max_live_parameters)


def _build_peft_model(worker: WorkerState) -> None:
    """The backbone with a fresh LoRA adapter, or with the exported adapter it continues."""
    from retriever.training.lora import apply_lora, lora_config
    from retriever.training.model import build_backbone

    config, resolved = worker.config, worker.resolved
    # DeepSpeed keeps fp32 master weights itself, so its model may be stored in bf16; DDP keeps
    # fp32 weights (the optimizer updates them) and computes under autocast.
    weight_dtype = worker.dtype if worker.ds_config is not None else torch.float32
    worker.backbone = build_backbone(resolved, weight_dtype, worker.ds_config,
                                     config.gradient_checkpointing)
    model = worker.backbone.model
    if resolved.adapter_path:  # continue training an exported adapter
        from peft import PeftModel

        worker.peft_model = PeftModel.from_pretrained(model, resolved.adapter_path,
                                                      is_trainable=True)
    else:
        worker.peft_model = apply_lora(model,
                                       lora_config(model, config.lora_r, config.lora_alpha,
                                                   config.lora_dropout,
                                                   config.lora_target_modules),
                                       config.seed)


def _resume_state(worker: WorkerState):
    """Read Ray Train's latest checkpoint, if any: set the start step, history and resumes,
    and return ``(weights, optimizer_tensors)`` for the engine (None without a checkpoint)."""
    import ray.train

    from retriever.training.checkpoint import read_state
    from retriever.training.export import load_adapter_weights

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    config = worker.config
    with checkpoint.as_directory() as directory:
        state, optimizer_tensors = read_state(directory)
        changed = config.differences(state.get("config", {}))
        if changed:
            raise ValueError(f"checkpoint {checkpoint.path} was written with other training "
                             f"settings {changed} (then, now); use a new --out or --run-id")
        weights = load_adapter_weights(directory, worker.peft_model)
    worker.start_step, worker.history = int(state["step"]), list(state.get("history", []))
    worker.resumes = list(state.get("resumes", [])) + [
        {"from_step": worker.start_step, "world_size": worker.world,
         "strategy": config.strategy, "time": time.time()}]
    return weights, optimizer_tensors


def _build_engine(worker: WorkerState, restored) -> dict:
    """Optimizer, schedule and strategy engine, with the restored state loaded; returns the
    trainable parameters by name."""
    from retriever.training.engines import build_engine, lr_lambda
    from retriever.training.model import EmbeddingModel

    config, texts = worker.config, worker.texts
    names = {p: n for n, p in worker.peft_model.named_parameters() if p.requires_grad}
    worker.module = EmbeddingModel(worker.peft_model, texts.pooling, texts.normalize)
    optimizer = torch.optim.AdamW(list(names), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * worker.total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(worker.total, warmup, config.schedule, offset=worker.start_step))
    dtype = worker.dtype
    worker.engine = build_engine(config.strategy, worker.module, names, optimizer, scheduler,
                                 ds_config=worker.ds_config,
                                 accumulation=config.gradient_accumulation_steps,
                                 max_grad_norm=config.max_grad_norm, device=worker.device,
                                 autocast_dtype=dtype if dtype != torch.float32 else None)
    if restored is not None:
        weights, optimizer_tensors = restored
        worker.engine.load_weights(weights)
        if optimizer_tensors:
            worker.engine.load_optimizer_state(optimizer_tensors, worker.start_step)
    return names


def _describe_partition(worker: WorkerState, names: dict) -> None:
    """Who holds which parameters, and which workers there are (collectives), logged once."""
    from retriever.training.engines import partition_report

    shards = _gather_ints(list(partition_report(worker.module).values()))
    worker.partition = {
        "params_full": shards[0][0], "params_held": [s[1] for s in shards],
        "params_materialized": [s[2] for s in shards],
        "trainable": int(sum(int(getattr(p, "ds_numel", p.numel())) for p in names))}
    worker.workers = _workers()
    if worker.rank == 0:
        log.info("training %s with %s on %d workers: %d steps (start %d), partition %s",
                 worker.resolved.name, worker.config.strategy, worker.world, worker.total,
                 worker.start_step, worker.partition)


# ---------------------------------------------------------------------------- train

def _train(worker: WorkerState) -> None:
    """Every remaining optimizer step, each reported to Ray Train, with a checkpoint every
    ``checkpoint_every`` steps and at the end."""
    import ray.train

    memory_peak = MemoryPeak(worker.device).start()
    worker.module.train()
    for step in range(worker.start_step, worker.total):
        metrics = _optimizer_step(worker, step, memory_peak)
        worker.history.append({k: metrics[k] for k in ("step", "loss", "lr", "step_s",
                                                       "peak_memory_mb")})
        if (step + 1) % worker.config.checkpoint_every == 0 or step + 1 == worker.total:
            _save_checkpoint(worker, step + 1, metrics)
        else:
            ray.train.report(metrics)
    memory_peak.stop()


def _optimizer_step(worker: WorkerState, step: int, memory_peak: MemoryPeak) -> dict:
    """All micro-steps of optimizer step ``step``; returns its metrics."""
    config = worker.config
    started = time.perf_counter()
    torch.manual_seed(config.seed * 1_000_003 + step)  # dropout masks survive a resume
    lr = worker.engine.lr()
    loss_sum = torch.zeros((), dtype=torch.float32)
    for micro in range(config.gradient_accumulation_steps):
        loss_sum += _micro_step(worker, step, micro)
    mean_loss = _mean_across(loss_sum / config.gradient_accumulation_steps)
    memory = _gather([memory_peak.mb(), _lifetime_peak_rss_mb()], torch.float64)
    elapsed = time.perf_counter() - started
    return _step_metrics(worker, step, mean_loss, lr, elapsed, memory)


def _micro_step(worker: WorkerState, step: int, micro: int) -> torch.Tensor:
    """Embed, score and backpropagate this rank's micro-batch; returns its loss (CPU)."""
    from retriever.training.gradcache import cached_backward

    config, engine, device = worker.config, worker.engine, worker.device
    batch = worker.sampler.micro_batch(step, micro, worker.rank)
    q = worker.texts.batch(batch.queries, "query", device)
    p = worker.texts.batch(batch.passages, "passage", device)
    last = micro == config.gradient_accumulation_steps - 1
    loss_fn = loss_function(worker, batch.query_ids)
    if config.grad_cache_chunk:
        loss = cached_backward(engine, q, p, loss_fn, config.grad_cache_chunk, last, device)
    else:
        with engine.accumulate(last):
            q_vectors, p_vectors = engine(q["input_ids"], q["attention_mask"],
                                          p["input_ids"], p["attention_mask"])
            loss = loss_fn(q_vectors, p_vectors)
            engine.backward(loss)
    engine.step()
    return loss.detach().float().cpu()


def loss_function(worker: WorkerState, query_ids: list[str]):
    """``(query vectors, passage vectors) -> loss`` for this micro-batch: InfoNCE with
    in-batch, hard and (if on) cross-worker negatives, over the Matryoshka prefixes if any."""
    import functools

    config = worker.config
    return functools.partial(contrastive_loss, temperature=config.temperature,
                             group_size=config.group_size,
                             gather=config.gather_negatives and worker.world > 1,
                             query_keys=query_keys(query_ids, worker.device),
                             dims=config.matryoshka_dims, weights=config.matryoshka_weights)


def _step_metrics(worker: WorkerState, step: int, mean_loss: float, lr: float, elapsed: float,
                  memory: list[list[float]]) -> dict:
    """What Ray Train gets after optimizer step ``step`` (``memory``: per rank, the peak
    since training began and the lifetime peak RSS)."""
    config = worker.config
    queries_per_step = (config.per_device_batch_size * worker.world
                        * config.gradient_accumulation_steps)
    return {"step": step + 1, "total_steps": worker.total,
            "epoch": worker.sampler.epoch_of(step + 1),
            "loss": mean_loss, "lr": lr, "step_s": elapsed,
            "samples_per_s": queries_per_step / max(elapsed, 1e-9),
            "peak_memory_mb": [row[0] for row in memory],
            "peak_rss_lifetime_mb": [row[1] for row in memory],
            "strategy": config.strategy,
            "world_size": worker.world,
            "resumed_from": worker.resumes[-1]["from_step"] if worker.resumes else None,
            "partition": worker.partition, "workers": worker.workers}


# ---------------------------------------------------------------------------- checkpoints

def _state_payload(worker: WorkerState, step: int) -> dict:
    """The run's state after ``step`` steps, as checkpoints and the export record it."""
    config = worker.config
    return {"step": step, "total_steps": worker.total, "epoch": worker.sampler.epoch_of(step),
            "fingerprint": config.fingerprint(), "strategy": config.strategy,
            "world_size": worker.world, "workers": worker.workers, "history": worker.history,
            "resumes": worker.resumes,
            "config": config.to_dict(), "train_data": worker.train_data}


def _save_checkpoint(worker: WorkerState, step: int, metrics: dict) -> None:
    """Report ``metrics`` with a checkpoint (adapter + optimizer state) written by rank 0."""
    import ray.train

    from retriever.training.checkpoint import write_state
    from retriever.training.export import write_adapter

    weights = worker.engine.full_weights()  # collectives: every rank takes part
    optimizer_state = worker.engine.full_optimizer_state()
    rank0 = worker.rank == 0
    directory = tempfile.mkdtemp(prefix="ckpt-") if rank0 else None
    try:
        if rank0:
            write_adapter(directory, worker.peft_model, weights,
                          export_defaults(worker.texts, worker.config), worker.base_ref)
            write_state(directory, optimizer_state, _state_payload(worker, step))
        ray.train.report(metrics, checkpoint=(ray.train.Checkpoint.from_directory(directory)
                                              if rank0 else None))
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------- export

def _finish(worker: WorkerState) -> None:
    """Export (rank 0 writes; gathering the weights is a collective), then wait for all."""
    config = worker.config
    if config.export:
        weights = worker.engine.full_weights()
        worker.backbone.release()
        if worker.rank == 0:
            export(worker.out, worker.peft_model, weights, worker.texts, worker.resolved,
                   worker.base_ref, config, _state_payload(worker, worker.total),
                   worker.partition, merge=config.merge)
    if dist.is_initialized():
        dist.barrier()


def export(out: str, peft_model, weights: dict, texts, resolved, base_ref: str,
           config: TrainConfig, state: dict, partition: dict, merge: bool) -> None:
    """Write ``adapter/``, ``merged/``, ``metrics.jsonl`` and ``manifest.json`` (last)."""
    import json

    from retriever.training.export import merge_adapter, upload_dir, write_adapter
    from retriever.training.model import hidden_size

    defaults = export_defaults(texts, config)
    provenance = {"train_data": state["train_data"], "fingerprint": config.fingerprint(),
                  "steps": state["total_steps"]}
    if config.matryoshka_dims:  # the prefixes it was trained to embed with (Encoder dims=)
        provenance["matryoshka_dims"] = matryoshka_dims(config.matryoshka_dims,
                                                        hidden_size(resolved))
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        adapter = os.path.join(scratch, "adapter")
        write_adapter(adapter, peft_model, weights, defaults, base_ref, trained=provenance)
        upload_dir(adapter, store.join(out, "adapter"))
        if merge:
            merged = os.path.join(scratch, "merged")
            merge_adapter(adapter, resolved.path, merged, defaults, base_ref, trained=provenance)
            upload_dir(merged, store.join(out, "merged"))
    lines = "".join(json.dumps(row) + "\n" for row in state["history"])
    store.write_text(store.join(out, "metrics.jsonl"), lines)
    store.write_json(store.join(out, "manifest.json"), {
        "kind": "train", "model": config.model, "base_model": base_ref,
        "base_model_hash": resolved.fingerprint(), "adapter": store.join(out, "adapter"),
        "merged": store.join(out, "merged") if merge else None,
        "steps": state["total_steps"], "epochs": state["epoch"],
        "final_loss": state["history"][-1]["loss"] if state["history"] else None,
        "resumes": state["resumes"], "strategy": config.strategy,
        "world_size": state["world_size"], "workers": state["workers"], "partition": partition,
        "train_data": state["train_data"], "settings": config.to_dict(),
        "embedding": {k: v for k, v in defaults.__dict__.items()},
        "fingerprint": config.fingerprint(), "finished": time.time()})
