"""Evaluate a models x datasets matrix on the cluster: ``retriever evaluate --config FILE``.

Per dense run: encode the corpus on Ray Data, build the index (flat or the configured type), encode the queries and search as a Ray task, score. BM25 runs
as a Ray task. Each run writes ``metrics.json``, ``run.trec`` and ``provenance.json`` under
``<out>/<model>/<dataset>/``; the matrix writes ``report.md``, ``ndcg.png`` and ``report.html``
under ``<out>`` (default ``<store>/evals/<matrix_id>``). Finished runs are reused. The work is
``retriever.pipelines.evaluate``; this module only parses the config and prints.

Example config::

    matrix_id: classic
    baseline: bm25
    models: [bm25, minilm, {name: smollm2-zs, model: smollm2-135m, prompt: one-word}]
    datasets: [../shared/datasets/cranfield, {name: scifact, path: ../shared/datasets/scifact}]
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.evaluation.matrix import RunRecord
from retriever.pipelines.evaluate import MatrixConfig, output_folder, run_matrix

__all__ = ["MatrixConfig", "main", "run"]


def run(config: MatrixConfig) -> tuple[list[RunRecord], str]:
    return run_matrix(config)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(MatrixConfig, argv, prog="retriever evaluate")
    records, markdown = run(config)
    print(f"\n{markdown}")
    print(f"\nreport: {output_folder(config)}/report.md, report.html, ndcg.png; "
          f"{sum(r.reused for r in records)} of {len(records)} runs reused")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["evaluate", *sys.argv[1:]]))
