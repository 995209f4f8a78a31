"""One device/dtype policy for the whole system.

- CUDA present: ``cuda`` with bf16 (fp16 on GPUs without bf16), nccl for collectives.
- CPU with native bf16 matmul (AMX or AVX512-BF16): bf16 autocast for inference; the quality
  cost is measured by ``benchmarks/bf16_quality.py``, and fp32 stays one option away.
- Any other CPU: fp32. Collectives on CPU use gloo.
Training on CPU always runs in fp32 (bf16 there is only used for inference).

Queries have their own precision (:func:`pick_query_dtype`): fp32 on CPU, the device's dtype on
CUDA. On CPU, queries are a tiny share of the encode work and latency-bound on short inputs,
and fp32 keeps a served answer independent of the batch a query is padded into: bf16
rounding turns a different order of fp32 sums (other padding and blocking) into ~1e-3
differences between query vectors (a SciFact query alone vs in a
batch: 7.7e-4 under bf16, 1.1e-7 in fp32), enough to swap close neighbours.

Whether a GPU may be used is decided where the work runs, not in the driver that schedules
it: inside a Ray task or actor, by the GPUs Ray assigned to it (none when it asked for none,
whatever the node holds); elsewhere by the CUDA devices the process sees
(:func:`usable_gpu_count`). :func:`gpus_to_request` is the driver's half: how many GPUs a
task should ask Ray for.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16 (oneDNN's fast bf16 paths)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def cpu_threads_per_actor(cpus: float) -> int:
    """Torch threads per CPU encoder actor on a node of ``cpus`` CPUs (actors = cpus // this).

    One thread a process up to 4 CPUs: single-thread actors never wait at intra-op barriers,
    which matters most on a busy machine where a descheduled thread stalls its siblings
    (``benchmarks/encode_throughput.py --actors 1 --threads-per-actor 2`` measures the other
    layout). Larger nodes get 4 threads an actor, so there are fewer copies of the model."""
    return 1 if cpus <= 4 else 4


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    return device


def named_dtype(requested: str, option: str = "dtype") -> torch.dtype | None:
    """The torch dtype a setting names (``None`` for "auto"); a ValueError naming ``option``
    (the setting's name: ``dtype``, ``query_dtype``) for any other value."""
    if requested == "auto":
        return None
    if requested not in _DTYPES:
        raise ValueError(f"{option} {requested!r}: expected auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[requested]


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The compute dtype for inference on ``device`` (passages; queries: pick_query_dtype)."""
    named = named_dtype(requested)
    if named is not None:
        return named
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def pick_query_dtype(device: torch.device, requested: str = "auto",
                     passages: torch.dtype | None = None) -> torch.dtype:
    """The compute dtype for queries on ``device``: under "auto", fp32 on CPU (see the module
    docstring) and the passages' dtype (``passages``, default :func:`pick_dtype`'s) on CUDA,
    where one half-size weight copy then serves both kinds at GPU speed (ask "float32" there
    for answers that do not depend on batching: fp32 weights, passages autocast)."""
    named = named_dtype(requested, "query_dtype")
    if named is not None:
        return named
    if device.type == "cuda":
        return passages or pick_dtype(device)
    return torch.float32


def ray_assigned_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned to the calling task or actor; ``None`` outside a Ray worker
    (no Ray, or the driver). Ray is not imported here when the caller has not used it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    from ray._private.worker import WORKER_MODE

    if getattr(context.worker, "mode", None) != WORKER_MODE:
        return None
    return [str(i) for i in context.get_accelerator_ids().get("GPU", [])]


def usable_gpu_count() -> int:
    """GPUs the calling code may use: Ray's assignment inside a task or actor, else the CUDA
    devices this process sees."""
    assigned = ray_assigned_gpu_ids()
    if assigned is not None:
        return len(assigned)
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_to_request(setting: str | bool = "auto") -> int:
    """GPUs a Ray task should ask for under a ``gpu`` setting: ``yes``/True one, ``no``/False
    none, ``auto`` one when the Ray cluster has GPUs (wherever the driver itself runs)."""
    if isinstance(setting, bool) or setting in ("yes", "no"):
        return int(setting in (True, "yes"))
    if setting != "auto":
        raise ValueError(f"gpu {setting!r}: expected auto, yes or no")
    import ray

    return int(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1)


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: weights stay fp32 on CPU; compute uses autocast, in
    ``dtype`` for passages and ``query_dtype`` for queries."""

    device: torch.device
    dtype: torch.dtype
    query_dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto",
                query_dtype: str = "auto") -> "Placement":
        dev = pick_device(device)
        passages = pick_dtype(dev, dtype)
        return cls(dev, passages, pick_query_dtype(dev, query_dtype, passages))

    @property
    def weight_dtype(self) -> torch.dtype:
        # On GPU, store weights in the compute dtype (halves memory) when both kinds share it;
        # on CPU (or two precisions) keep fp32 weights and autocast, which on CPU is both
        # faster and closer to fp32 results than bf16 weights.
        shared = self.dtype == self.query_dtype
        return self.dtype if self.device.type == "cuda" and shared else torch.float32

    def compute_dtype(self, kind: str = "passage") -> torch.dtype:
        """The precision texts of ``kind`` ("query" or "passage") are embedded in."""
        if kind not in ("query", "passage"):
            raise ValueError(f"kind {kind!r}: expected 'query' or 'passage'")
        return self.query_dtype if kind == "query" else self.dtype

    def autocast(self, kind: str = "passage"):
        dtype = self.compute_dtype(kind)
        if dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)
