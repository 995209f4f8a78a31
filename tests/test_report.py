import math
import random

import pytest
from scipy import stats

from retriever.evaluation.report import (Cell, bar_chart_png, html_report, markdown_table, paired_t_test,
                              throughput_table)


def test_paired_t_test_matches_scipy_on_known_case():
    rng = random.Random(7)
    a = [rng.random() for _ in range(40)]
    b = [x - 0.05 + rng.gauss(0, 0.1) for x in a]
    t, p = paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-8)
    # textbook case (differences 1,2,3,4,5 -> t = 3/sqrt(2.5/5) = 4.2426)
    t, p = paired_t_test([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert t == pytest.approx(3 / math.sqrt(0.5))
    assert p == pytest.approx(stats.ttest_rel([2, 4, 6, 8, 10], [1, 2, 3, 4, 5]).pvalue)


def test_paired_t_test_edge_cases():
    assert paired_t_test([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    assert paired_t_test([2, 3, 4], [1, 2, 3]) == (math.inf, 0.0)
    assert paired_t_test([1, 2, 3], [2, 3, 4]) == (-math.inf, 0.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t_test([1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        paired_t_test([1, 2], [1])


def _results():
    q = [f"q{i}" for i in range(30)]
    strong = {k: 0.8 for k in q}
    weak = {k: 0.2 + 0.01 * i for i, k in enumerate(q)}
    same = {k: 0.2 + 0.01 * i + (0.001 if i % 2 else -0.001) for i, k in enumerate(q)}
    return {"scifact": {"bm25": Cell(sum(weak.values()) / 30, weak),
                        "minilm": Cell(0.8, strong), "other": Cell(sum(same.values()) / 30, same)},
            "cranfield": {"bm25": Cell(0.3, weak), "minilm": Cell(0.2, weak)}}


def test_markdown_table_bold_best_average_and_dagger():
    table = markdown_table(_results(), ["bm25", "minilm", "other"], baseline="bm25")
    lines = table.splitlines()
    assert lines[2] == "| dataset | bm25 | minilm | other |"
    scifact = next(line for line in lines if line.startswith("| scifact"))
    assert "**0.8000†**" in scifact  # best and significantly better than bm25
    assert "0.3450 |" in scifact and "†" not in scifact.split("|")[4]  # 'other' is not
    cranfield = next(line for line in lines if line.startswith("| cranfield"))
    assert "**0.3000**" in cranfield and cranfield.endswith("| - |")
    assert lines[-1].startswith("| *average* |") and "**0.5000**" in lines[-1]
    assert lines[-1].endswith("| - |")  # 'other' has no cranfield cell: no average


def test_plot_and_html_report_render():
    png = bar_chart_png(_results(), ["bm25", "minilm", "other"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = html_report("Matrix", [("NDCG@10", markdown_table(_results(), ["bm25", "minilm"]))],
                       [("NDCG@10 per dataset", png)])
    assert "<table>" in page and "<b>0.8000</b>" in page and "data:image/png;base64," in page


def test_html_report_escapes_text_and_keeps_table_markup():
    table = "note <b>\n\n| a<b> | n |\n|---|---:|\n| *average* | **1 & 2** |"
    page = html_report("A & B", [("<h>", table)], [])
    assert "<title>A &amp; B</title>" in page and "<h2>&lt;h&gt;</h2>" in page
    assert "<p class='note'>note &lt;b&gt;</p>" in page
    assert "<th class='left'>a&lt;b&gt;</th><th class='right'>n</th>" in page
    assert "<td class='left'><i>average</i></td><td class='right'><b>1 &amp; 2</b></td>" in page


def test_throughput_cost_per_million_docs():
    table = throughput_table([{"model": "minilm", "dataset": "scifact", "docs": 5183,
                               "docs_per_s": 100.0, "tokens_per_s": 25000.0}],
                             price_per_hour=3.6, hardware="2-core CPU")
    # 1e6 docs / 100 docs/s = 10,000 s = 2.78 h x $3.6 = $10.00
    assert "| minilm | scifact | 5183 | 100.0 | 25000 | 10.00 |" in table


# ---------------------------------------------------------------------------- statistics


def _paired_scores(n=120, seed=3):
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, n)
    better = np.clip(base + rng.normal(0.05, 0.1, n), 0, 1)
    return base, better


def test_bootstrap_intervals_match_scipy_paired_bootstrap():
    """The cell intervals and the interval of a paired difference against
    scipy.stats.bootstrap (percentile method, paired=True), to Monte Carlo error."""
    import numpy as np

    from retriever.evaluation.statistics import bootstrap_difference, bootstrap_intervals

    base, better = _paired_scores()
    queries = [f"q{i}" for i in range(len(base))]
    intervals = bootstrap_intervals({"bm25": dict(zip(queries, base)),
                                     "dense": dict(zip(queries, better))})
    for name, values in (("bm25", base), ("dense", better)):
        ref = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile",
                              confidence_level=0.95, random_state=1).confidence_interval
        assert intervals[name] == pytest.approx((ref.low, ref.high), abs=0.004)
        assert intervals[name][0] < values.mean() < intervals[name][1]
    ref = stats.bootstrap((better, base), lambda a, b, axis=-1: np.mean(a - b, axis=axis),
                          paired=True, n_resamples=10_000, method="percentile",
                          random_state=1).confidence_interval
    low, high = bootstrap_difference(list(better), list(base))
    assert (low, high) == pytest.approx((ref.low, ref.high), abs=0.003)
    assert 0 < low < high  # the known shift of +0.05 is detected
    # deterministic: a fixed seed
    assert bootstrap_difference(list(better), list(base)) == (low, high)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    from retriever.evaluation.statistics import holm

    for pvalues in ([0.01, 0.04, 0.03, 0.005, 0.5], [0.2, 0.2, 0.01], [0.9], [0.3, 0.001, 0.02,
                                                                              0.04, 0.04, 1.0]):
        expected = multipletests(pvalues, alpha=0.05, method="holm")[1]
        assert holm(pvalues) == pytest.approx(list(expected), abs=1e-12)
    assert holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_statistics_table_counts_wins_ties_losses_and_adjusts_p():
    from retriever.evaluation.report import comparisons, significance, statistics_table

    results = _results()
    rows = {(c.dataset, c.model): c for c in comparisons(results, "bm25")}
    strong = rows[("scifact", "minilm")]
    assert strong.queries == 30 and strong.wins_ties_losses == (30, 0, 0)
    assert strong.difference == pytest.approx(0.8 - 0.345)
    assert rows[("cranfield", "minilm")].wins_ties_losses == (0, 30, 0)
    assert rows[("scifact", "other")].wins_ties_losses == (15, 0, 15)
    assert rows[("scifact", "bm25")].p is None  # the baseline is not compared to itself
    raw = significance(results, "bm25")
    assert len(raw) == 3  # comparisons made: scifact minilm/other, cranfield minilm
    for key, p in raw.items():
        assert rows[key].p == p and p <= rows[key].p_holm <= min(1.0, 3 * p)
    lo, hi = strong.interval
    assert lo == hi == pytest.approx(0.8)  # constant scores: a zero-width interval
    table = statistics_table(results, "bm25")
    assert "| scifact | minilm | 30 | 0.8000 | [0.8000, 0.8000] | 0.4550 |" in table
    assert "| 30 / 0 / 0 |" in table and "Holm" in table


def test_loss_curve_png():
    from retriever.evaluation.report import loss_curve_png

    png = loss_curve_png([{"step": s, "loss": 2.0 / s} for s in range(1, 20)], "run")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 3000
    with pytest.raises(ValueError, match="no losses"):
        loss_curve_png([], "run")


def test_matrix_report_has_intervals_comparisons_and_loss_curves(tmp_path):
    """write_report over two hand-made cells: the statistics table and, for the model that is
    a training run's export (metrics.jsonl beside merged/), its loss curve."""
    import json
    from types import SimpleNamespace

    from retriever.evaluation.matrix import RunRecord
    from retriever.evaluation.matrix_report import write_report

    run = tmp_path / "runs" / "tuned" / "train"
    (run / "merged").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 11)))
    records = []
    for model, shift in (("bm25", 0.0), ("merged", 0.2)):
        folder = tmp_path / "cells" / model
        folder.mkdir(parents=True)
        noise = random.Random(len(model))
        scores = {f"q{i}": 0.3 + shift + noise.uniform(-0.05, 0.05) for i in range(25)}
        (folder / "per_query.json").write_text(json.dumps({"ndcg@10": scores}))
        (folder / "provenance.json").write_text("{}")
        records.append(RunRecord(model, "tiny", str(folder), "k", False,
                                 {"mrr@10": 0.5, "recall@100": 0.9}))
    config = SimpleNamespace(models=["bm25", str(run / "merged")], baseline="bm25",
                             matrix_id="m", price_per_hour=1.0, hardware="CPU")
    out = tmp_path / "out"
    markdown = write_report(config, records, str(out))
    assert "| tiny | merged | 25 |" in markdown and "| 25 / 0 / 0 |" in markdown
    assert (out / "loss-merged.png").read_bytes()[:4] == b"\x89PNG"
    assert "![training loss of merged](loss-merged.png)" in (out / "report.md").read_text()
    assert not (out / "loss-bm25.png").exists()
    assert "Training loss of merged" in (out / "report.html").read_text()
