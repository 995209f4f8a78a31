"""Export a trained LoRA: the adapter directory and the merged model directory.

Both load with ``resolve_model`` / ``retriever eval --model DIR`` / the encode job:

- adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft layout) +
  ``retriever.json`` naming the base model (a packaged name or a path) and the embedding
  settings the adapter was trained with;
- merged: the base with the LoRA update folded into its weights (``save_pretrained``,
  safetensors), the tokenizer, ``retriever.json``, and the sentence-transformers layout of the
  same settings (``retriever.modeling.st_layout``: modules, pooling, prompts, for decoders a
  tokenizer that appends EOS), so ``SentenceTransformer(merged)`` embeds as the Encoder does.
  A model trained with the one-word prompt (``prompt: one-word``) gets no such layout: the
  prompt wraps the text in a chat template, which the layout's prefixes cannot express, and a
  loader that read the layout would embed otherwise; ``retriever.json`` records the prompt.

Each directory gets ``identity.json`` last (the sha256 of every file in it,
``retriever.modeling.identity``): its content identity, which the model caches key by.
Directories are written locally, then copied file by file into the store (any fsspec URL),
``retriever.json`` and then ``identity.json`` last, so a directory with them is complete.
Reading one back goes through the model cache (``retriever.modeling.registry.local_copy`` /
``resolve_model``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from retriever.io import store
from retriever.modeling import st_layout
from retriever.modeling.identity import IDENTITY_FILE, write_identity
from retriever.modeling.registry import SETTINGS_FILE, EncoderDefaults, write_settings


def write_adapter(directory: str | Path, peft_model, weights: dict[str, torch.Tensor],
                  defaults: EncoderDefaults | None = None, base_model: str | None = None,
                  **extra) -> None:
    """``weights``: full trainable tensors named as in ``peft_model.named_parameters()``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, state_dict=dict(weights))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config["default"]
    if base_model:
        config.base_model_name_or_path = base_model
    config.save_pretrained(str(directory))
    if defaults is not None:
        write_settings(directory, defaults, base_model=base_model, **extra)
    write_identity(directory)


def load_adapter_weights(directory: str | Path, peft_model) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.safetensors`` into ``peft_model``'s (not yet partitioned) LoRA
    weights; returns them by parameter name."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"{directory}: adapter weights {unexpected[:3]} do not fit the model")
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def merge_adapter(adapter_dir: str | Path, base_path: str, out_dir: str | Path,
                  defaults: EncoderDefaults, base_model: str, **extra) -> None:
    """Fold the LoRA update into a fresh fp32 copy of the base and save a model directory."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    out_dir = Path(out_dir)
    model = AutoModel.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    layout = defaults.prompt == "none"
    if layout:
        tokenizer = st_layout.prepare_tokenizer(tokenizer, defaults, base_model)
    tokenizer.save_pretrained(str(out_dir))
    if layout:  # after the tokenizer: it rewrites tokenizer_config.json's class
        st_layout.write_config(out_dir, defaults, model.config.hidden_size)
    write_settings(out_dir, defaults, merged_from=base_model, **extra)
    write_identity(out_dir)


def upload_dir(local: str | Path, url: str) -> None:
    """Copy a local directory tree into the store; ``retriever.json`` and manifests, then
    ``identity.json`` last."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    last = {SETTINGS_FILE: 1, "manifest.json": 1, IDENTITY_FILE: 2}
    for path in sorted(files, key=lambda p: (last.get(p.name, 0), str(p))):
        rel = path.relative_to(local).as_posix()
        with open(path, "rb") as src, store.open_write(store.join(url, rel), "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
