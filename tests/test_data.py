import gzip
import json

import pytest

from retriever.io.formats import (DataFormatError, TrainingExample, load_corpus, load_dataset,
                            load_qrels, load_queries, load_training_examples,
                            write_training_examples)
from tests.helpers import dataset


def _write(path, text, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def _beir(tmp_path, corpus=None, queries=None, qrels=None):
    corpus = corpus if corpus is not None else (
        '{"_id": "d1", "title": "T1", "text": "alpha beta"}\n'
        '{"_id": "d2", "title": "", "text": "gamma"}\n')
    queries = queries if queries is not None else '{"_id": "q1", "text": "alpha"}\n'
    qrels = qrels if qrels is not None else "query-id\tcorpus-id\tscore\nq1\td1\t1\n"
    _write(tmp_path / "corpus.jsonl", corpus)
    _write(tmp_path / "queries.jsonl", queries)
    _write(tmp_path / "qrels" / "test.tsv", qrels)
    return str(tmp_path)


def test_real_beir_folder_loads_with_counts():
    ds = load_dataset(dataset("scifact"))
    assert len(ds.corpus) == 5183 and len(ds.judged_queries()) == 300
    assert sum(len(j) for j in ds.qrels.values()) == 339
    train = load_dataset(dataset("scifact"), split="train")  # queries_train.jsonl.gz
    assert len(train.judged_queries()) == 809


def test_passage_is_title_space_text(tmp_path):
    ds = load_dataset(_beir(tmp_path))
    assert ds.corpus.passages() == ["T1 alpha beta", "gamma"]


def test_dataset_from_memory_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/ds/corpus.jsonl.gz", gzip.compress(b'{"_id": "d1", "text": "x"}\n'))
    fs.pipe("/ds/queries.jsonl", b'{"_id": "q1", "text": "x"}\n')
    fs.pipe("/ds/qrels/test.tsv", b"query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    ds = load_dataset("memory://ds")
    assert ds.corpus.ids == ["d1"] and ds.qrels == {"q1": {"d1": 1}}


@pytest.mark.parametrize("corpus, line, problem", [
    ('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": "broken\n', 2, "bad JSON"),
    ('{"text": "no id"}\n', 1, "missing '_id'"),
    ('{"_id": "d1", "title": ""}\n', 1, "missing 'text'"),
    ('{"_id": "d1", "text": "  "}\n', 1, "empty title and text"),
    ('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', 2, "duplicate _id 'd1'"),
    ('[1, 2]\n', 1, "expected a JSON object"),
    ('{"_id": "d1", "text": 5}\n', 1, "'text' must be a string"),
])
def test_malformed_corpus_names_file_line_and_problem(tmp_path, corpus, line, problem):
    url = _write(tmp_path / "corpus.jsonl", corpus)
    with pytest.raises(DataFormatError) as err:
        load_corpus(url)
    assert err.value.source == url and err.value.line == line
    assert problem in str(err.value) and f"line {line}" in str(err.value)


def test_invalid_utf8_is_located(tmp_path):
    url = _write(tmp_path / "corpus.jsonl.gz",
                 b'{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": "\xff\xfe"}\n', gz=True)
    with pytest.raises(DataFormatError, match=r"line 2: invalid UTF-8"):
        load_corpus(url)


def test_empty_files_are_errors(tmp_path):
    url = _write(tmp_path / "corpus.jsonl", "\n\n")
    with pytest.raises(DataFormatError, match="file is empty"):
        load_corpus(url)
    with pytest.raises(DataFormatError, match="file is empty"):
        load_dataset(_beir(tmp_path / "b", qrels=""))


def test_qrels_naming_unknown_ids(tmp_path):
    bad_doc = _beir(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\nq1\tnope\t1\n")
    with pytest.raises(DataFormatError, match=r"qrels/test.tsv: doc id 'nope'.*not in the corpus"):
        load_dataset(bad_doc)
    bad_query = _beir(tmp_path / "b", qrels="query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(DataFormatError, match="query id 'q9' is not in the queries file"):
        load_dataset(bad_query)


def test_bad_qrels_rows(tmp_path):
    url = _write(tmp_path / "q.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(DataFormatError, match="line 2: expected 3 .* or 4"):
        load_qrels(url)
    url = _write(tmp_path / "q2.tsv", "q1\td1\thigh\n")
    with pytest.raises(DataFormatError, match="line 1: relevance 'high' is not a number"):
        load_qrels(url)


def test_missing_folder_pieces(tmp_path):
    with pytest.raises(DataFormatError, match="not a dataset folder"):
        load_dataset(str(tmp_path))
    folder = _beir(tmp_path / "x")
    with pytest.raises(DataFormatError, match="no qrels for split 'dev'"):
        load_dataset(folder, split="dev")


def test_msmarco_trec_formats(tmp_path):
    _write(tmp_path / "collection.tsv", "0\tfirst passage\n1\tsecond passage\n")
    _write(tmp_path / "queries.dev.tsv", "100\twhat is first\n")
    _write(tmp_path / "qrels.dev.tsv", "100 0 0 1\n")
    ds = load_dataset(str(tmp_path), split="dev")
    assert ds.corpus.ids == ["0", "1"] and ds.queries == {"100": "what is first"}
    assert ds.qrels == {"100": {"0": 1}}
    _write(tmp_path / "bad.tsv", "100\n")
    with pytest.raises(DataFormatError, match="bad.tsv, line 1: expected 'id<TAB>text'"):
        load_queries(str(tmp_path / "bad.tsv"))


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_training_examples_round_trip(tmp_path, suffix):
    examples = [TrainingExample("q", ["p1"], ["n1", "n2"], "1", ["d1"], ["d2", "d3"])]
    url = str(tmp_path / "sub" / f"train.{suffix}")
    write_training_examples(examples, url)
    assert load_training_examples(url) == examples


def test_malformed_training_examples(tmp_path):
    url = _write(tmp_path / "t.jsonl", json.dumps({"query": "q", "positives": []}) + "\n")
    with pytest.raises(DataFormatError, match="line 1: 'positives' must hold at least one"):
        load_training_examples(url)
    url = _write(tmp_path / "t2.jsonl", '{"query": "q", "positives": ["a"], "negatives": "x"}\n')
    with pytest.raises(DataFormatError, match="'negatives' must be a list of strings"):
        load_training_examples(url)
