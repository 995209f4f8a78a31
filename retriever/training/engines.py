"""Three data-parallel strategies behind one interface: DeepSpeed ZeRO-3, ZeRO-2, torch DDP.

- ZeRO-3 (Rajbhandari et al. 2020) partitions parameters, gradients and optimizer state across
  workers. The backbone is built under transformers' ``HfDeepSpeedConfig`` (see
  ``retriever.training.model``), so ``from_pretrained`` loads each weight straight into its
  partition; with LoRA the frozen base weights are partitioned too, and every forward gathers
  them layer by layer.
- ZeRO-2 partitions gradients and optimizer state; every worker holds all parameters.
- DDP: torch ``DistributedDataParallel``, every worker holds everything, gradients all-reduced.

All three use the same torch ``AdamW`` (handed to DeepSpeed as a client optimizer, so no
DeepSpeed op has to be compiled on a CPU machine), the same warmup + decay schedule and the
same gradient clipping, so with the same seed and data their losses agree to float precision.

State for checkpoints is exchanged in a rank-independent form: full (gathered) fp32 trainable
weights and full Adam moments per parameter name. A checkpoint can therefore be resumed with
another number of workers or another strategy, and is stored as safetensors, not pickles.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.distributed as dist

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------- schedule

def lr_lambda(total_steps: int, warmup_steps: int, schedule: str,
              offset: int = 0) -> Callable[[int], float]:
    """LR multiplier for optimizer step ``offset + s``: linear warmup, then linear / cosine
    decay to 0 or constant. ``offset`` is the step a resumed run starts from."""

    def factor(s: int) -> float:
        step = offset + s
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


# ---------------------------------------------------------------------------- DeepSpeed config

def deepspeed_config(stage: int, micro_batch: int, accumulation: int, world_size: int,
                     max_grad_norm: float, bf16: bool, hidden_size: int,
                     persistence_threshold: int | None = None,
                     max_live_parameters: int | None = None) -> dict:
    """A complete DeepSpeed config (no "auto" values) for ZeRO ``stage`` 2 or 3."""
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage {stage}: expected 2 or 3")
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                  "reduce_bucket_size": max(hidden_size * hidden_size, 1 << 16)}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": (10 * hidden_size
                                                   if persistence_threshold is None
                                                   else persistence_threshold),
            # Release gathered weights once used (and do not keep them for reuse) beyond about
            # two layers' worth: DeepSpeed's defaults (1e9 elements) keep a model below a
            # billion parameters gathered whole, i.e. ZeRO-3 would then save no memory at all.
            "stage3_max_live_parameters": (20 * hidden_size * hidden_size
                                           if max_live_parameters is None
                                           else max_live_parameters),
            "stage3_max_reuse_distance": (20 * hidden_size * hidden_size
                                          if max_live_parameters is None
                                          else max_live_parameters),
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    else:
        zero.update({"allgather_bucket_size": max(hidden_size * hidden_size, 1 << 16),
                     "reduce_scatter": True})
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        # The optimizer is torch AdamW passed in by us (works on CPU without compiled ops).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------------- engines

class Engine:
    """What the training loop needs from a strategy.

    Per micro-step: ``with engine.accumulate(last)``: ``engine(**batch)`` then
    ``engine.backward(loss)``; then ``engine.step()`` (updates at accumulation boundaries).
    GradCache calls ``backward`` once per chunk, each inside ``accumulate(last)`` with
    ``last`` true only for the final chunk of the final micro-step: gradients are synchronised
    (DDP) or reduced at the boundary (DeepSpeed) exactly once per optimizer step.
    """

    strategy: str
    module: torch.nn.Module  # the unwrapped model (EmbeddingModel)

    def __init__(self, module: torch.nn.Module, names: dict[torch.nn.Parameter, str]):
        self.module = module
        self.names = names  # trainable parameter -> name, as in the adapter's state dict

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def accumulate(self, last_micro_step: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Full fp32 gradients of the trainable weights by name, after the boundary backward and
        before ``step``; a collective (for checks such as GradCache against no caching)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- state (collective)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Full fp32 trainable weights by name; a collective: every rank must call it."""
        raise NotImplementedError

    def full_optimizer_state(self) -> dict[str, torch.Tensor]:
        """``{"<name>.exp_avg": ..., "<name>.exp_avg_sq": ...}``; collective."""
        raise NotImplementedError

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        """Restore Adam moments (after ``steps`` optimizer steps); collective."""
        raise NotImplementedError

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite trainable weights (incl. any fp32 master copy); collective."""
        raise NotImplementedError


class DDPEngine(Engine):
    strategy = "ddp"

    def __init__(self, module, names, optimizer, scheduler, accumulation: int,
                 max_grad_norm: float, device: torch.device, autocast_dtype=None):
        super().__init__(module, names)
        from torch.nn.parallel import DistributedDataParallel

        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.autocast_dtype = autocast_dtype
        self.device = device
        module.to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(module, device_ids=ids)
        else:
            self.wrapped = module
        self.micro = 0

    def __call__(self, *args, **kwargs):
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self.wrapped(*args, **kwargs)
        return self.wrapped(*args, **kwargs)

    def accumulate(self, last_micro_step: bool):
        if last_micro_step or not hasattr(self.wrapped, "no_sync"):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accumulation:
            return
        params = [p for p in self.names]
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def full_gradients(self):
        return {name: p.grad.detach().float().cpu().clone() for p, name in self.names.items()
                if p.grad is not None}

    def full_weights(self):
        return {name: p.detach().float().cpu().clone() for p, name in self.names.items()}

    def full_optimizer_state(self):
        out = {}
        for p, name in self.names.items():
            state = self.optimizer.state.get(p, {})
            for key in ADAM_STATE_KEYS:
                if key in state:
                    out[f"{name}.{key}"] = state[key].detach().float().cpu().clone()
        return out

    def load_weights(self, tensors):
        with torch.no_grad():
            for p, name in self.names.items():
                p.copy_(tensors[name].to(p.device, p.dtype))

    def load_optimizer_state(self, tensors, steps):
        for p, name in self.names.items():
            self.optimizer.state[p] = {
                "step": torch.tensor(float(steps)),
                **{key: tensors[f"{name}.{key}"].to(p.device, torch.float32).reshape(p.shape)
                   .clone() for key in ADAM_STATE_KEYS}}


class DeepSpeedEngine(Engine):
    def __init__(self, module, names, optimizer, scheduler, ds_config: dict):
        super().__init__(module, names)
        import deepspeed

        self.stage = ds_config["zero_optimization"]["stage"]
        self.strategy = f"zero{self.stage}"
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @contextlib.contextmanager
    def accumulate(self, last_micro_step: bool):
        # Said explicitly for every backward (DeepSpeed's own counter assumes one backward per
        # micro-step; GradCache makes several): reduce and step only at the last one.
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        yield

    def backward(self, loss):
        self.engine.backward(loss)

    def full_gradients(self):
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for p, name in self.names.items():
            grad = safe_get_full_grad(p)  # ZeRO-3: a collective
            if grad is not None:
                out[name] = grad.detach().float().cpu().clone()
        return out

    def step(self):
        self.engine.step()

    def lr(self):
        return float(self.engine.get_lr()[0])

    def full_weights(self):
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone()
                for p, name in self.names.items()}

    def _ensure_optimizer_state(self, steps: int) -> None:
        """Adam state exists only after a first step; create it (zeros) so it can be set."""
        zero = self.optimizer  # DeepSpeedZeroOptimizer(_Stage3)
        inner = zero.optimizer  # the torch AdamW over flat fp32 partitions
        flats = (zero.fp32_partitioned_groups_flat if self.stage == 3
                 else zero.single_partition_of_fp32_groups)
        for flat in flats:
            state = inner.state[flat]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(float(steps))
                for key in ADAM_STATE_KEYS:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            else:
                state["step"] = torch.tensor(float(steps))
        if self.stage != 3:
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def full_optimizer_state(self):
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.stage != 3 and not getattr(self.optimizer, "_hp_optimizer_states_linked", True):
            return {}  # no optimizer step taken yet
        out = {}
        for p, name in self.names.items():
            for key in ADAM_STATE_KEYS:
                value = safe_get_full_optimizer_state(p, key)
                if value is not None:
                    out[f"{name}.{key}"] = value.detach().float().cpu().clone()
        return out

    def load_weights(self, tensors):
        from deepspeed.utils import safe_set_full_fp32_param

        for p, name in self.names.items():
            value = tensors[name].to(torch.float32)
            safe_set_full_fp32_param(p, value.to(p.device) if p.numel() else value)
        if self.stage == 3:
            # Copy the fp32 master partitions back into the (possibly bf16) model partitions.
            zero = self.optimizer
            for i in range(len(zero.fp16_partitioned_groups_flat)):
                zero.fp16_partitioned_groups_flat[i].data.copy_(
                    zero.fp32_partitioned_groups_flat[i].data)
        else:
            with torch.no_grad():
                for p, name in self.names.items():
                    p.copy_(tensors[name].to(p.device, p.dtype))

    def load_optimizer_state(self, tensors, steps):
        from deepspeed.utils import safe_set_full_optimizer_state

        self._ensure_optimizer_state(steps)
        for p, name in self.names.items():
            for key in ADAM_STATE_KEYS:
                safe_set_full_optimizer_state(p, tensors[f"{name}.{key}"].to(torch.float32), key)


def build_engine(strategy: str, module: torch.nn.Module, names: dict, optimizer, scheduler,
                 *, ds_config: dict | None, accumulation: int, max_grad_norm: float,
                 device: torch.device, autocast_dtype=None) -> Engine:
    if strategy == "ddp":
        return DDPEngine(module, names, optimizer, scheduler, accumulation, max_grad_norm,
                         device, autocast_dtype)
    if ds_config is None:
        raise ValueError(f"strategy {strategy!r} needs a DeepSpeed config")
    return DeepSpeedEngine(module, names, optimizer, scheduler, ds_config)


def partition_report(module: torch.nn.Module) -> dict[str, int]:
    """How many parameter elements this worker holds, against the model's full size.

    Under ZeRO-3 a parameter's ``ds_tensor`` is this worker's partition and ``data`` is empty
    between forwards; otherwise every element is held locally.
    """
    full = held = materialized = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        full += numel
        materialized += int(p.numel())
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel())
    return {"params_full": full, "params_held": held, "params_materialized": materialized}
