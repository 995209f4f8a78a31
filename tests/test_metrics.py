import math

import pytest
import pytrec_eval

from retriever.evaluation import metrics
from retriever.index.ranking import merge, order, read_trec, write_trec

QRELS = {"q1": {"d1": 1, "d2": 2, "d3": 0}, "q2": {"d5": 1}, "q3": {"d9": 0}}
RUN = {
    # ties at 1.0 (d1, d3) and at 0.5 (d2, d4): trec_eval puts the higher doc id first
    "q1": [("d1", 1.0), ("d3", 1.0), ("d2", 0.5), ("d4", 0.5)],
    # the relevant document is at rank 11: in recip_rank but outside MRR@10
    "q2": [(f"x{i:02d}", 2.0 - i * 0.1) for i in range(10)] + [("d5", 0.5)],
}


def test_trec_order_breaks_ties_by_doc_id_descending():
    assert [d for d, _ in order(RUN["q1"])] == ["d3", "d1", "d4", "d2"]


def test_metrics_hand_computed_with_ties():
    result = metrics.evaluate(QRELS, RUN)
    # q1 ranking d3(0) d1(1) d4(-) d2(2); trec_eval gains are the grades, log2(rank+1) discount
    dcg = 1 / math.log2(3) + 2 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    ndcg_q1 = dcg / idcg
    ndcg_q2 = 0.0  # d5 is at rank 11: outside the cut at 10
    # q3 has no relevant document: not scored (trec_eval skips it)
    assert result["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-4)
    assert result["mrr@10"] == pytest.approx((1 / 2 + 0.0) / 2, abs=1e-6)
    assert result["recall@100"] == pytest.approx(1.0)


def test_metrics_agree_with_pytrec_eval_on_the_same_run():
    scored = {q: j for q, j in QRELS.items() if any(v > 0 for v in j.values())}
    direct = pytrec_eval.RelevanceEvaluator(scored, {"ndcg_cut_10", "recall_100", "recip_rank"})
    raw = direct.evaluate({q: dict(h) for q, h in RUN.items()})
    ours = metrics.per_query(QRELS, RUN)
    for qid in scored:
        assert ours["ndcg@10"][qid] == pytest.approx(raw[qid]["ndcg_cut_10"], abs=1e-12)
        assert ours["recall@100"][qid] == pytest.approx(raw[qid]["recall_100"], abs=1e-12)
    # MRR@10 differs from full recip_rank exactly where the first relevant hit is past rank 10
    assert raw["q2"]["recip_rank"] == pytest.approx(1 / 11)
    assert ours["mrr@10"]["q2"] == 0.0
    assert ours["mrr@10"]["q1"] == pytest.approx(raw["q1"]["recip_rank"])


def test_unanswered_query_counts_as_zero():
    result = metrics.evaluate(QRELS, {"q1": RUN["q1"]})
    assert result["recall@100"] == pytest.approx(0.5)


def test_trec_run_file_round_trip(tmp_path):
    url = str(tmp_path / "runs" / "run.trec")
    write_trec({q: order(h) for q, h in RUN.items()}, url, tag="t")
    lines = (tmp_path / "runs" / "run.trec").read_text().splitlines()
    assert lines[0].split() == ["q1", "Q0", "d3", "1", "1.000000", "t"]
    back = read_trec(url)
    assert metrics.evaluate(QRELS, back) == pytest.approx(metrics.evaluate(QRELS, RUN))


def test_merge_takes_global_top_k_in_trec_order():
    shard_a = [("a", 0.9), ("c", 0.5)]
    shard_b = [("b", 0.9), ("d", 0.7)]
    assert merge([shard_a, shard_b], 3) == [("b", 0.9), ("a", 0.9), ("d", 0.7)]
