"""Driver side of training: build the Ray Train ``TorchTrainer`` and run it.

Ray Train keeps the run in ``<out>/checkpoints`` (its checkpoints plus the snapshot that lets
a new ``fit`` with the same folder resume from the latest one), with ``FailureConfig`` so a lost
worker restarts the worker group from the last checkpoint. GPUs are used when the cluster has
one per worker (nccl); otherwise the workers run on CPU (gloo).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from retriever.io import store
from retriever.ops import autoscale, local_ray
from retriever.ops.credentials import refuse_credentials
from retriever.errors import InputError
from retriever.training.config import TrainConfig

log = logging.getLogger(__name__)

RAY_RUN_NAME = "checkpoints"
# Where the store is, as the driver has it (workers read the examples and write the exports
# through the same fsspec URLs); only those set in the driver are passed. Never credentials:
# a runtime_env is shown by the dashboard, so workers use their node's own (instance role,
# Kubernetes Secret, or the environment a local Ray inherited from the process starting it).
STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
             "RETRIEVER_STORE", "RETRIEVER_CACHE")


@dataclass
class TrainResult:
    out: str
    manifest: dict | None
    metrics: dict
    checkpoint: str | None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).rstrip("/").rsplit("/", 1)[-1]) or "x"


def run_id(config: TrainConfig) -> str:
    return config.run_id or (f"{slug(config.model)}-{slug(config.train_data)}-"
                             f"{config.strategy}-{config.fingerprint()}")


def output_url(config: TrainConfig) -> str:
    return config.out or store.join(store.default_root(), "runs", run_id(config), "train")


def resolve_train_data(url: str) -> str:
    """A training-examples file, or a ``retriever mine`` folder (its ``manifest.json`` names
    the file). The examples are read once here so bad input fails before any worker starts."""
    from retriever.io.formats import DataFormatError, load_training_examples

    target = url
    if not url.endswith((".jsonl", ".jsonl.gz", ".parquet", ".json")):
        manifest = store.join(url, "manifest.json")
        if not store.exists(manifest):
            raise DataFormatError(url, "neither a training-examples file (.jsonl/.parquet) nor "
                                       "a `retriever mine` output folder with manifest.json")
        name = store.read_json(manifest).get("examples")
        if not name:
            raise DataFormatError(manifest, "names no 'examples' file")
        if store.has_scheme(name) or name.startswith(("/", "\\")):  # any URL: refused
            raise DataFormatError(manifest, f"'examples' {name!r} must name a file inside "
                                            "the folder, not a URL or an absolute path")
        target = store.join(url, name)  # refuses '..'
    if not store.exists(target):
        raise DataFormatError(target, "file not found")
    examples = load_training_examples(target)
    if not examples:
        raise InputError(f"{target}: no training examples")
    return target if store.has_scheme(target) else os.path.abspath(target)


def ray_storage(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig`` from a store URL."""
    if store.is_local(url):
        path = os.path.abspath(url.removeprefix("file://"))
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs

    fs, path = store.filesystem(url)
    if url.startswith(("s3://", "s3a://")):
        # Ray Train's controller and workers get this filesystem pickled: it carries where the
        # store is, never the driver's keys (each process finds its node's own credentials).
        import s3fs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {"endpoint_url": endpoint} if endpoint else {}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["client_kwargs"] = {"region_name": region}
        if options:
            fs = s3fs.S3FileSystem(**options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def cluster_has_gpus(count: int) -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= count


def progress_callback(queue):
    """A Ray Train callback (it runs in the controller actor) that puts a short summary of
    every step's report on ``queue`` (a ``ray.util.queue.Queue``) for the driver to show."""
    from ray.train import UserCallback

    class StepProgress(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = metrics[0] if metrics else {}
            if "step" in first:
                summary = {k: first.get(k) for k in ("step", "total_steps", "loss", "lr",
                                                     "samples_per_s", "resumed_from")}
                # Progress is best effort: a full or lost queue must not fail the run.
                with contextlib.suppress(Exception):
                    queue.put_nowait(summary | {"checkpoint": checkpoint is not None})

    return StepProgress()


def progress_queue():
    """The queue for :func:`progress_callback`, on the driver's node: left to the scheduler it
    may land on a worker node, and losing that node would lose the progress with it."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})


def print_step(step: dict) -> None:
    """The default progress for :func:`train` (``progress=print_step``): each step's summary
    through ``retriever.console`` (a bar on a terminal, else a line every few seconds)."""
    from retriever import console

    console.track("train", step["step"], step["total_steps"],
                  f"step {step['step']}/{step['total_steps']}  loss {step['loss']:.4f}  "
                  f"lr {step['lr']:.2e}  {step['samples_per_s']:.1f} queries/s"
                  + ("  [checkpoint]" if step["checkpoint"] else ""), unit="steps")


def worker_env(config: TrainConfig, use_gpu: bool) -> dict[str, str]:
    """The ``env_vars`` of the training workers' runtime env: device, store location and
    ``config.worker_env``; a credential there is refused (InputError)."""
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false",
           **{k: os.environ[k] for k in STORE_ENV if os.environ.get(k)},
           **{str(k): str(v) for k, v in (config.worker_env or {}).items()}}
    refuse_credentials(env, "training worker_env")
    return env


def build_trainer(config: TrainConfig, out: str, train_data: str, callbacks=(),
                  worker_loop=None):
    """The ``TorchTrainer`` running ``worker_loop`` (default: the training loop) on every
    worker with ``{"config", "out", "train_data"}``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from retriever.training.loop import train_loop_per_worker

    # Ray Train's controller collects each worker's report every health-check interval (2 s by
    # default) and a worker blocks until its previous report is taken: with a report per step,
    # that interval would cap the step rate. Propagated to the controller by Ray Train.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    local_ray.init()  # $RAY_ADDRESS under `ray job submit`, else a local Ray on loopback
    use_gpu = config.use_gpu if config.use_gpu is not None else cluster_has_gpus(
        config.num_workers)
    per_worker = {"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                  **(config.worker_resources or {})}
    autoscale.check_request(per_worker, config.num_workers, "training",
                            spread=config.placement_strategy == "STRICT_SPREAD")
    storage_path, storage_fs = ray_storage(out)
    payload = {"config": config.to_dict(), "out": out, "train_data": train_data}
    env = worker_env(config, use_gpu)
    return TorchTrainer(
        worker_loop or train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker,
                                     placement_strategy=config.placement_strategy),
        run_config=RunConfig(
            name=RAY_RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={"env_vars": env}, callbacks=list(callbacks)),
    )


def check_resumable(config: TrainConfig, out: str) -> None:
    """An existing run folder must have been trained with the same settings."""
    from retriever.training.checkpoint import STATE_FILE

    folder = store.join(out, RAY_RUN_NAME)
    for name in reversed(store.listdir(folder)):
        state_url = store.join(folder, name, STATE_FILE)
        if name.startswith("checkpoint_") and store.exists(state_url):
            changed = config.differences(store.read_json(state_url).get("config", {}))
            if changed:
                described = ", ".join(f"{k}: {then!r} -> {now!r}"
                                      for k, (then, now) in sorted(changed.items()))
                raise InputError(f"{out} holds a run with other training settings ({described});"
                                 " use a new --out or --run-id, or the same settings to resume it")
            return


def train(config: TrainConfig, progress=None) -> TrainResult:
    """Run (or resume) training; returns the run folder, its manifest and the last metrics.

    ``progress``: called in this process with each step's summary (see :func:`print_step`).
    """
    import threading

    out = output_url(config)
    train_data = resolve_train_data(config.train_data)
    check_resumable(config, out)
    if progress is None:
        result = build_trainer(config, out, train_data).fit()
    else:
        from ray.util.queue import Empty

        queue = progress_queue()
        finished = threading.Event()

        def drain():
            while not finished.is_set() or not queue.empty():
                try:
                    progress(queue.get(timeout=0.5))
                except Empty:
                    pass

        reader = threading.Thread(target=drain, name="train-progress", daemon=True)
        reader.start()
        try:
            result = build_trainer(config, out, train_data,
                                   callbacks=[progress_callback(queue)]).fit()
        finally:
            finished.set()
            reader.join(timeout=10)
            queue.shutdown()
    manifest_url = store.join(out, "manifest.json")
    manifest = store.read_json(manifest_url) if config.export and store.exists(manifest_url) \
        else None
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    error = str(result.error) if getattr(result, "error", None) else None
    return TrainResult(out=out, manifest=manifest, metrics=dict(result.metrics or {}),
                       checkpoint=checkpoint, error=error)
