import numpy as np
import pytest
import torch

from retriever.io.formats import load_dataset
from retriever.modeling.device import Placement, cpu_has_native_bf16, pick_query_dtype
from retriever.modeling.encoder import Encoder, EncoderConfig, token_budget_batches
from retriever.modeling.prompts import ONE_WORD_ANSWER_START
from tests.helpers import dataset


@pytest.fixture(scope="module")
def minilm():
    return Encoder(model="minilm", dtype="float32")


@pytest.fixture(scope="module")
def policy():
    """MiniLM with every precision "auto": the machine's own policy."""
    return Encoder(model="minilm", device="cpu")


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


def _queries(n=16):
    return list(load_dataset(dataset("scifact")).judged_queries().values())[:n]


def test_queries_default_to_fp32_on_cpu_and_passages_keep_the_machines_policy(minilm, policy):
    passages = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert policy.placement.query_dtype == torch.float32
    settings = policy.settings()
    assert (settings["dtype"], settings["query_dtype"]) == (passages, "float32")
    texts = _queries()
    # fp32 queries: the same bits as an all-fp32 encoder's; passages: the machine's policy.
    assert np.array_equal(policy.encode_queries(texts), minilm.encode_queries(texts))
    same_passages = np.array_equal(policy.encode_passages(texts), minilm.encode_passages(texts))
    assert same_passages == (passages == "float32")


def test_fp32_query_vectors_do_not_depend_on_batching_or_threads(policy):
    """A query alone (no padding) and in a padded batch of 16, on 1 and on all threads: the
    vectors agree to fp32 rounding (bf16 autocast: ~1e-3, enough to swap close neighbours)."""
    texts = _queries()
    batch = policy.encode_queries(texts)
    alone = np.vstack([policy.encode_queries([t]) for t in texts[:4]])
    assert np.abs(alone - batch[:4]).max() < 1e-6
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = policy.encode_queries(texts)
    finally:
        torch.set_num_threads(threads)
    assert np.abs(one_thread - batch).max() < 1e-6


def test_query_dtype_auto_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_query_dtype(cpu) == torch.float32
    assert pick_query_dtype(cpu, "bf16") == torch.bfloat16  # asked for: as asked
    # On CUDA queries keep the passages' dtype: one half-size weight copy serves both kinds.
    assert pick_query_dtype(cuda, "auto", torch.float16) == torch.float16
    assert Placement(cuda, torch.bfloat16, torch.bfloat16).weight_dtype == torch.bfloat16
    # Two precisions on CUDA: fp32 weights, each kind autocast to its own.
    assert Placement(cuda, torch.bfloat16, torch.float32).weight_dtype == torch.float32
    placement = Placement(cpu, torch.bfloat16, torch.float32)
    assert placement.weight_dtype == torch.float32
    assert placement.compute_dtype("query") == torch.float32
    assert placement.compute_dtype("passage") == torch.bfloat16
    with pytest.raises(ValueError, match="kind 'doc'"):
        placement.compute_dtype("doc")


def test_recorded_precisions_are_never_replayed():
    settings = {"model": "minilm", "pooling": "mean", "dtype": "bfloat16",
                "query_dtype": "bfloat16"}  # e.g. recorded by a GPU encode actor
    config = EncoderConfig.replaying(settings)
    assert (config.dtype, config.query_dtype, config.pooling) == ("auto", "auto", "mean")


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
    for option in ("dtype", "query_dtype"):
        with pytest.raises(ValueError, match=f"^{option} 'fp8': expected auto, bf16, "):
            EncoderConfig(**{option: "fp8"})
