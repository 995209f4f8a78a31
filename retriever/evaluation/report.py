"""Comparison reports for a models x datasets matrix: table, significance, plots, HTML.

The table is shaped like the papers' tables: datasets as rows, models as columns, an average
row, the best score per row in bold, and a dagger where a model differs from the baseline by
a two-sided paired t-test over per-query scores with p < 0.05 after Holm's correction across
all the comparisons in the table. :func:`statistics_table` gives each cell's 95% paired
bootstrap interval, the number of queries, and against the baseline the difference with its
interval, the raw and Holm-adjusted p-values and the per-query wins/ties/losses
(``retriever.evaluation.statistics``); :func:`loss_curve_png` plots a training run's losses.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field

import jinja2
from scipy import stats

SIGNIFICANCE = 0.05


def paired_t_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``a`` against ``b``: (t statistic, p value).

    Identical samples give (0, 1); a constant non-zero difference gives (inf, 0). scipy would
    return NaN (or warn of precision loss) for these zero-variance cases, so they are decided
    here before calling it.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(a)}")
    diffs = [x - y for x, y in zip(a, b)]
    if all(d == diffs[0] for d in diffs):
        return (0.0, 1.0) if diffs[0] == 0 else (math.copysign(math.inf, diffs[0]), 0.0)
    result = stats.ttest_rel(a, b)
    return float(result.statistic), float(result.pvalue)


@dataclass
class Cell:
    value: float
    per_query: dict[str, float] = field(default_factory=dict)


# results[dataset][model] -> Cell
Results = dict[str, dict[str, Cell]]


def significance(results: Results, baseline: str) -> dict[tuple[str, str], float]:
    """Raw p-values of every model against ``baseline`` per dataset, over shared queries."""
    out = {}
    for dataset, row in results.items():
        if baseline not in row:
            continue
        base = row[baseline].per_query
        for model, cell in row.items():
            if model == baseline:
                continue
            shared = sorted(set(base) & set(cell.per_query))
            if len(shared) >= 2:
                _, p = paired_t_test([cell.per_query[q] for q in shared],
                                     [base[q] for q in shared])
                out[(dataset, model)] = p
    return out


def holm_significance(results: Results, baseline: str) -> dict[tuple[str, str], float]:
    """:func:`significance`'s p-values adjusted by Holm across all of its comparisons."""
    from retriever.evaluation.statistics import holm

    raw = significance(results, baseline)
    return dict(zip(raw, holm(list(raw.values()))))


@dataclass
class Comparison:
    """One cell's statistics (``model`` on ``dataset``); the ``*_vs`` fields are against the
    baseline and None for the baseline itself or where it has no scores."""

    dataset: str
    model: str
    queries: int
    mean: float
    interval: tuple[float, float]
    difference: float | None = None
    difference_interval: tuple[float, float] | None = None
    p: float | None = None
    p_holm: float | None = None
    wins_ties_losses: tuple[int, int, int] | None = None


def comparisons(results: Results, baseline: str | None) -> list[Comparison]:
    """Every cell with per-query scores: its bootstrap interval and, against ``baseline``,
    the paired difference, p-values (raw and Holm-adjusted) and wins/ties/losses."""
    from retriever.evaluation.statistics import (aligned, bootstrap_difference,
                                                 bootstrap_intervals, wins_ties_losses)

    adjusted = holm_significance(results, baseline) if baseline else {}
    raw = significance(results, baseline) if baseline else {}
    out = []
    for dataset, row in results.items():
        scored = {m: c.per_query for m, c in row.items() if c.per_query}
        if not scored:
            continue
        _, shared, _ = aligned(scored)
        intervals = bootstrap_intervals(scored)
        base = scored.get(baseline) if baseline else None
        for model, per_query in scored.items():
            values = [per_query[q] for q in shared]
            item = Comparison(dataset, model, len(shared), sum(values) / max(len(values), 1),
                              intervals.get(model, (math.nan, math.nan)))
            if base is not None and model != baseline and shared:
                reference = [base[q] for q in shared]
                item.difference = item.mean - sum(reference) / len(reference)
                item.difference_interval = bootstrap_difference(values, reference)
                item.p, item.p_holm = raw.get((dataset, model)), adjusted.get((dataset, model))
                item.wins_ties_losses = wins_ties_losses(values, reference)
            out.append(item)
    return out


def statistics_table(results: Results, baseline: str | None, metric: str = "ndcg@10") -> str:
    """Markdown: one row per cell with its interval, queries and comparison to the baseline."""
    from retriever.evaluation.statistics import CONFIDENCE, RESAMPLES

    number = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    span = lambda i: "-" if i is None else f"[{i[0]:.4f}, {i[1]:.4f}]"  # noqa: E731
    pvalue = lambda p: "-" if p is None else f"{p:.2g}"  # noqa: E731
    lines = [f"{metric}: mean over the queries every model of the dataset scored, its "
             f"{CONFIDENCE:.0%} paired bootstrap interval ({RESAMPLES} resamples of the "
             "queries, the same for every model, seed 0)"
             + (f"; against {baseline}: difference with its interval, two-sided paired t-test "
                "p-value, Holm-adjusted across all comparisons, and per-query wins / ties / "
                "losses" if baseline else ""), "",
             "| dataset | model | queries | mean | 95% CI | Δ vs baseline | Δ 95% CI | p | "
             "p (Holm) | W / T / L |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons(results, baseline):
        wtl = "-" if c.wins_ties_losses is None else " / ".join(map(str, c.wins_ties_losses))
        lines.append(f"| {c.dataset} | {c.model} | {c.queries} | {c.mean:.4f} | "
                     f"{span(c.interval)} | {number(c.difference)} | "
                     f"{span(c.difference_interval)} | {pvalue(c.p)} | {pvalue(c.p_holm)} | "
                     f"{wtl} |")
    return "\n".join(lines)


def markdown_table(results: Results, models: list[str], metric: str = "ndcg@10",
                   baseline: str | None = None) -> str:
    pvalues = holm_significance(results, baseline) if baseline else {}
    head = "| dataset | " + " | ".join(models) + " |"
    lines = [f"{metric}" + (f" (dagger: p < {SIGNIFICANCE} vs {baseline}, two-sided paired "
                            "t-test, Holm-adjusted across the table's comparisons)"
                            if baseline else ""), "", head,
             "|---|" + "---:|" * len(models)]
    columns: dict[str, list[float]] = {m: [] for m in models}
    for dataset, row in results.items():
        best = max((row[m].value for m in models if m in row), default=None)
        cells = []
        for model in models:
            if model not in row:
                cells.append("-")
                continue
            value = row[model].value
            columns[model].append(value)
            text = f"{value:.4f}"
            if pvalues.get((dataset, model), 1.0) < SIGNIFICANCE:
                text += "†"
            cells.append(f"**{text}**" if value == best else text)
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    # Only over every row: a model left off a dataset (``datasets:``) gets no average.
    averages = {m: sum(v) / len(v) for m, v in columns.items() if v and len(v) == len(results)}
    best_avg = max(averages.values(), default=None)
    cells = [(f"**{averages[m]:.4f}**" if averages[m] == best_avg else f"{averages[m]:.4f}")
             if m in averages else "-" for m in models]
    lines.append("| *average* | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart_png(results: Results, models: list[str], metric: str = "ndcg@10") -> bytes:
    """Grouped bars: one group per dataset, one bar per model; labelled axes and legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(datasets) + 2), 4.2), dpi=110)
    for i, model in enumerate(models):
        xs = [d + (i - (len(models) - 1) / 2) * width for d in range(len(datasets))]
        ys = [results[ds][model].value if model in results[ds] else 0.0 for ds in datasets]
        bars = ax.bar(xs, ys, width=width * 0.95, label=model)
        # values on the bars: differences between models are often a few points
        ax.bar_label(bars, labels=[f"{y:.3f}" if model in results[ds] else ""
                                   for y, ds in zip(ys, datasets)],
                     fontsize=7 if len(models) <= 3 else 6, rotation=90, padding=2)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, rotation=20 if len(datasets) > 5 else 0, ha="center")
    ax.set_xlabel("dataset")
    ax.set_ylabel(metric.upper().replace("RECALL", "Recall"))
    ax.set_ylim(0, 1)
    ax.set_title(f"{metric.upper().replace('RECALL', 'Recall')} per dataset and model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="model", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def loss_curve_png(history: list[dict], title: str) -> bytes:
    """The training loss per optimizer step (``history``: the run's ``metrics.jsonl`` rows,
    each with ``step`` and ``loss``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r.get("loss") is not None]
    if not rows:
        raise ValueError(f"{title}: no losses recorded")
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (InfoNCE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


PAGE = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""\
<!doctype html><html><head><meta charset='utf-8'><title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .7em}
.right{text-align:right}.left{text-align:left}th{background:#f3f3f3}img{max-width:100%}
p.note{color:#555}</style></head><body>
<h1>{{ title }}</h1>
{% for section in sections %}
<h2>{{ section.heading }}</h2>
{% for note in section.notes %}<p class='note'>{{ note }}</p>
{% endfor %}
<table>
{% for row in section.rows %}<tr>
{%- for cell in row.cells -%}
<{{ row.tag }} class='{{ cell.align }}'>
{%- if cell.style %}<{{ cell.style }}>{{ cell.text }}</{{ cell.style }}>
{%- else %}{{ cell.text }}{% endif -%}
</{{ row.tag }}>
{%- endfor -%}
</tr>
{% endfor %}</table>
{% endfor %}
{% for image in images %}
<h2>{{ image.caption }}</h2><img alt='{{ image.caption }}' src='data:image/png;base64,{{ image.data }}'>
{% endfor %}
</body></html>
""")


def _cell(text: str, align: str) -> dict[str, str | None]:
    """One table cell: ``**x**`` is bold, ``*x*`` italic (the Markdown the tables use)."""
    if text.startswith("**") and text.endswith("**"):
        return {"text": text[2:-2], "style": "b", "align": align}
    if text.startswith("*") and text.endswith("*"):
        return {"text": text[1:-1], "style": "i", "align": align}
    return {"text": text, "style": None, "align": align}


def _section(heading: str, markdown: str) -> dict:
    """A Markdown table (with note lines above it) as rows of cells for the page template."""
    lines = markdown.splitlines()
    rows = [line for line in lines if line.startswith("|")]
    # the |---|---:| rule says which columns are numbers (right-aligned)
    rule = [c.strip() for c in rows[1].strip("|").split("|")] if len(rows) > 1 else []
    table = []
    for index, line in enumerate(rows):
        if index == 1:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        aligns = ["right" if column < len(rule) and rule[column].endswith(":") else "left"
                  for column in range(len(cells))]
        table.append({"tag": "th" if index == 0 else "td",
                      "cells": [_cell(c, a) for c, a in zip(cells, aligns)]})
    return {"heading": heading, "notes": [line for line in lines if line and not line.startswith("|")],
            "rows": table}


def html_report(title: str, sections: list[tuple[str, str]], images: list[tuple[str, bytes]]
                ) -> str:
    """A self-contained page: Markdown tables rendered as HTML tables, PNGs inlined."""
    return PAGE.render(
        title=title, sections=[_section(heading, md) for heading, md in sections],
        images=[{"caption": caption, "data": base64.b64encode(png).decode("ascii")}
                for caption, png in images])


def throughput_table(rows: list[dict], price_per_hour: float, hardware: str) -> str:
    """docs/s, tokens/s and cost per million documents for each encode run."""
    lines = [f"Encoding throughput on {hardware}; cost at ${price_per_hour:.2f}/hour: "
             "cost per 1M docs = 1e6 / (docs/s) / 3600 x price.", "",
             "| model | dataset | docs | docs/s | tokens/s | $ per 1M docs |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        docs_per_s = row.get("docs_per_s") or 0.0
        cost = (1e6 / docs_per_s / 3600 * price_per_hour) if docs_per_s else float("nan")
        lines.append(f"| {row['model']} | {row['dataset']} | {row.get('docs', 0)} | "
                     f"{docs_per_s:.1f} | {row.get('tokens_per_s', 0.0):.0f} | {cost:.2f} |")
    return "\n".join(lines)
