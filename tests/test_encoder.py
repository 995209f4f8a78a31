import numpy as np
import pytest

from retriever.io.formats import load_dataset
from retriever.modeling.encoder import Encoder, token_budget_batches
from retriever.modeling.prompts import ONE_WORD_ANSWER_START
from tests.helpers import dataset


@pytest.fixture(scope="module")
def minilm():
    return Encoder(model="minilm", dtype="float32")


@pytest.fixture(scope="module")
def smollm2():
    return Encoder(model="smollm2-135m", dtype="float32", batch_size=4)


def _texts(n=96):
    return load_dataset(dataset("scifact")).corpus.passages()[:n]


def test_minilm_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    texts = _texts() + ["short", "a b c"]
    ours = minilm.encode_passages(texts)
    st = SentenceTransformer(minilm.resolved.path, device="cpu")
    theirs = st.encode(texts, batch_size=32, normalize_embeddings=True)
    assert st.max_seq_length == minilm.passage_max_length == 256
    assert np.abs(ours - theirs).max() < 1e-5


def test_output_order_independent_of_length_sorting(minilm):
    texts = _texts(20)
    forward = minilm.encode_passages(texts)
    backward = minilm.encode_passages(texts[::-1])[::-1]
    assert np.abs(forward - backward).max() < 1e-5
    assert np.allclose(np.linalg.norm(forward, axis=1), 1.0, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(minilm):
    texts = _texts(32)
    bf16 = Encoder(model="minilm", dtype="bfloat16")
    cosine = (bf16.encode_passages(texts) * minilm.encode_passages(texts)).sum(1)
    assert cosine.min() > 0.999


def test_token_budget_batches_cover_every_index_once():
    lengths = [5, 100, 7, 100, 30, 2, 64]
    batches = list(token_budget_batches(lengths, batch_size=3, max_tokens=210))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 210


def test_decoder_defaults_prefixes_and_eos(smollm2):
    assert smollm2.pooling == "last" and smollm2.append_eos
    ids = smollm2.tokenize(["what is a wing"], "query")[0]
    assert ids[-1] == smollm2.tokenizer.eos_token_id
    assert smollm2.tokenizer.decode(ids).startswith("Query: what is a wing")
    long_ids = smollm2.tokenize(["word " * 1000], "passage")[0]
    assert len(long_ids) == smollm2.passage_max_length and long_ids[-1] == long_ids[-1]
    assert long_ids[-1] == smollm2.tokenizer.eos_token_id


def test_last_token_pooling_same_under_left_and_right_padding(smollm2):
    texts = ["a short one", "a much longer passage about boundary layers on swept wings"]
    tok = smollm2.tokenizer
    original = tok.padding_side
    try:
        tok.padding_side = "right"
        right = smollm2.encode_passages(texts)
        tok.padding_side = "left"
        left = smollm2.encode_passages(texts)
    finally:
        tok.padding_side = original
    single = np.vstack([smollm2.encode_passages([t]) for t in texts])  # no padding at all
    assert np.abs(right - left).max() < 1e-4
    assert np.abs(right - single).max() < 1e-4


def test_one_word_prompt_is_chat_templated_and_truncates_only_the_text():
    enc = Encoder(model="smollm2-135m", prompt="one-word", dtype="float32",
                  passage_max_length=8)
    assert enc.pooling == "last" and not enc.append_eos
    ids = enc.tokenize(["the boundary layer of a swept wing " * 20], "passage")[0]
    text = enc.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text
    assert 'Passage: "the boundary layer' in text
    assert ("Use one word to represent the passage in a retrieval task. "
            "Make sure your word is in lowercase.") in text
    assert text.endswith(ONE_WORD_ANSWER_START)
    query_text = enc.tokenizer.decode(enc.tokenize(["lift"], "query")[0])
    assert 'Query: "lift". Use one word to represent the query' in query_text
    vectors = enc.encode_queries(["lift", "drag"])
    assert vectors.shape == (2, 576)


def test_unknown_model_and_bad_options_are_named():
    from retriever.modeling.registry import ModelNotFound

    with pytest.raises(ModelNotFound, match="'no-such-model'"):
        Encoder(model="no-such-model")
    with pytest.raises(ValueError, match="pooling 'max'"):
        Encoder(model="minilm", pooling="max")
