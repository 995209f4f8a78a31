"""Comparison reports for a models x datasets matrix: table, significance, plots, HTML.

The table is shaped like the papers' tables: datasets as rows, models as columns, an average
row, the best score per row in bold, and a dagger where a model differs from the baseline by
a two-sided paired t-test over per-query scores with p < 0.05.
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
    """p-values of every model against ``baseline`` per dataset, over shared queries."""
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


def markdown_table(results: Results, models: list[str], metric: str = "ndcg@10",
                   baseline: str | None = None) -> str:
    pvalues = significance(results, baseline) if baseline else {}
    head = "| dataset | " + " | ".join(models) + " |"
    lines = [f"{metric}" + (f" (dagger: p < {SIGNIFICANCE} vs {baseline}, two-sided paired "
                            "t-test)" if baseline else ""), "", head,
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
    averages = {m: sum(v) / len(v) for m, v in columns.items() if v}
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


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
