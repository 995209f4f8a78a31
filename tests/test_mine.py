"""Query splits and hard-negative mining on the real Cranfield collection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retriever import config as cfg
from retriever.io.formats import load_dataset, load_training_examples
from retriever.index.bm25 import BM25Index
from retriever.training.mining import MiningConfig, mine
from retriever.io.splits import assign, split_queries
from tests.helpers import dataset
from tests.train_fixtures import tiny_bert


@pytest.fixture(scope="module")
def cranfield():
    return load_dataset(dataset("cranfield"))


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    from jobs import split as split_job

    out = tmp_path_factory.mktemp("split") / "cranfield-split"
    assert split_job.main(["--dataset", dataset("cranfield"), "--test-fraction",
                           "0.3333333333", "--seed", "0", "--out", str(out)]) == 0
    return out


def test_split_is_exact_disjoint_and_seeded(cranfield):
    parts = split_queries(cranfield, test_fraction=1 / 3, seed=0)
    train, test = set(parts["train"].queries), set(parts["test"].queries)
    assert (len(train), len(test)) == (150, 75)
    assert not train & test and train | test == set(cranfield.judged_queries())
    assert all(q in parts["test"].qrels for q in test)
    again = split_queries(cranfield, test_fraction=1 / 3, seed=0)
    assert set(again["test"].queries) == test
    assert set(split_queries(cranfield, test_fraction=1 / 3, seed=1)["test"].queries) != test
    # The rule depends on the ids only, not on their order.
    ids = list(cranfield.judged_queries())
    assert assign(ids[::-1], {"test": 1 / 3}, 0) == assign(ids, {"test": 1 / 3}, 0)
    three = split_queries(cranfield, test_fraction=1 / 3, dev_fraction=0.2, seed=0)
    assert set(three["test"].queries) == test  # carving a dev part leaves test alone
    assert len(three["dev"].queries) == 45 and len(three["train"].queries) == 105


def test_split_folder_loads_as_beir(split_folder):
    test = load_dataset(str(split_folder), "test")
    train = load_dataset(str(split_folder), "train")
    assert len(test.judged_queries()) == 75 and len(train.judged_queries()) == 150
    assert not set(test.queries) & set(train.queries)  # a query's text is only in its split
    assert len(test.corpus) == 1398
    manifest = json.loads((split_folder / "manifest.json").read_text())
    assert manifest["counts"]["test"]["queries"] == 75
    assert sorted(manifest["query_ids"]["test"], key=int) == sorted(test.queries, key=int)


def test_bm25_mining_excludes_positives_filters_and_windows(split_folder):
    train = load_dataset(str(split_folder), "train")
    config = cfg.build(MiningConfig, dict(bm25_depth=80, dense_model=None, num_negatives=10,
                                          window_start=5, window_end=40,
                                          false_negative_margin=0.9, seed=0))
    examples, report = mine(train, config)
    assert len(examples) == 150 and report["stats"]["filtered_bm25"] > 0
    scorer = BM25Index(train.corpus.passages(), train.corpus.ids)
    row = {d: i for i, d in enumerate(train.corpus.ids)}
    scores = scorer.score_all([ex.query for ex in examples])
    checked = 0
    for ex, s in zip(examples, scores):
        positives = {d for d, g in train.qrels[ex.query_id].items() if g >= 1}
        assert set(ex.positive_ids) == positives
        assert not positives & set(ex.negative_ids)
        assert len(set(ex.negative_ids)) == len(ex.negative_ids) <= 10
        best = max(s[row[d]] for d in positives)
        if best > 0:
            assert all(s[row[d]] <= 0.9 * best + 1e-6 for d in ex.negative_ids)
        # Recompute the filtered BM25 list: negatives come from its ranks [5, 40).
        ranked = sorted(((float(s[i]), d) for d, i in row.items()
                         if d not in positives and s[i] > 0), reverse=True)[:80]
        kept = [d for score, d in ranked if best <= 0 or score <= 0.9 * best]
        assert set(ex.negative_ids) <= set(kept[5:40])
        assert ex.negatives == [train.corpus.passage(row[d]) for d in ex.negative_ids]
        checked += 1
    assert checked == 150
    again, _ = mine(train, config)
    assert [e.negative_ids for e in again] == [e.negative_ids for e in examples]


def test_dense_and_bm25_mining_job_writes_training_examples(split_folder, tmp_path):
    """`retriever mine` with both sources (a tiny random dense model keeps it fast; its cosine
    scores are all close to 1, so the false-negative filter, tested above, is off here)."""
    from jobs import mine as mine_job
    from retriever.modeling.encoder import Encoder, EncoderConfig
    from retriever.training.run import resolve_train_data

    model = str(tiny_bert(tmp_path / "tiny-bert"))
    out = tmp_path / "mined"
    assert mine_job.main(["--dataset", str(split_folder), "--split", "train",
                          "--dense-model", model, "--bm25-depth", "50", "--dense-depth", "50",
                          "--num-negatives", "8", "--dense-dtype", "float32",
                          "--false-negative-margin", "0", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 150 and manifest["examples"] == "examples.parquet"
    stats = manifest["stats"]
    assert stats["candidates_dense"] == 150 * 50 and stats["candidates_bm25"] > 0
    assert stats["filtered_dense"] == stats["filtered_bm25"] == 0
    assert manifest["settings"]["false_negative_margin"] is None
    examples = load_training_examples(str(out / "examples.parquet"))
    assert resolve_train_data(str(out)).endswith("examples.parquet")
    train = load_dataset(str(split_folder), "train")
    encoder = Encoder(EncoderConfig(model=model, dtype="float32"))
    row = {d: i for i, d in enumerate(train.corpus.ids)}
    docs = encoder.encode_passages(train.corpus.passages())
    queries = encoder.encode_queries([ex.query for ex in examples])
    dense_only = 0
    for ex, q in zip(examples, queries):
        positives = set(ex.positive_ids)
        assert not positives & set(ex.negative_ids) and len(ex.negative_ids) == 8
        scores = docs @ q
        top = set(np.asarray(train.corpus.ids)[np.argsort(-scores)[:60]])
        dense_only += bool(set(ex.negative_ids) & top)
    assert dense_only > 0  # the dense source contributes


def test_mining_rejects_a_split_without_positives(tmp_path):
    from jobs import mine as mine_job
    from retriever.errors import InputError

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a wing"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "wing"}\n')
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\n")
    with pytest.raises(InputError, match="no query has a positive"):
        mine_job.run(cfg.build(mine_job.MineConfig, dict(dataset=str(folder),
                                                         dense_model="none",
                                                         out=str(tmp_path / "out"))))
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="window"):
        MiningConfig(window_start=10, window_end=10)


@pytest.mark.parametrize("name, problem", [
    ("OUTSIDE", "must name a file inside the folder"),  # an absolute path elsewhere
    ("memory://elsewhere/examples.jsonl", "must name a file inside the folder"),
    ("../outside.jsonl", "would leave the folder"),
])
def test_a_mine_manifest_names_only_a_file_inside_its_folder(tmp_path, name, problem):
    from retriever.errors import InputError
    from retriever.training.run import resolve_train_data

    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"query": "q", "positives": ["p"]}\n')
    name = str(outside) if name == "OUTSIDE" else name
    folder = tmp_path / "mined"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"kind": "mined", "examples": name}))
    with pytest.raises(InputError, match=problem) as error:
        resolve_train_data(str(folder))
    assert name in str(error.value)
