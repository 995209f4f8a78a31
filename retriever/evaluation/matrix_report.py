"""The evaluation matrix's report: ``report.md``, ``ndcg.png`` and ``report.html``.

In: the matrix's config and its :class:`~retriever.evaluation.matrix.RunRecord` s (each cell's
``metrics.json``, ``per_query.json``, ``provenance.json``). Out: NDCG@10 (with a paired t-test
against the baseline), MRR@10 and Recall@100 tables, the encoding throughput table and a bar
chart, written under the matrix's output folder; returns the tables as markdown. The NDCG@10
statistics table gives every cell's 95% paired bootstrap interval, its number of queries and,
against the baseline, the difference, Holm-adjusted p-values and wins/ties/losses; a model
that is a training run's export (``<run>/train/{merged,adapter}`` next to ``metrics.jsonl``)
gets its training loss curve, ``loss-<model>.png``.
"""

from __future__ import annotations

from retriever.evaluation.matrix import PER_QUERY, ModelSpec, RunRecord
from retriever.io import store

OTHER_METRICS = {"mrr@10": "MRR@10", "recall@100": "Recall@100"}


def ndcg_cells(records: list[RunRecord]) -> dict:
    """dataset -> model -> Cell(NDCG@10, per-query NDCG@10): the table's mean and the
    t-test's values both come from the cell's unrounded ``per_query.json``."""
    from retriever.evaluation.report import Cell

    results: dict = {}
    for record in records:
        scores = store.read_json(store.join(record.folder, PER_QUERY))["ndcg@10"]
        mean = sum(scores.values()) / len(scores) if scores else 0.0  # as metrics.evaluate
        results.setdefault(record.dataset, {})[record.model] = Cell(mean, scores)
    return results


def throughput_rows(records: list[RunRecord]) -> list[dict]:
    rows = []
    for record in records:
        provenance = store.read_json(store.join(record.folder, "provenance.json"))
        if provenance.get("throughput"):
            rows.append({"model": record.model, "dataset": record.dataset,
                         **provenance["throughput"]})
    return rows


def training_history(model: str) -> list[dict] | None:
    """The losses of the run that exported ``model`` (a path/URL), if it recorded them."""
    import json

    if "/" not in model:
        return None  # a packaged name or bm25
    path = model.rstrip("/")
    for folder in (path, path.rsplit("/", 1)[0]):
        url = store.join(folder, "metrics.jsonl")
        if store.exists(url):
            return [json.loads(line) for line in store.read_text(url).splitlines() if line]
    return None


def loss_curves(models: list[ModelSpec], out: str) -> list[tuple[str, str, bytes]]:
    """(model, file name, PNG) for every fine-tuned model, written under ``out``."""
    from retriever.evaluation.report import loss_curve_png

    curves = []
    for spec in models:
        history = None if spec.is_bm25 else training_history(spec.dense_model or spec.model)
        if history:
            name = f"loss-{spec.name}.png"
            png = loss_curve_png(history, f"training loss of {spec.name}")
            store.write_bytes(store.join(out, name), png)
            curves.append((spec.name, name, png))
    return curves


def write_report(config, records: list[RunRecord], out: str) -> str:
    """Write the report files under ``out``; returns its tables as markdown."""
    from retriever.evaluation.report import (Cell, bar_chart_png, html_report, markdown_table,
                                             statistics_table, throughput_table)

    specs = [ModelSpec.parse(m) for m in config.models]
    models = [spec.name for spec in specs]
    results = ndcg_cells(records)
    baseline = config.baseline if config.baseline in models else None
    tables = [("NDCG@10", markdown_table(results, models, "ndcg@10", baseline)),
              ("NDCG@10: intervals and comparisons", statistics_table(results, baseline))]
    for metric, title in OTHER_METRICS.items():
        other = {ds: {m: Cell(next(r.metrics[metric] for r in records
                                   if r.dataset == ds and r.model == m)) for m in row}
                 for ds, row in results.items()}
        tables.append((title, markdown_table(other, models, metric)))
    tables.append(("Encoding throughput", throughput_table(throughput_rows(records),
                                                           config.price_per_hour,
                                                           config.hardware)))
    png = bar_chart_png(results, models, "ndcg@10")
    curves = loss_curves(specs, out)
    markdown = "\n\n".join(f"## {title}\n\n{table}" for title, table in tables)
    images = "".join(f"\n![training loss of {model}]({name})\n" for model, name, _ in curves)
    store.write_text(store.join(out, "report.md"),
                     f"# Evaluation matrix {config.matrix_id}\n\n{markdown}\n\n"
                     f"![NDCG@10 per dataset](ndcg.png)\n{images}")
    store.write_bytes(store.join(out, "ndcg.png"), png)
    store.write_text(store.join(out, "report.html"),
                     html_report(f"Evaluation matrix {config.matrix_id}", tables,
                                 [("NDCG@10 per dataset and model", png)]
                                 + [(f"Training loss of {m}", data) for m, _, data in curves]))
    return markdown
