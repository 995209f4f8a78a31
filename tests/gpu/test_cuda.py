"""The GPU tier (``-m gpu``): what only a CUDA device can show. Skipped, with the reason, where
there is none; ``scripts/gpu-check.sh`` runs it on a bare GPU machine.

- The Encoder on CUDA in bf16 against CPU fp32 (cosine >= 0.999) for the three packaged
  architectures (MiniLM, SmolLM2, Qwen2.5-Coder-0.5B; seeded random weights built from their
  configs where the weights are not installed, see ``tests/gpu/models.py``).
- One training step of the engine in bf16 under ZeRO-3 and under DDP in one process (world
  size 1, no Ray) with LoRA: the losses agree within bf16 tolerance (ZeRO keeps bf16 weights,
  DDP fp32 weights under autocast), and a checkpoint written after the first step resumes to
  the same second step. (The project has no GradCache to include.)
- The encode path's batching on GPU: length-sorted batches under the token budget, the same
  vectors as one text at a time, and nothing compiled per batch.

Needs torch, transformers, peft (and DeepSpeed for ZeRO-3); not Ray, FAISS or pyarrow.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch

from tests.gpu.models import ARCHITECTURES, model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA: this machine has no CUDA device "
                              "(scripts/gpu-check.sh runs the GPU tier on one)"),
]

QUERIES = ["What lowers blood pressure in adults?", "gene expression in T cells",
           "Does vitamin D prevent fractures?", "CRISPR off-target effects"]
PASSAGES = [
    "Regular aerobic exercise lowered systolic blood pressure by 5 mmHg in a trial of 400 "
    "adults with stage 1 hypertension over six months.",
    "Single-cell RNA sequencing of CD4+ T cells reveals distinct activation states.",
    "Vitamin D supplementation alone did not reduce the risk of hip fractures.",
    "Guide RNA mismatches near the PAM sequence produce most off-target cleavage events, "
    "which high-fidelity Cas9 variants reduce to undetectable levels in human cells.",
    "A short one.", "Mitochondrial DNA copy number declines with age in skeletal muscle.",
    "Interferon signalling shapes the early response to influenza infection.",
    "Obesity is associated with increased risk of type 2 diabetes in every cohort studied.",
]
BF16_LOSS_TOLERANCE = 0.05  # InfoNCE at temperature 0.05: logits carry 20x the vectors' error
LEARNING_RATE = 1e-4  # small: random backbones make a large first step chaotic


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-models")


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------- Encoder

@pytest.mark.parametrize("name", ARCHITECTURES)
def test_encoder_bf16_on_cuda_matches_cpu_fp32(name, workdir):
    from retriever.modeling.encoder import Encoder

    path = model_dir(name, workdir)
    cuda = Encoder(model=path, device="cuda", dtype="bfloat16")
    assert next(cuda.model.parameters()).dtype == torch.bfloat16
    on_gpu = {k: cuda.encode(t, k) for k, t in (("query", QUERIES), ("passage", PASSAGES))}
    del cuda
    _free()
    cpu = Encoder(model=path, device="cpu", dtype="float32")
    for kind, texts in (("query", QUERIES), ("passage", PASSAGES)):
        agree = cosines(on_gpu[kind], cpu.encode(texts, kind))
        assert agree.min() >= 0.999, (name, kind, agree.round(5).tolist())


def test_encode_batches_on_gpu_under_the_token_budget(workdir):
    from retriever.modeling.encoder import Encoder, token_budget_batches

    encoder = Encoder(model=model_dir("minilm", workdir), device="cuda", dtype="bfloat16",
                      batch_size=16, max_tokens_per_batch=512)
    rng = np.random.default_rng(0)
    texts = [" ".join(["protein"] * int(n)) for n in rng.integers(1, 120, size=60)]
    shapes: list[tuple[int, int]] = []
    hook = encoder.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    vectors = encoder.encode_passages(texts)
    lengths = [len(r) for r in encoder.tokenize(texts, "passage")]
    expected = list(token_budget_batches(lengths, 16, 512))
    assert len(shapes) == len(expected)
    for (rows, width), batch in zip(shapes, expected):
        assert rows == len(batch) and width == max(lengths[i] for i in batch)
        assert rows * width <= 512 or rows == 1, "padded tokens within the budget"
    hook.remove()
    alone = np.stack([encoder.encode_passages([t])[0] for t in texts[:8]])
    assert cosines(alone, vectors[:8]).min() >= 0.999, "batching (padding) changes nothing"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before, \
        "nothing is compiled per batch shape"


# --------------------------------------------------------------------------- training engines

@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """World size 1 in this process (nccl), as Ray Train would set it up for one worker."""
    import torch.distributed as dist

    # DeepSpeed's init_distributed looks for these (else it tries MPI discovery); the group
    # itself meets through a file, so the port is never bound
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        os.environ.setdefault(key, value)
    torch.cuda.set_device(0)
    if not dist.is_initialized():
        rendezvous = tmp_path_factory.mktemp("process-group") / "rendezvous"
        dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=0,
                                world_size=1)
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


def make_engine(strategy: str, path: str, device: torch.device, dtype: torch.dtype):
    """The trainer's own pieces (retriever.training.loop): backbone, LoRA, AdamW, engine."""
    from retriever.modeling.registry import resolve_model
    from retriever.training.engines import build_engine, deepspeed_config, lr_lambda
    from retriever.training.lora import apply_lora, lora_config
    from retriever.training.model import EmbeddingModel, build_backbone, hidden_size

    resolved = resolve_model(path)
    ds_config = None
    if strategy != "ddp":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        ds_config = deepspeed_config(stage=int(strategy[-1]), micro_batch=len(QUERIES),
                                     accumulation=1, world_size=1, max_grad_norm=1.0,
                                     bf16=dtype == torch.bfloat16,
                                     hidden_size=hidden_size(resolved))
    # as in the loop: DeepSpeed keeps fp32 masters itself and a bf16 model; DDP fp32 weights
    backbone = build_backbone(resolved, dtype if ds_config else torch.float32, ds_config)
    model = apply_lora(backbone.model, lora_config(backbone.model, 8, 16, 0.0), seed=0)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    module = EmbeddingModel(model, resolved.defaults.pooling, True)
    optimizer = torch.optim.AdamW(list(names), lr=LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 0, "constant"))
    engine = build_engine(strategy, module, names, optimizer, scheduler, ds_config=ds_config,
                          accumulation=1, max_grad_norm=1.0, device=device,
                          autocast_dtype=None if dtype == torch.float32 else dtype)
    return engine, backbone


def make_batch(path: str, device: torch.device) -> list[torch.Tensor]:
    """Query and passage ids and masks, with the model's prefixes (the Encoder's defaults)."""
    from transformers import AutoTokenizer

    from retriever.modeling.registry import resolve_model

    resolved = resolve_model(path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    out = []
    for texts, prefix in ((QUERIES, resolved.defaults.query_prefix),
                          (PASSAGES[:len(QUERIES)], resolved.defaults.passage_prefix)):
        batch = tokenizer([prefix + t for t in texts], padding=True, truncation=True,
                          max_length=64, return_tensors="pt")
        out += [batch["input_ids"].to(device), batch["attention_mask"].to(device)]
    return out


def train_step(engine, batch: list[torch.Tensor]) -> float:
    from retriever.training.losses import info_nce

    queries, passages = engine(*batch)
    loss = info_nce(queries, passages, temperature=0.05)
    engine.backward(loss)
    engine.step()
    return float(loss.detach().float().cpu())


def run_and_resume(strategy: str, path: str, device, dtype, checkpoint) -> dict:
    """Two steps; a checkpoint after the first, resumed by a fresh engine for the second."""
    from safetensors.torch import load_file, save_file

    from retriever.training.checkpoint import read_state, write_state

    batch = make_batch(path, device)
    engine, backbone = make_engine(strategy, path, device, dtype)
    first = train_step(engine, batch)
    write_state(checkpoint, engine.full_optimizer_state(), {"step": 1})
    save_file(engine.full_weights(), str(checkpoint / "weights.safetensors"))
    second = train_step(engine, batch)
    after = engine.full_weights()
    backbone.release()
    del engine, backbone
    _free()
    engine, backbone = make_engine(strategy, path, device, dtype)
    state, optimizer = read_state(checkpoint)
    engine.load_weights(load_file(str(checkpoint / "weights.safetensors")))
    engine.load_optimizer_state(optimizer, int(state["step"]))
    resumed = train_step(engine, batch)
    resumed_after = engine.full_weights()
    backbone.release()
    del engine, backbone
    _free()
    return {"losses": [first, second], "resumed": resumed, "after": after,
            "resumed_after": resumed_after}


def test_zero3_and_ddp_bf16_step_agree_and_resume(process_group, workdir, tmp_path):
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs DeepSpeed (gpu-check.sh ships it)")
    path = model_dir("smollm2-135m", workdir)
    runs = {}
    for strategy in ("ddp", "zero3"):
        (tmp_path / strategy).mkdir()
        runs[strategy] = run_and_resume(strategy, path, process_group, torch.bfloat16,
                                        tmp_path / strategy)
    ddp, zero3 = runs["ddp"]["losses"], runs["zero3"]["losses"]
    for a, b in zip(ddp, zero3):
        assert abs(a - b) <= BF16_LOSS_TOLERANCE, (ddp, zero3)
    for strategy, run in runs.items():
        assert abs(run["resumed"] - run["losses"][1]) <= 1e-3, (strategy, run["resumed"])
        for name, value in run["after"].items():
            torch.testing.assert_close(run["resumed_after"][name], value, atol=1e-4, rtol=1e-3)
