"""Tiny random backbones and training examples for the training/mining mechanics tests.

The backbones are real Hugging Face models (a 2-layer BERT with the MiniLM tokenizer, a 2-layer
Llama with the SmolLM2 tokenizer), randomly initialised from a fixed seed and saved as model
directories with ``retriever.json``, so every code path (HfDeepSpeedConfig loading, LoRA,
export, the Encoder) runs as it does for the packaged models, only in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("wing flow heat shock boundary layer pressure plate shell buckling supersonic "
         "laminar turbulent cylinder cone nozzle jet vortex panel flutter").split()


def tiny_bert(directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retriever.modeling.registry import EncoderDefaults, resolve_model, write_settings

    directory = Path(directory)
    if (directory / "retriever.json").exists():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm").path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_settings(directory, EncoderDefaults(pooling="mean", query_max_length=32,
                                              passage_max_length=64))
    return directory


def tiny_llama(directory: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from retriever.modeling.registry import DECODER_DEFAULTS, resolve_model, write_settings
    from dataclasses import replace

    directory = Path(directory)
    if (directory / "retriever.json").exists():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_settings(directory, replace(DECODER_DEFAULTS, query_max_length=32,
                                      passage_max_length=64))
    return directory


def examples_file(path: Path, n: int = 64, negatives: int = 6, seed: int = 0) -> Path:
    """Synthetic training examples: a positive shares the query's words, negatives do not."""
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w") as handle:
        for i in range(n):
            query = " ".join(rng.choice(WORDS) for _ in range(5))
            positive = query + " " + " ".join(rng.choice(WORDS) for _ in range(8))
            handle.write(json.dumps({
                "query_id": str(i), "query": query, "positives": [positive],
                "negatives": [" ".join(rng.choice(WORDS) for _ in range(12))
                              for _ in range(negatives)]}) + "\n")
    return path
