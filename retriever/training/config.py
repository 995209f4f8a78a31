"""The training configuration: one typed dataclass, shared by the job (flags / YAML) and the
workers (it travels to them as a plain dict).

Sizes: every worker takes ``per_device_batch_size`` queries per micro-step, each with a group of
``group_size`` passages (its positive, then ``group_size - 1`` hard negatives); one optimizer
step consumes ``per_device_batch_size x num_workers x gradient_accumulation_steps`` queries.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from retriever.config import build, flat, to_dict
from retriever.modeling.encoder import EncoderConfig

STRATEGIES = ("zero3", "zero2", "ddp")
SCHEDULES = ("linear", "cosine", "constant")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRAINED_ENCODER_OPTIONS = ("model", "pooling", "query_prefix", "passage_prefix",
                           "query_max_length", "passage_max_length", "prompt")


@dataclass
class TrainConfig:
    """Contrastive LoRA fine-tuning of a retriever on Ray Train (DeepSpeed ZeRO-3 by default)."""

    train_data: str = field(metadata={
        "help": "training examples: a JSONL/parquet file or a `retriever mine` output folder"})
    # How text is embedded: the model and its pooling, prefixes and max lengths (the Encoder's
    # own options; precision and batching are the trainer's, below).
    encoder: EncoderConfig = flat(EncoderConfig, only=TRAINED_ENCODER_OPTIONS)
    out: str | None = field(default=None, metadata={
        "help": "run folder URL (default <store>/runs/<run-id>/train); checkpoints, adapter, "
                "merged model and metrics go here; an existing run is resumed"})
    run_id: str | None = field(default=None, metadata={
        "help": "run name (default: model + data + a hash of the settings)"})
    # ---------------------------------------------------------------- cluster
    strategy: str = field(default="zero3", metadata={
        "help": "zero3 | zero2 (DeepSpeed) | ddp (torch DistributedDataParallel)",
        "choices": list(STRATEGIES)})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers"})
    use_gpu: bool | None = field(default=None, metadata={
        "help": "one GPU per worker; default: when the cluster has enough GPUs"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    worker_resources: dict[str, float] | None = field(default=None, metadata={
        "help": "custom Ray resources per worker, as JSON (e.g. {\"gpu_a10g\": 1}: the node "
                "group's own resource, which the autoscaler launches nodes for)"})
    placement_strategy: str = field(default="PACK", metadata={
        "help": "placement group strategy for the workers", "choices": list(PLACEMENTS)})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts (from the last checkpoint) before giving up"})
    worker_env: dict[str, str] | None = field(default=None, metadata={
        "help": "extra environment variables for the workers, as JSON (e.g. NCCL or allocator "
                "settings)"})
    # ---------------------------------------------------------------- optimisation
    epochs: float = field(default=1.0, metadata={"help": "passes over the examples"})
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps (overrides epochs)"})
    per_device_batch_size: int = field(default=8, metadata={
        "help": "queries per worker per micro-step"})
    group_size: int = field(default=8, metadata={
        "help": "passages per query: 1 positive + group_size-1 hard negatives"})
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps warming up"})
    schedule: str = field(default="linear", metadata={"help": "lr decay after warmup",
                                                      "choices": list(SCHEDULES)})
    max_grad_norm: float = field(default=1.0, metadata={"help": "0 disables clipping"})
    temperature: float = field(default=0.01, metadata={"help": "InfoNCE temperature"})
    gather_negatives: bool = field(default=True, metadata={
        "help": "score every worker's passages as negatives (all_gather with gradients)"})
    per_positive: bool = field(default=False, metadata={
        "help": "one training item per (query, positive) pair instead of per query"})
    gradient_checkpointing: bool = True
    grad_cache_chunk: int | None = field(default=None, metadata={
        "help": "GradCache (Gao et al. 2021): embed the micro-batch without a graph in chunks "
                "of this many texts, take the loss on the whole batch, then re-embed chunk by "
                "chunk with the cached embedding gradients; memory of one chunk, the gradients "
                "of the whole batch (default: off)"})
    matryoshka_dims: list[int] | None = field(default=None, metadata={
        "help": "Matryoshka (Kusupati et al. 2022): also train these embedding prefixes, e.g. "
                "[64, 128, 256] (the full size is always added); the loss is their weighted sum"})
    matryoshka_weights: list[float] | None = field(default=None, metadata={
        "help": "one weight per Matryoshka dimension, the full size last (default: all 1)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16"})
    seed: int = 0
    # ---------------------------------------------------------------- LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "default: all projections (decoders), query/key/value/dense (BERT-style)"})
    export_passage_max_length: int | None = field(default=None, metadata={
        "help": "passage max length written into the exported model's settings, i.e. used when "
                "it encodes (default: the training length); training on shorter passages than "
                "are encoded is a cheap speed trade-off"})
    # ---------------------------------------------------------------- checkpoints and export
    checkpoint_every: int = field(default=100, metadata={
        "help": "steps between checkpoints (one is always written at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in the store"})
    zero3_persistence_threshold: int | None = field(default=None, metadata={
        "help": "ZeRO-3 leaves parameters smaller than this unpartitioned "
                "(default 10 x hidden size)"})
    zero3_max_live_parameters: int | None = field(default=None, metadata={
        "help": "ZeRO-3 releases gathered parameters beyond this many elements (default "
                "20 x hidden size^2, about two layers; DeepSpeed's own default, 1e9, keeps a "
                "small model gathered whole and saves no memory)"})
    export: bool = field(default=True, metadata={"help": "write adapter/ and merged/ at the end"})
    merge: bool = field(default=True, metadata={"help": "also export the merged model"})

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.placement_strategy not in PLACEMENTS:
            raise ValueError(f"placement_strategy {self.placement_strategy!r}: expected one of "
                             f"{', '.join(PLACEMENTS)}")
        positive = ("num_workers", "per_device_batch_size", "gradient_accumulation_steps",
                    "lora_r", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 (the positive), got {self.group_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self._check_gradient_options()
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise ValueError(f"dtype {self.dtype!r}: expected auto, float32 or bfloat16")

    def _check_gradient_options(self) -> None:
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ValueError(f"grad_cache_chunk must be >= 1, got {self.grad_cache_chunk}")
        dims = self.matryoshka_dims or []
        if any(d < 1 for d in dims) or dims != sorted(set(dims)):
            raise ValueError(f"matryoshka_dims {dims}: expected increasing positive sizes")
        if self.matryoshka_weights is not None:
            if not dims:
                raise ValueError("matryoshka_weights given without matryoshka_dims")
            if any(w < 0 for w in self.matryoshka_weights) or sum(self.matryoshka_weights) <= 0:
                raise ValueError(f"matryoshka_weights {self.matryoshka_weights}: expected "
                                 "non-negative weights, not all 0")

    @property
    def model(self) -> str:
        return self.encoder.model

    def to_dict(self) -> dict:
        """The flat settings (as in a ``--config`` file); they travel to the workers."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> "TrainConfig":
        return build(cls, settings)

    # Settings a run may change when it is resumed: where it is written, how often it
    # checkpoints, how many times it may fail, where it runs, and its length (a finished run
    # can be extended with more steps or epochs).
    RESUMABLE_CHANGES = ("out", "run_id", "max_failures", "checkpoint_every", "keep_checkpoints",
                         "export", "merge", "placement_strategy", "cpus_per_worker", "use_gpu",
                         "epochs", "max_steps", "zero3_persistence_threshold",
                         "zero3_max_live_parameters", "worker_env", "worker_resources",
                         "export_passage_max_length", "grad_cache_chunk")
    # Options added later that are off by default: left out of essential() while off, so the
    # fingerprints (and default run ids) of runs without them stay what they were.
    OPTIONAL_WHEN_OFF = ("matryoshka_dims", "matryoshka_weights")

    def essential(self) -> dict:
        """The settings that must stay the same for a run to be resumed."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RESUMABLE_CHANGES
                and not (k in self.OPTIONAL_WHEN_OFF and v is None)}

    def fingerprint(self) -> str:
        """A short hash of :meth:`essential`."""
        return hashlib.sha256(json.dumps(self.essential(), sort_keys=True).encode()
                              ).hexdigest()[:8]

    def differences(self, saved: dict) -> dict:
        """Essential settings that differ from a checkpoint's saved config: name -> (then, now)."""
        now = self.essential()
        return {k: (saved.get(k), v) for k, v in now.items()
                if k in saved and saved.get(k) != v}
