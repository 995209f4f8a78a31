"""The sentence-transformers layout of a model directory, so it loads anywhere.

In: a model directory (``config.json``, weights, tokenizer) and the ``EncoderDefaults`` it
embeds with. Out, written into that directory (the classic layout that sentence-transformers
>= 2 reads, and servers that read it: infinity-emb, text-embeddings-inference):

- ``modules.json``: Transformer (the directory itself) -> Pooling (``1_Pooling``) ->
  Normalize (``2_Normalize``, only when the vectors are L2-normalised);
- ``1_Pooling/config.json``: ``pooling_mode_mean_tokens`` | ``pooling_mode_cls_token`` |
  ``pooling_mode_lasttoken`` from ``defaults.pooling`` (``include_prompt``: the prefix is
  pooled, as the Encoder pools it);
- ``sentence_bert_config.json``: ``max_seq_length`` = the passage max length (the layout has
  one length for every text; the Encoder's query length is usually the shorter one);
- ``config_sentence_transformers.json``: ``prompts`` ``{"query": query prefix, "passage":
  passage prefix}`` (``encode(texts, prompt_name="query")``), the similarity (cosine);
- for last-token pooling with an appended EOS (decoders): the tokenizer saved with
  ``add_eos_token`` (``tokenizer_config.json`` and a ``TemplateProcessing`` post-processor in
  ``tokenizer.json``), so the tokenizer appends the EOS itself, as loaders of this layout
  expect (sentence-transformers appends nothing), and a pad token set (the EOS) for batches.
  The Encoder appends EOS itself (``retriever.modeling.encoder``): it turns ``add_eos_token``
  off when it loads such a tokenizer, so its token ids are the same as before.

Invariant (``tests/test_st_layout.py``): ``SentenceTransformer(dir).encode(texts,
prompt_name=kind)`` equals ``Encoder(dir).encode(texts, kind)`` (cosine >= 0.9999 at the same
precision) for every text within the query / passage max lengths. Not carried by the layout:
per-run options (``--instruction``, the one-word prompt) and a query longer than the Encoder's
query max length (the layout truncates it at the passage length).

These files are part of the directory's content identity (``retriever.modeling.identity``):
they decide what every loader of the layout computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from retriever.errors import InputError

MODULES_FILE = "modules.json"
POOLING_FILE = "1_Pooling/config.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
SBERT_CONFIG_FILE = "sentence_bert_config.json"
_POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                  "last": "pooling_mode_lasttoken"}


def tokenizer_appends_eos(defaults) -> bool:
    """The layout's tokenizer appends EOS: last-token pooling over an appended EOS."""
    return bool(defaults.append_eos) and defaults.pooling == "last"


def prepare_tokenizer(tokenizer, defaults, source: str = "model"):
    """``tokenizer`` as the layout saves it: a pad token (the EOS, as the Encoder pads) and,
    for last-token pooling with EOS, the EOS appended by the tokenizer itself."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if not tokenizer_appends_eos(defaults):
        return tokenizer
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(f"{source}: last-token pooling with an appended EOS needs an EOS token, "
                         "and its tokenizer has none")
    tokenizer.add_eos_token = True  # transformers rebuilds the post-processor from the flag
    if tokenizer("a")["input_ids"][-1] != eos:
        raise InputError(f"{source}: its tokenizer ({type(tokenizer).__name__}) does not append "
                         "EOS with add_eos_token; the sentence-transformers layout cannot carry "
                         "last-token pooling for it")
    return tokenizer


def _write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_config(directory: str | Path, defaults, dim: int) -> None:
    """The layout's JSON files (not the tokenizer: :func:`prepare_tokenizer`) for vectors of
    ``dim`` dimensions embedded as ``defaults`` says."""
    if defaults.pooling not in _POOLING_MODES:
        raise InputError(f"{directory}: pooling {defaults.pooling!r} has no sentence-transformers "
                         f"equivalent (expected one of {', '.join(_POOLING_MODES)})")
    directory = Path(directory)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if defaults.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(directory / MODULES_FILE, modules)
    pooling = {mode: False for mode in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                         "pooling_mode_max_tokens",
                                         "pooling_mode_mean_sqrt_len_tokens",
                                         "pooling_mode_weightedmean_tokens",
                                         "pooling_mode_lasttoken")}
    pooling[_POOLING_MODES[defaults.pooling]] = True
    _write_json(directory / POOLING_FILE, {"word_embedding_dimension": int(dim),
                                           "include_prompt": True, **pooling})
    _write_json(directory / SBERT_CONFIG_FILE, {"max_seq_length": int(defaults.passage_max_length),
                                                "do_lower_case": False})
    _write_json(directory / ST_CONFIG_FILE, {
        "prompts": {"query": defaults.query_prefix, "passage": defaults.passage_prefix},
        "default_prompt_name": None, "similarity_fn_name": "cosine"})
    _portable_tokenizer_class(directory)


def _portable_tokenizer_class(directory: Path) -> None:
    """transformers 5 names a saved fast tokenizer ``TokenizersBackend``, a class transformers 4
    (what most embedding servers pin) lacks; ``PreTrainedTokenizerFast`` loads the same
    ``tokenizer.json``, post-processor (the appended EOS) included, in both."""
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write_json(path, config)


def hidden_size(directory: str | Path) -> int:
    config = json.loads(Path(directory, "config.json").read_text())
    size = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
    if not size:
        raise InputError(f"{directory}/config.json: no hidden_size, so no embedding dimension")
    return int(size)


def has_layout(directory: str | Path, defaults) -> bool:
    """The directory carries this module's layout for ``defaults`` (its prompts and pooling)."""
    directory = Path(directory)
    try:
        prompts = json.loads((directory / ST_CONFIG_FILE).read_text()).get("prompts")
        pooling = json.loads((directory / POOLING_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (prompts == {"query": defaults.query_prefix, "passage": defaults.passage_prefix}
            and pooling.get(_POOLING_MODES.get(defaults.pooling, "?")) is True
            and (directory / MODULES_FILE).exists() and (directory / SBERT_CONFIG_FILE).exists())


def add_layout(directory: str | Path, defaults) -> None:
    """Write the layout into an existing model directory (a cached one others may be loading):
    the tokenizer re-saved as :func:`prepare_tokenizer` says when that changes it, then the JSON
    files, each file replaced whole. The caller rewrites the identity."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    before = (tokenizer.pad_token, tokenizer("a")["input_ids"])
    prepare_tokenizer(tokenizer, defaults, str(directory))
    scratch = Path(tempfile.mkdtemp(prefix=".st-layout-", dir=directory))  # hidden: not counted
    try:
        if (tokenizer.pad_token, tokenizer("a")["input_ids"]) != before:
            tokenizer.save_pretrained(str(scratch))
        write_config(scratch, defaults, hidden_size(directory))
        for path in sorted(p for p in scratch.rglob("*") if p.is_file()):
            target = directory / path.relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
