"""The Encoder: a Hugging Face backbone (encoder model or decoder LLM) as a text embedder.

One class covers mean/cls pooling for BERT-style encoders (sentence-transformers compatible),
last-token (EOS) pooling for decoder LLMs with "Query: "/"Passage: " prefixes (RepLLaMA,
Ma et al. 2023), task instructions, and the zero-shot one-word prompt (PromptReps, Zhuang et
al. 2024). Queries and passages have separate prefixes and max lengths. Texts are tokenized
once, sorted by length and batched under a token budget, so little compute goes to padding.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator, Sequence

import numpy as np
import torch

from retriever.modeling.device import Placement, named_dtype
from retriever.modeling.registry import EncoderDefaults, ResolvedModel, resolve_model
from retriever.modeling.pooling import POOLINGS, embed
from retriever.modeling.prompts import PROMPT_MODES, Template, one_word_template, with_instruction

log = logging.getLogger(__name__)


RECORDED = "recorded"  # field metadata: the resolved value is in Encoder.settings()
PRECISIONS = {"dtype", "query_dtype"}  # recorded as resolved on the machine, never replayed


def _option(default, help_: str, recorded: bool = True, **metadata):
    return field(default=default, metadata={"help": help_, RECORDED: recorded, **metadata})


@dataclass
class EncoderConfig:
    """How to embed; ``None`` fields take the model's defaults (see ``retriever.modeling.registry``).

    Declared once here; every job that embeds text nests it (``retriever.config.flat``), so its
    fields are the ``--model``, ``--pooling``, ... flags and YAML keys of those jobs."""

    model: str = _option("minilm", "packaged model name (minilm, smollm2-135m, ...), HF model "
                                   "directory or LoRA adapter directory")
    pooling: str | None = _option(None, "mean | cls | last (default: the model's)")
    query_prefix: str | None = _option(None, "text put before each query (default: the model's)")
    passage_prefix: str | None = _option(None, "text put before each passage (default: the "
                                               "model's)")
    instruction: str | None = _option(None, "query task instruction (part of the query prefix)",
                                      recorded=False)
    query_max_length: int | None = _option(None, "query tokens kept (default: the model's)")
    passage_max_length: int | None = _option(None, "passage tokens kept (default: the model's)")
    normalize: bool | None = _option(None, "L2-normalise vectors (default: the model's)")
    dims: int | None = _option(None, "keep the first N dimensions of every vector, then "
                                     "L2-normalise again (Matryoshka-trained models; default: "
                                     "all)")
    prompt: str | None = _option(None, "none | one-word (the zero-shot LLM prompt; default: the "
                                       "model's, none unless it was fine-tuned with one)",
                                 choices=list(PROMPT_MODES))
    device: str = _option("auto", "auto | cpu | cuda[:N]", recorded=False)
    dtype: str = _option("auto", "auto | float32 | bfloat16 | float16: passages' precision "
                                 "(auto: bf16 on CUDA and on CPUs with native bf16, else fp32)")
    query_dtype: str = _option("auto", "auto | float32 | bfloat16 | float16: queries' precision "
                                       "(auto: float32 on CPU, so a served answer does not "
                                       "depend on threads or batching; on CUDA the passages')")
    batch_size: int = _option(64, "max texts per forward pass", recorded=False)
    max_tokens_per_batch: int = _option(16384, "token budget per forward pass (texts x longest)",
                                        recorded=False)

    @classmethod
    def replaying(cls, settings: dict, model: str | None = None) -> "EncoderConfig":
        """The config that embeds like recorded :meth:`Encoder.settings` (e.g. queries for an
        index); ``model`` replaces the recorded one, the precisions (passages' and queries')
        are this machine's own."""
        recorded = {f.name for f in fields(cls) if f.metadata[RECORDED]} - PRECISIONS
        given = {k: settings[k] for k in recorded if settings.get(k) is not None}
        return cls(**{**given, "model": model or settings["model"]})

    def __post_init__(self):
        for name in PRECISIONS:
            named_dtype(getattr(self, name), name)  # a bad name fails here, naming the option
        if self.pooling is not None and self.pooling not in POOLINGS + ("eos",):
            raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.prompt is not None and self.prompt not in PROMPT_MODES:
            raise ValueError(f"prompt {self.prompt!r}: expected one of {', '.join(PROMPT_MODES)}")
        for name in ("query_max_length", "passage_max_length", "batch_size", "dims"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


BUCKET_RATIO = 0.8  # a batch of >= BUCKET_ROWS texts ends before one shorter than this x longest
BUCKET_ROWS = 8


def token_budget_batches(lengths: Sequence[int], batch_size: int,
                         max_tokens: int | None) -> Iterator[list[int]]:
    """Indices grouped into batches, longest first, each under ``batch_size`` texts and
    ``max_tokens`` padded tokens (batch size x longest text in it), and cut into length
    buckets: once a batch holds ``BUCKET_ROWS`` texts, a text shorter than ``BUCKET_RATIO`` x
    its longest starts the next one. Without the buckets a few long outliers pad whole batches
    of short texts (NPL in 500-text shards: 27.8% padding at 64 a batch, 10.4% with them)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for index in order:
        longest = lengths[batch[0]] if batch else lengths[index]
        if batch and (len(batch) >= batch_size or
                      (max_tokens and (len(batch) + 1) * longest > max_tokens) or
                      (len(batch) >= BUCKET_ROWS and lengths[index] < BUCKET_RATIO * longest)):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def checked_dims(dims: int | None, hidden: int, model: str) -> int:
    """The vector size: ``dims`` (at most the model's ``hidden`` size) or ``hidden``."""
    if dims is not None and dims > hidden:
        raise ValueError(f"dims {dims}: {model} embeds only {hidden} dimensions")
    return dims or hidden


def truncate_dims(vectors: torch.Tensor, dims: int | None, normalize: bool) -> torch.Tensor:
    """The first ``dims`` dimensions, L2-normalised again when the encoder normalises
    (Matryoshka embeddings, Kusupati et al. 2022); all of them when ``dims`` is None."""
    if dims is None or dims >= vectors.size(-1):
        return vectors
    vectors = vectors[..., :dims]
    return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors


class Encoder:
    """Embed queries and passages with one backbone."""

    def __init__(self, config: EncoderConfig | None = None, **overrides):
        config = config or EncoderConfig()
        if overrides:
            config = EncoderConfig(**{**asdict(config), **overrides})
        self.config = config
        self.resolved: ResolvedModel = resolve_model(config.model)
        d: EncoderDefaults = self.resolved.defaults
        pick = lambda value, default: default if value is None else value  # noqa: E731
        self.prompt = pick(config.prompt, d.prompt)
        one_word = self.prompt == "one-word"
        self.pooling = pick(config.pooling, "last" if one_word else d.pooling)
        self.pooling = "last" if self.pooling == "eos" else self.pooling
        self.normalize = pick(config.normalize, d.normalize)
        self.dims = config.dims
        self.query_max_length = pick(config.query_max_length, d.query_max_length)
        self.passage_max_length = pick(config.passage_max_length, d.passage_max_length)
        # The one-word prompt is its own template: no retrieval prefixes, no appended EOS.
        self.query_prefix = with_instruction(
            pick(config.query_prefix, "" if one_word else d.query_prefix), config.instruction)
        self.passage_prefix = pick(config.passage_prefix, "" if one_word else d.passage_prefix)
        self.append_eos = d.append_eos and self.pooling == "last" and not one_word
        self.placement = Placement.resolve(config.device, config.dtype, config.query_dtype)
        self.tokenizer = self._load_tokenizer()
        self.model = self._load_model()
        self.templates: dict[str, Template] = {}
        if one_word:
            self.templates = {kind: one_word_template(self.tokenizer, kind)
                              for kind in ("query", "passage")}

    # ------------------------------------------------------------------ loading

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if self.append_eos and tokenizer.eos_token_id is None:
            raise ValueError(f"{self.resolved.name}: last-token pooling needs an EOS token")
        # A sentence-transformers layout's tokenizer appends EOS itself (st_layout); tokenize()
        # counts it, so the ids are the same as a plain tokenizer's plus our own EOS.
        probe = tokenizer("a")["input_ids"]
        self.tokenizer_appends_eos = (bool(probe) and probe[-1] == tokenizer.eos_token_id
                                      and probe != tokenizer("a", add_special_tokens=False)[
                                          "input_ids"])
        return tokenizer

    def _load_model(self):
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        # A causal-LM checkpoint loaded as its base model reports lm_head as unused: expected.
        hf_logging.set_verbosity_error()

        model = AutoModel.from_pretrained(self.resolved.path,
                                          dtype=self.placement.weight_dtype)
        if self.resolved.adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.resolved.adapter_path)
            model = model.merge_and_unload()
        return model.to(self.placement.device).eval()

    @property
    def dim(self) -> int:
        return checked_dims(self.dims, int(self.model.config.hidden_size), self.resolved.name)

    def settings(self) -> dict:
        """Everything that decides the vectors, for manifests and cache keys: the recorded
        EncoderConfig fields as resolved for this model, its weights' hash, EOS and dims."""
        resolved = {"model": self.resolved.name, "prompt": self.prompt,
                    "dtype": str(self.placement.dtype).replace("torch.", ""),
                    "query_dtype": str(self.placement.query_dtype).replace("torch.", "")}
        recorded = {f.name: resolved[f.name] if f.name in resolved else getattr(self, f.name)
                    for f in fields(EncoderConfig) if f.metadata[RECORDED]}
        if recorded.get("dims") is None:
            recorded.pop("dims", None)  # as settings were before ``dims`` existed
        return {**recorded, "model_hash": self.resolved.fingerprint(),
                "append_eos": self.append_eos, "dim": self.dim}

    # ------------------------------------------------------------------ tokenization

    def tokenize(self, texts: Sequence[str], kind: str) -> list[list[int]]:
        """Token ids per text (no padding), with prefix/template, truncation and EOS applied."""
        if kind not in ("query", "passage"):
            raise ValueError(f"kind {kind!r}: expected 'query' or 'passage'")
        max_length = self.query_max_length if kind == "query" else self.passage_max_length
        tok = self.tokenizer
        if self.templates:
            template = self.templates[kind]
            before = tok(template.before, add_special_tokens=False)["input_ids"]
            after = tok(template.after, add_special_tokens=False)["input_ids"]
            bodies = tok(list(texts), add_special_tokens=False, truncation=True,
                         max_length=max_length)["input_ids"]
            return [before + body + after for body in bodies]
        prefix = self.query_prefix if kind == "query" else self.passage_prefix
        own_eos = self.tokenizer_appends_eos  # counted by the tokenizer's truncation
        room = max_length - (self.append_eos and not own_eos) + (own_eos and not self.append_eos)
        ids = tok([prefix + text for text in texts], truncation=True, max_length=room)["input_ids"]
        if own_eos and not self.append_eos:
            ids = [row[:-1] for row in ids]  # pooling that reads no EOS: as a plain tokenizer
        if self.append_eos:
            eos = tok.eos_token_id
            ids = [row if row and row[-1] == eos else row + [eos] for row in ids]
        return ids

    # ------------------------------------------------------------------ forward

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled (and normalised) embeddings with autograd."""
        vectors = embed(self.model, input_ids, attention_mask, self.pooling, self.normalize)
        return truncate_dims(vectors, self.dims, self.normalize)

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad({"input_ids": [list(r) for r in rows]}, return_tensors="pt")
        return {k: v.to(self.placement.device) for k, v in batch.items()
                if k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def encode_ids(self, rows: Sequence[Sequence[int]], kind: str = "passage") -> np.ndarray:
        """Embed pre-tokenized rows of ``kind`` (its precision: ``Placement.compute_dtype``);
        output order matches input order."""
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        lengths = [len(r) for r in rows]
        for batch in token_budget_batches(lengths, self.config.batch_size,
                                          self.config.max_tokens_per_batch):
            tensors = self.pad([rows[i] for i in batch])
            with self.placement.autocast(kind):
                vectors = self.embed(tensors["input_ids"], tensors["attention_mask"])
            out[batch] = vectors.float().cpu().numpy()
        return out

    def encode(self, texts: Sequence[str], kind: str) -> np.ndarray:
        return self.encode_ids(self.tokenize(texts, kind), kind)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, "query")

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts, "passage")


class WeightlessEncoder(Encoder):
    """An Encoder without weights: tokenizer, prefixes/templates, settings and dims only (the
    encode pipeline's tokenize stage; the parity check's view of a query encoder)."""

    def _load_model(self):
        return None

    @functools.cached_property
    def dim(self) -> int:  # type: ignore[override]
        from transformers import AutoConfig

        return checked_dims(self.dims, int(AutoConfig.from_pretrained(self.resolved.path)
                                           .hidden_size), self.resolved.name)
