"""The Python half of ``scripts/gpu-check.sh``: bundle the files a bare GPU machine reads, and
measure the Encoder there against sentence-transformers.

    python benchmarks/gpu_check.py prepare .whl          # here: models/ and data/ of the bundle
    python benchmarks/gpu_check.py bench OUT.json        # on the GPU (after the GPU tier)

``prepare`` writes, under the bundle folder, ``models/<name>/`` for MiniLM, SmolLM2 and
Qwen2.5-Coder-0.5B (config.json, tokenizer files, ``retriever.json`` with the encoder
defaults, sentence-transformers' files for MiniLM; never weights, which do not fit in the
64 MiB that travels) and ``data/scifact-corpus.jsonl.gz`` (SciFact's texts).

``bench`` encodes SciFact's passages (``title + " " + text``) on the GPU in bf16 with the
Encoder and with ``SentenceTransformer.encode`` wrapping the same model (same max length,
batch size, prefixes), for the MiniLM and the Qwen2.5-Coder-0.5B architectures (seeded random
weights from the bundle's configs where the real ones are absent: the arithmetic and the
speed are the same), and reports docs/s, tokens/s (the Encoder's token count for both; the
timings include tokenization for both, after a warm-up), the Encoder's share of the GPU's
dense bf16 peak (2 x parameters x tokens / time / peak) and the two encoders' agreement.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gpu.models import ARCHITECTURES, bundle, model_dir  # noqa: E402

BENCH_MODELS = ("minilm", "qwen2.5-coder-0.5b")
BATCH_SIZE = 64
# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name;
# $GPU_PEAK_BF16_TFLOPS overrides it.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}
WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")


# --------------------------------------------------------------------------- prepare

def _copy_without_weights(source: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=lambda _, names: [
        n for n in names if n.endswith(WEIGHTS) or n == "README.md"])


def _config_from_gguf(name: str, target: Path) -> None:
    """config.json + tokenizer from the packaged GGUF's metadata (no dequantisation)."""
    from transformers import AutoConfig, AutoTokenizer

    from retriever.modeling import registry

    model = registry.PACKAGED[name]
    with tempfile.TemporaryDirectory() as scratch:
        gguf = Path(scratch) / f"{name}.gguf"
        with open(gguf, "wb") as out:
            for package, relative in model.gguf.package_parts:
                with open(registry._package_dir(package) / relative, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        config = AutoConfig.from_pretrained(scratch, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _legacy_rope_theta(config_file: Path) -> None:
    """transformers 5 writes ``rope_parameters``; 4.x reads ``rope_theta``: write both."""
    config = json.loads(config_file.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def prepare_models(folder: Path) -> None:
    from retriever.modeling import registry

    for name in ARCHITECTURES:
        target = folder / "models" / name
        model = registry.PACKAGED[name]
        converted = registry.cache_root() / "models" / name
        if (target / registry.SETTINGS_FILE).exists() and not os.environ.get("REFRESH"):
            continue  # prepared before (REFRESH=1 redoes it)
        if model.package:
            _copy_without_weights(registry._package_dir(model.package) / model.subdir, target)
        elif (converted / "config.json").exists():
            _copy_without_weights(converted, target)
        else:
            _config_from_gguf(name, target)
        _legacy_rope_theta(target / "config.json")
        registry.write_settings(target, model.defaults, source=f"{model.description}: "
                                "config and tokenizer only (weights built on the GPU machine)")
        print(f"prepare: {target} ({sum(f.stat().st_size for f in target.rglob('*') if f.is_file()) / 2**20:.1f} MiB)")


def prepare_data(folder: Path) -> None:
    from tests.helpers import dataset

    target = folder / "data" / "scifact-corpus.jsonl.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(dataset("scifact")) / "corpus.jsonl.gz", target)
    print(f"prepare: {target}")


# --------------------------------------------------------------------------- bench

def scifact_texts() -> list[str]:
    path = bundle() / "data" / "scifact-corpus.jsonl.gz"
    if not path.exists():
        from tests.helpers import dataset

        path = Path(dataset("scifact")) / "corpus.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [f"{r.get('title', '')} {r.get('text', '')}".strip() for r in rows]


def peak_bf16(name: str) -> float | None:
    if os.environ.get("GPU_PEAK_BF16_TFLOPS"):
        return float(os.environ["GPU_PEAK_BF16_TFLOPS"]) * 1e12
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def timed(fn, warm_up) -> tuple[object, float]:
    import torch

    warm_up()
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def sentence_transformer(encoder):
    """sentence-transformers around the Encoder's model directory: same max length, pooling,
    normalisation, bf16 weights on the GPU."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(encoder.resolved.path,
                                     max_seq_length=encoder.passage_max_length)
    mode = {"last": "lasttoken", "cls": "cls", "mean": "mean"}[encoder.pooling]
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), mode)]
    if encoder.normalize:
        modules.append(models.Normalize())
    return SentenceTransformer(modules=modules, device="cuda").to(dtype=torch.bfloat16)


def bench_model(name: str, texts: list[str], workdir: Path) -> dict:
    import numpy as np
    import torch

    from retriever.modeling.encoder import Encoder

    encoder = Encoder(model=model_dir(name, workdir), device="cuda", dtype="bfloat16",
                      batch_size=BATCH_SIZE)
    tokens = sum(len(r) for r in encoder.tokenize(texts, "passage"))
    ours, ours_s = timed(lambda: encoder.encode_passages(texts),
                         lambda: encoder.encode_passages(texts[:BATCH_SIZE]))
    params = sum(p.numel() for p in encoder.model.parameters())
    peer = sentence_transformer(encoder)
    prefixed = [encoder.passage_prefix + t for t in texts]
    theirs, theirs_s = timed(
        lambda: peer.encode(prefixed, batch_size=BATCH_SIZE, convert_to_numpy=True),
        lambda: peer.encode(prefixed[:BATCH_SIZE], batch_size=BATCH_SIZE))
    theirs = np.asarray(theirs, dtype=np.float32)
    agree = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1)
                                      * np.linalg.norm(theirs, axis=1))
    peak = peak_bf16(torch.cuda.get_device_name())
    result = {
        "model": encoder.resolved.name, "weights": "packaged" if encoder.resolved.name == name
        else "random (from config.json)", "docs": len(texts), "tokens": tokens,
        "max_length": encoder.passage_max_length, "batch_size": BATCH_SIZE,
        "max_tokens_per_batch": encoder.config.max_tokens_per_batch, "parameters": params,
        "encoder": {"seconds": ours_s, "docs_per_s": len(texts) / ours_s,
                    "tokens_per_s": tokens / ours_s},
        "sentence_transformers": {"seconds": theirs_s, "docs_per_s": len(texts) / theirs_s,
                                  "tokens_per_s": tokens / theirs_s},
        "speedup": theirs_s / ours_s, "cosine_mean": float(agree.mean()),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "bf16_peak_flops": peak,
        "mfu": 2 * params * tokens / ours_s / peak if peak else None,
    }
    del encoder, peer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def bench(out: Path) -> dict:
    import torch

    texts = scifact_texts()
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "corpus": "scifact", "models": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        for name in BENCH_MODELS:
            summary["models"][name] = result = bench_model(name, texts, Path(workdir))
            print(f"bench {name}: Encoder {result['encoder']['docs_per_s']:.0f} docs/s "
                  f"{result['encoder']['tokens_per_s']:.0f} tokens/s | sentence-transformers "
                  f"{result['sentence_transformers']['docs_per_s']:.0f} docs/s | x"
                  f"{result['speedup']:.2f} | MFU {result['mfu'] or float('nan'):.1%}",
                  flush=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("prepare", "bench"):
        print(__doc__)
        return 2
    if argv[0] == "prepare":
        folder = Path(argv[1])
        prepare_models(folder)
        prepare_data(folder)
    else:
        bench(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
