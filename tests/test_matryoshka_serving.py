"""Matryoshka truncation (``--dims``) through the encode job, the index job and the Serve app
gives the same vectors and rankings as truncating the full vectors (issue 14).

One local Ray for the module runs, in order: the encode job (Ray Data, ``retriever encode
--dims 64``) on 240 SciFact documents (cut to 64 tokens, for speed), the index job on its
output (2 flat shards) and the Serve app over that index. The reference everywhere is MiniLM's
full 384-dimensional vectors made in this process, cut to their first 64 dimensions and
L2-normalised again with numpy (not with the library's ``truncate_dims``). The job encodes and
stores float32, so the index is compared with exact search to FAISS' last bits (1e-5 in scores,
as in tests/test_serve.py); the Serve app's query encoder embeds queries in fp32 too
(``EncoderConfig.query_dtype``), so its answers to texts are held to the same 1e-5, and its
passage vectors (bf16 autocast where the CPU has AMX) to cosine 0.9999.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from retriever.index import shards as sh
from retriever.index.exact import ExactSearcher
from retriever.io import embeddings
from retriever.io.formats import load_dataset
from retriever.ops.cluster import free_port
from tests.helpers import dataset, same_ranking


DIMS = 64
DOCS = 240
QUERIES = 40
PASSAGE_TOKENS = 64  # short passages keep the two encodings of the corpus to seconds


def truncated(vectors: np.ndarray, dims: int = DIMS) -> np.ndarray:
    """The first ``dims`` dimensions of each row, at unit length again (Kusupati et al. 2022)."""
    head = np.asarray(vectors, dtype=np.float64)[:, :dims]
    return (head / np.linalg.norm(head, axis=1, keepdims=True)).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def pairs(hits) -> list[tuple[str, float]]:
    return [(doc_id, float(score)) for doc_id, score in hits]


@dataclass
class Served:
    url: str
    client: httpx.Client
    embeddings: str  # the encode job's folder
    index: str  # the index job's folder
    ids: list[str]  # the corpus slice's doc ids, in corpus order
    passages: list[str]
    queries: list[str]
    full_docs: np.ndarray  # the reference: 384-d float32, in process
    full_queries: np.ndarray
    reference: object  # the in-process full Encoder


def _corpus_slice(folder: Path) -> tuple[str, list[str], list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = load_dataset(dataset("scifact"))
    corpus = data.corpus.subset(range(DOCS))
    source = folder / "slice.parquet"
    pq.write_table(pa.table({"_id": corpus.ids, "title": corpus.titles,
                             "text": corpus.texts}), source)
    queries = list(data.judged_queries().values())[:QUERIES]
    return str(source), corpus.ids, corpus.passages(), queries


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from jobs.encode import main as encode_main
    from jobs.index import main as index_main
    from jobs.serve import ServeConfig, start
    from retriever.modeling.encoder import Encoder, EncoderConfig
    from serve.api import TOKEN_ENV

    root = tmp_path_factory.mktemp("matryoshka")
    source, ids, passages, queries = _corpus_slice(root)
    token = os.environ.pop(TOKEN_ENV, None)  # no bearer token: the replicas inherit this
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        folder, index = str(root / "emb-64"), str(root / "flat-2")
        assert encode_main(["--corpus", source, "--out", folder, "--model", "minilm",
                            "--dims", str(DIMS), "--dtype", "float32",
                            "--passage-max-length", str(PASSAGE_TOKENS),
                            "--embedding-dtype", "float32", "--docs-per-shard", "120",
                            "--actors", "1"]) == 0
        assert index_main(["--embeddings", folder, "--shards", "2", "--out", index]) == 0
        url = start(ServeConfig(index=index, port=free_port(), shards_per_searcher=2))
        reference = Encoder(EncoderConfig(model="minilm", dtype="float32", device="cpu",
                                          passage_max_length=PASSAGE_TOKENS))
        full_docs = reference.encode_passages(passages)
        full_queries = reference.encode_queries(queries)
        with httpx.Client(base_url=url, timeout=60.0) as client:
            yield Served(url, client, folder, index, ids, passages, queries, full_docs,
                         full_queries, reference)
    finally:
        serve.shutdown()
        ray.shutdown()
        if token is not None:
            os.environ[TOKEN_ENV] = token


def test_encode_job_writes_the_truncated_full_vectors(served):
    assert served.full_docs.shape == (DOCS, 384)
    ids, vectors = embeddings.load(served.embeddings, verify=True)
    assert ids == served.ids  # every doc once, in corpus order
    assert vectors.shape == (DOCS, DIMS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosines(vectors, truncated(served.full_docs)).min() >= 0.9999
    # not merely the full vectors' first 64 numbers: those are not at unit length
    assert np.abs(np.linalg.norm(served.full_docs[:, :DIMS], axis=1) - 1).max() > 0.1
    manifest = embeddings.read_manifest(served.embeddings)
    assert manifest["dim"] == DIMS
    assert manifest["encoder"]["dims"] == DIMS and manifest["encoder"]["dim"] == DIMS


def test_index_records_the_dims_and_answers_as_exact_search_over_truncated_vectors(served):
    manifest = sh.read_manifest(served.index)
    assert manifest["dim"] == DIMS and manifest["rows"] == DOCS and len(manifest["shards"]) == 2
    assert manifest["source"]["encoder"]["dims"] == DIMS
    shards = sh.load_all(served.index, gpu="no")
    queries = truncated(served.full_queries)
    got = sh.search_all(shards, queries, 10)
    want = ExactSearcher(truncated(served.full_docs), served.ids, use_gpu=False).search(
        queries, 10)
    for hits, exact in zip(got, want):
        same_ranking([{"doc_id": d, "score": s} for d, s in pairs(hits)], pairs(exact))


def _post(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_serve_encodes_queries_with_the_index_dims_and_ranks_as_exact_search(served):
    from ray import serve

    from jobs.serve import APP_NAME

    info = served.client.get("/info").json()
    assert info["dims"] == DIMS and info["rows"] == DOCS
    encoder = serve.get_deployment_handle("QueryEncoder", APP_NAME)
    settings = encoder.options(method_name="settings").remote().result(timeout_s=60)
    assert settings["dims"] == DIMS and settings["dim"] == DIMS  # replayed from the index
    queries = truncated(served.full_queries)
    exact = ExactSearcher(truncated(served.full_docs), served.ids, use_gpu=False).search(
        queries, 10)
    by_text = _post(served.client, "/search", {"queries": served.queries, "top_k": 10})
    by_vector = _post(served.client, "/search", {"vectors": queries.tolist(), "top_k": 10})
    for text, vector, want in zip(by_text["results"], by_vector["results"], exact):
        same_ranking(vector["hits"], pairs(want))  # the same vectors: FAISS' last bits only
        same_ranking(text["hits"], pairs(want))  # fp32 queries: the same, but for ~1e-7


def test_openai_embeddings_are_the_truncated_vectors(served):
    model = served.client.get("/v1/models").json()["data"][0]["id"]
    for kind, texts, full in (("query", served.queries[:8], served.full_queries[:8]),
                              ("passage", served.passages[:8], served.full_docs[:8])):
        answer = _post(served.client, "/v1/embeddings",
                       {"model": model, "input": texts, "input_type": kind})
        vectors = np.array([row["embedding"] for row in answer["data"]], dtype=np.float32)
        assert vectors.shape == (8, DIMS), kind
        assert cosines(vectors, truncated(full)).min() >= 0.9999, kind
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4), kind
    shorter = _post(served.client, "/v1/embeddings",
                    {"model": model, "input": served.queries[:2], "dimensions": 32})
    vectors = np.array([row["embedding"] for row in shorter["data"]], dtype=np.float32)
    assert cosines(vectors, truncated(served.full_queries[:2], 32)).min() >= 0.9999
    wider = served.client.post("/v1/embeddings", json={"model": model, "input": "x",
                                                       "dimensions": DIMS + 1})
    assert wider.status_code == 400 and str(DIMS) in wider.json()["error"]["message"]


def test_a_query_encoder_with_other_dims_is_refused_naming_both(served):
    import dataclasses

    from retriever.modeling.encoder import EncoderConfig
    from retriever.modeling.parity import EncoderMismatch
    from serve.app import AppArgs, check_parity, encoder_config
    from serve.local import LocalBackend

    manifest = sh.read_manifest(served.index)
    replayed = encoder_config(manifest)
    assert replayed["dims"] == DIMS  # what the Serve app's QueryEncoder is built with
    args = AppArgs(index=served.index)
    check_parity(manifest, replayed, args)  # the index's own dims pass
    for dims, width in ((None, 384), (32, 32)):
        other = dataclasses.asdict(EncoderConfig(**{**replayed, "dims": dims}))
        with pytest.raises(EncoderMismatch, match=f"dim: index {DIMS} vs query {width}"):
            check_parity(manifest, other, args)
    check_parity(manifest, other, AppArgs(index=served.index, allow_asymmetric_encoder=True))
    with pytest.raises(EncoderMismatch, match=f"dim: index {DIMS} vs query 384"):
        LocalBackend(served.index, encoder=served.reference, gpu="no")  # the full encoder
