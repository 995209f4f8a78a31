"""Evaluate one model on one dataset: ``retriever eval --dataset PATH_OR_URL --model M``.

``M`` is ``bm25``, a packaged model name (``minilm``, ``smollm2-135m``, ...), or a model /
adapter directory; the Encoder's options (``--pooling``, ``--query-prefix``, ``--prompt``, ...)
are flags too. Writes ``metrics.json`` and ``run.trec`` under ``--out`` (default
``<store>/evals/adhoc/<model>/<dataset>-<split>``) and prints the metrics table. The work is
:func:`retriever.evaluation.single.evaluate`.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.evaluation.single import EvalConfig, evaluate, format_table


def run(config: EvalConfig) -> dict:
    """Evaluate (see :func:`retriever.evaluation.single.evaluate`); returns the metrics."""
    return evaluate(config)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(EvalConfig, argv, prog="retriever eval")
    result = run(config)
    print(format_table({config.model: result},
                       f"{result['dataset']} ({config.split}): {result['counts']['queries']} "
                       f"queries, {result['counts']['docs']} docs"))
    print(f"wrote {result['out']}/metrics.json and run.trec")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["eval", *sys.argv[1:]]))
