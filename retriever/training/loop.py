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

import logging
import os
import resource
import shutil
import tempfile
import time
import torch
import torch.distributed as dist

from retriever.io import store
from retriever.training.losses import info_nce
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
    import dataclasses

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


def train_loop_per_worker(payload: dict) -> None:
    import ray.train
    import ray.train.torch

    from retriever.io.formats import load_training_examples
    from retriever.training.batches import GroupSampler
    from retriever.training.checkpoint import read_state, write_state
    from retriever.training.engines import (build_engine, deepspeed_config, lr_lambda,
                                            partition_report)
    from retriever.training.export import load_adapter_weights, write_adapter
    from retriever.training.lora import apply_lora, lora_config
    from retriever.training.model import EmbeddingModel, build_backbone, hidden_size
    from retriever.training.texts import text_tokenizer

    config = TrainConfig(**payload["config"])
    out, train_data = payload["out"], payload["train_data"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = _dtype(config, device)
    torch.manual_seed(config.seed)

    examples = load_training_examples(train_data)
    sampler = GroupSampler(examples, group_size=config.group_size,
                           per_device=config.per_device_batch_size, world_size=world,
                           accumulation=config.gradient_accumulation_steps, seed=config.seed,
                           per_positive=config.per_positive, source=train_data)
    total = sampler.total_steps(config.epochs, config.max_steps)
    warmup = int(config.warmup_ratio * total)

    texts = text_tokenizer(config.model, pooling=config.pooling,
                           query_prefix=config.query_prefix, passage_prefix=config.passage_prefix,
                           query_max_length=config.query_max_length,
                           passage_max_length=config.passage_max_length)
    resolved = texts.resolved
    base_ref = base_reference(config.model, resolved)
    ds_config = None
    if config.strategy != "ddp":
        import deepspeed

        # DeepSpeed's comm layer adopts the process group Ray Train set up (gloo / nccl).
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized()
                                   else None)
        ds_config = deepspeed_config(
            stage=int(config.strategy[-1]), micro_batch=config.per_device_batch_size,
            accumulation=config.gradient_accumulation_steps, world_size=world,
            max_grad_norm=config.max_grad_norm, bf16=dtype == torch.bfloat16,
            hidden_size=hidden_size(resolved),
            persistence_threshold=config.zero3_persistence_threshold,
            max_live_parameters=config.zero3_max_live_parameters)
    # DeepSpeed keeps fp32 master weights itself, so its model may be stored in bf16; DDP keeps
    # fp32 weights (the optimizer updates them) and computes under autocast.
    weight_dtype = dtype if ds_config is not None else torch.float32
    backbone = build_backbone(resolved, weight_dtype, ds_config, config.gradient_checkpointing)
    if resolved.adapter_path:  # continue training an exported adapter
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(backbone.model, resolved.adapter_path,
                                               is_trainable=True)
    else:
        peft_model = apply_lora(backbone.model,
                                lora_config(backbone.model, config.lora_r, config.lora_alpha,
                                            config.lora_dropout, config.lora_target_modules),
                                config.seed)

    # ------------------------------------------------------------------ resume
    start_step, history, resumes, restored = 0, [], [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, optimizer_tensors = read_state(directory)
            changed = config.differences(state.get("config", {}))
            if changed:
                raise ValueError(f"checkpoint {checkpoint.path} was written with other training "
                                 f"settings {changed} (then, now); use a new --out or --run-id")
            weights = load_adapter_weights(directory, peft_model)
        start_step, history = int(state["step"]), list(state.get("history", []))
        resumes = list(state.get("resumes", [])) + [
            {"from_step": start_step, "world_size": world, "strategy": config.strategy,
             "time": time.time()}]
        restored = (weights, optimizer_tensors)

    names = {p: n for n, p in peft_model.named_parameters() if p.requires_grad}
    module = EmbeddingModel(peft_model, texts.pooling, texts.normalize)
    optimizer = torch.optim.AdamW(list(names), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, warmup, config.schedule, offset=start_step))
    engine = build_engine(config.strategy, module, names, optimizer, scheduler,
                          ds_config=ds_config, accumulation=config.gradient_accumulation_steps,
                          max_grad_norm=config.max_grad_norm, device=device,
                          autocast_dtype=dtype if dtype != torch.float32 else None)
    if restored is not None:
        weights, optimizer_tensors = restored
        engine.load_weights(weights)
        if optimizer_tensors:
            engine.load_optimizer_state(optimizer_tensors, start_step)
    shards = _gather_ints(list(partition_report(module).values()))
    partition = {"params_full": shards[0][0], "params_held": [s[1] for s in shards],
                 "params_materialized": [s[2] for s in shards],
                 "trainable": int(sum(int(getattr(p, "ds_numel", p.numel())) for p in names))}
    workers = _workers()
    if rank == 0:
        log.info("training %s with %s on %d workers: %d steps (start %d), partition %s",
                 resolved.name, config.strategy, world, total, start_step, partition)

    def state_payload(step: int) -> dict:
        return {"step": step, "total_steps": total, "epoch": sampler.epoch_of(step),
                "fingerprint": config.fingerprint(), "strategy": config.strategy,
                "world_size": world, "workers": workers, "history": history,
                "resumes": resumes,
                "config": config.to_dict(), "train_data": train_data}

    def save_checkpoint(step: int, metrics: dict) -> None:
        weights = engine.full_weights()  # collectives: every rank takes part
        optimizer_state = engine.full_optimizer_state()
        directory = tempfile.mkdtemp(prefix="ckpt-") if rank == 0 else None
        try:
            if rank == 0:
                write_adapter(directory, peft_model, weights, export_defaults(texts, config),
                              base_ref)
                write_state(directory, optimizer_state, state_payload(step))
            ray.train.report(metrics, checkpoint=(ray.train.Checkpoint.from_directory(directory)
                                                  if rank == 0 else None))
        finally:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------ train
    memory_peak = MemoryPeak(device).start()
    module.train()
    group = config.group_size
    queries_per_step = config.per_device_batch_size * world * config.gradient_accumulation_steps
    for step in range(start_step, total):
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout masks survive a resume
        lr = engine.lr()
        loss_sum = torch.zeros((), dtype=torch.float32)
        for micro in range(config.gradient_accumulation_steps):
            batch = sampler.micro_batch(step, micro, rank)
            q = texts.batch(batch.queries, "query", device)
            p = texts.batch(batch.passages, "passage", device)
            last = micro == config.gradient_accumulation_steps - 1
            with engine.accumulate(last):
                q_vectors, p_vectors = engine(q["input_ids"], q["attention_mask"],
                                              p["input_ids"], p["attention_mask"])
                loss = info_nce(q_vectors, p_vectors, config.temperature, group,
                                gather=config.gather_negatives and world > 1,
                                query_keys=query_keys(batch.query_ids, device))
                engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float().cpu()
        mean_loss = _mean_across(loss_sum / config.gradient_accumulation_steps)
        memory = _gather([memory_peak.mb(), _lifetime_peak_rss_mb()], torch.float64)
        elapsed = time.perf_counter() - started
        metrics = {"step": step + 1, "total_steps": total, "epoch": sampler.epoch_of(step + 1),
                   "loss": mean_loss, "lr": lr, "step_s": elapsed,
                   "samples_per_s": queries_per_step / max(elapsed, 1e-9),
                   "peak_memory_mb": [row[0] for row in memory],
                   "peak_rss_lifetime_mb": [row[1] for row in memory],
                   "strategy": config.strategy,
                   "world_size": world, "resumed_from": resumes[-1]["from_step"] if resumes
                   else None, "partition": partition, "workers": workers}
        history.append({k: metrics[k] for k in ("step", "loss", "lr", "step_s",
                                                "peak_memory_mb")})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(step + 1, metrics)
        else:
            ray.train.report(metrics)

    memory_peak.stop()

    # ------------------------------------------------------------------ export
    if config.export:
        weights = engine.full_weights()
        backbone.release()
        if rank == 0:
            export(out, peft_model, weights, texts, resolved, base_ref, config,
                   state_payload(total), partition, merge=config.merge)
    if dist.is_initialized():
        dist.barrier()


def export(out: str, peft_model, weights: dict, texts, resolved, base_ref: str,
           config: TrainConfig, state: dict, partition: dict, merge: bool) -> None:
    """Write ``adapter/``, ``merged/``, ``metrics.jsonl`` and ``manifest.json`` (last)."""
    import json

    from retriever.training.export import merge_adapter, upload_dir, write_adapter

    defaults = export_defaults(texts, config)
    provenance = {"train_data": state["train_data"], "fingerprint": config.fingerprint(),
                  "steps": state["total_steps"]}
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
