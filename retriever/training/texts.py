"""Training text rules = the Encoder's: the same prefixes, truncation and appended EOS.

A model is trained on exactly the token sequences it will later be evaluated and served on, so
training does not re-implement tokenization: :class:`TextTokenizer` is the
:class:`retriever.modeling.encoder.Encoder` minus its model (the backbone is built separately, under
DeepSpeed, by ``retriever.training.model``). :meth:`defaults` gives the settings to write next
to the exported weights (``retriever.json``), so ``resolve_model(export_dir)`` reproduces them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from retriever.modeling.encoder import Encoder, EncoderConfig
from retriever.modeling.registry import EncoderDefaults
from retriever.training.config import TRAINED_ENCODER_OPTIONS


class TextTokenizer(Encoder):
    """``Encoder.tokenize`` and padding without loading the backbone."""

    def _load_model(self):  # the backbone is built by the training code
        return None

    @property
    def dim(self) -> int:  # pragma: no cover - no model here
        raise AttributeError("TextTokenizer has no model")

    def defaults(self) -> EncoderDefaults:
        """The embedding settings in force, as defaults for the exported model."""
        return EncoderDefaults(pooling=self.pooling, query_prefix=self.query_prefix,
                               passage_prefix=self.passage_prefix,
                               query_max_length=self.query_max_length,
                               passage_max_length=self.passage_max_length,
                               append_eos=self.append_eos, normalize=self.normalize,
                               prompt=self.prompt)

    def batch(self, texts: Sequence[str], kind: str,
              device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded the tokenizer's way (left for most decoders)."""
        batch = self.tokenizer.pad({"input_ids": self.tokenize(texts, kind)}, return_tensors="pt")
        return {"input_ids": batch["input_ids"].to(device),
                "attention_mask": batch["attention_mask"].to(device)}


def text_tokenizer(model: str, **overrides) -> TextTokenizer:
    """A tokenizer with the model's defaults; ``None`` overrides are ignored."""
    fields = {k: v for k, v in overrides.items() if v is not None}
    return TextTokenizer(EncoderConfig(model=model, device="cpu", dtype="float32", **fields))


def training_texts(encoder: EncoderConfig) -> TextTokenizer:
    """The tokenizer of a training config's encoder options (``TrainConfig.encoder``: every
    one of ``TRAINED_ENCODER_OPTIONS``, the prompt included)."""
    return text_tokenizer(encoder.model, **{name: getattr(encoder, name)
                                            for name in TRAINED_ENCODER_OPTIONS
                                            if name != "model"})
